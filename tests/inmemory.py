"""In-memory harness: one relay and its agents over real TLS through iosim, on one hand-advanced
clock, with fake sockets for public clients and targets. No sockets, no sleeps."""

from __future__ import annotations

import gc

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim

from relay.agent import AgentService, AgentSettings, AgentTunnel, Target
from relay.server import Relay, RelaySettings
from relay.state import PortSet
from relay.tls import client_options_for_ca, server_options
from relay.tlswire import TunnelTLSFactory
from relay.tunnel import TunnelSettings

CLIENT = IPv4Address("TCP", "203.0.113.7", 40000)


class FakeSocket(StringTransport):
    """A TCP transport that remembers half-close and abort, and every writeSequence call."""

    bufferSize = 2**16  # what one read of a Twisted TCP transport takes, unless told otherwise

    def __init__(self, peer=CLIENT):
        super().__init__(peerAddress=peer)
        self.write_closed = False
        self.aborted = False
        self.sequences: list[int] = []  # chunks per writeSequence call

    def writeSequence(self, data):
        self.sequences.append(len(data))
        super().writeSequence(data)

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class FakeTargets:
    """The agent's view of its inside targets: every connect is recorded and answered by the test."""

    def __init__(self):
        self.connects: list[tuple[Target, defer.Deferred, Factory]] = []
        self.at_once = False  # connect inside connect(), as relay/dial.py does on loopback
        self.sockets: list[FakeSocket] = []

    def endpoint(self, target):
        targets = self

        class _Endpoint:
            def connect(self, factory):
                d = defer.Deferred()
                targets.connects.append((target, d, factory))
                if targets.at_once:
                    targets.succeed()
                return d

        return _Endpoint()

    def succeed(self, index=-1):
        target, d, factory = self.connects[index]
        proto = factory.buildProtocol(None)
        sock = FakeSocket()
        self.sockets.append(sock)
        proto.makeConnection(sock)
        d.callback(proto)
        return proto, sock


class World:
    """One relay, any number of agents, all on one clock."""

    def __init__(self, state, relay_settings=None):
        self.clock = MemoryReactorClock()
        self.state = state
        self.relay = Relay(self.clock, state, relay_settings or RelaySettings(tunnel_port=7835))
        self.server_tls = TunnelTLSFactory(
            server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path),
            False,
            self.relay.tunnel_factory(),
            clock=self.clock,
        )

    def agent(self, token, expose, creator=None, tunnel=None, peer_host="198.51.100.1"):
        settings = AgentSettings(token=token, expose=expose, tunnel=tunnel or TunnelSettings())
        service = AgentService(self.clock, None, settings, relay_name="localhost:7835")
        targets = FakeTargets()
        service.target_endpoint = targets.endpoint
        creator = creator or client_options_for_ca("localhost", self.state.ca_cert_path)
        client_tls = TunnelTLSFactory(creator, True, Factory.forProtocol(lambda: AgentTunnel(service)), clock=self.clock)
        server = self.server_tls.buildProtocol(None)
        client = client_tls.buildProtocol(None)
        agent = Agent(service, client, server, targets)
        agent.pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, peerAddress=IPv4Address("TCP", peer_host, 5000)),
            client,
            iosim.FakeTransport(client, False),
            greet=False,
            clock=self.clock,
        )
        return agent

    def public_client(self, port, peer=CLIENT):
        proto = self.relay.public[port].buildProtocol(peer)
        sock = FakeSocket(peer)
        proto.makeConnection(sock)
        return proto, sock


class Agent:
    def __init__(self, service, client, server, targets):
        self.service = service
        self.tls = client
        self.tunnel: AgentTunnel = client.wrappedProtocol  # iosim drops it once the connection is lost
        self.relay_tunnel = server.wrappedProtocol
        self.pump: iosim.IOPump | None = None
        self.targets = targets

    def flush(self):
        self.pump.flush()


def token(state, name="a1", ports="8080,9000-9001"):
    return state.issue_token(name, PortSet.parse(ports) if ports else None)


def up(world, state, expose=None, name="a1", ports="8080,9000-9001"):
    agent = world.agent(token(state, name, ports), expose or {8080: Target("127.0.0.1", 80)})
    agent.flush()
    return agent


def stream(world, agent, port=8080):
    """A public client connected through to an accepted target."""
    client, client_sock = world.public_client(port)
    agent.flush()
    target, target_sock = agent.targets.succeed()
    agent.flush()
    return client, client_sock, target, target_sock


def garbage_left_by(run, times: int = 5) -> int:
    """How many objects `times` calls of run() leave that only the garbage collector frees
    (reference cycles), counted with the collector off. run() is called once before
    (caches, first-time imports).

    Everything the collector tracks before the calls is held meanwhile, so that only what
    they made is counted: objects of earlier tests that something lets go of meanwhile
    (Twisted's log buffer drops its oldest event for each new one) are not; nor are
    zope.interface's weakly cached specs, each a cycle of its own, which Twisted's TLS makes
    the same few of for every connection it wraps, and afresh after every collection.

    And the events the calls logged are dropped from Twisted's start-up buffer before the
    count (tests never begin logging, twistd does): an event names the instance that
    logged it (log_source), and kept there, a tunnel in a cycle was not garbage yet."""
    run()
    alive = gc.get_objects()
    gc.disable()
    try:
        for _ in range(times):
            run()
        _start_up_log_buffer().clear()
        return gc.collect()
    finally:
        gc.enable()
        del alive


def _start_up_log_buffer():
    """The events Twisted keeps until logging begins (a bounded deque), or an empty list."""
    from twisted.logger import globalLogBeginner

    buffer = getattr(getattr(globalLogBeginner, "_initialBuffer", None), "_buffer", None)
    return buffer if buffer is not None else []
