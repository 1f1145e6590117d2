"""twistd plugins for relay: `twistd relay-server` and `twistd relay-agent`.

Import-free on purpose: an import error here makes a plugin silently vanish from
`twistd --help`, so the real work lives in relay.server_tap and relay.agent_tap.
"""

from twisted.application.service import ServiceMaker

relay_server = ServiceMaker(
    "relay server",
    "relay.server_tap",
    "Public relay: accepts agent tunnels over TLS and listens on public ports for them.",
    "relay-server",
)

relay_agent = ServiceMaker(
    "relay agent",
    "relay.agent_tap",
    "Inside agent: dials out to a relay and connects its streams to exposed targets.",
    "relay-agent",
)
