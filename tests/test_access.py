"""Public-side access control: allow/deny lists and per-source caps, alone and on a live relay."""

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address

from relay.access import MAX_TRACKED_SOURCES, Gate, PortPolicy, client_address, parse_policies
from relay.agent import Target
from relay.server import RelaySettings

from .inmemory import World, stream, up


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def test_open_policy_admits_everyone():
    gate = Gate(PortPolicy(), Clock())
    assert all(gate.admit(h) is None for h in ["192.0.2.1", "2001:db8::1", "garbage"])
    assert gate.sources == {}  # nothing is tracked when there is nothing to enforce


def test_allow_list_admits_only_listed_networks_both_families():
    gate = Gate(PortPolicy(allow=nets("192.0.2.0/24", "2001:db8::/32")), Clock())
    assert gate.admit("192.0.2.77") is None
    assert gate.admit("2001:db8::5") is None
    assert "not allowed" in gate.admit("198.51.100.1")
    assert "not allowed" in gate.admit("2001:db9::1")
    assert gate.refused["acl"] == 2


def test_deny_wins_over_allow_and_mapped_ipv4_counts_as_ipv4():
    gate = Gate(PortPolicy(allow=nets("192.0.2.0/24"), deny=nets("192.0.2.13/32")), Clock())
    assert gate.admit("192.0.2.13") is not None
    assert gate.admit("::ffff:192.0.2.13") is not None
    assert gate.admit("::ffff:192.0.2.14") is None


def test_unparseable_address_is_refused_when_a_list_exists():
    gate = Gate(PortPolicy(deny=nets("10.0.0.0/8")), Clock())
    assert gate.admit("not-an-ip") is not None


def test_concurrency_cap_per_source_and_release():
    gate = Gate(PortPolicy(max_conns_per_ip=2), Clock())
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is None
    assert "maximum" in gate.admit("192.0.2.1")
    assert gate.admit("192.0.2.2") is None  # another source is not affected
    gate.release("192.0.2.1")
    assert gate.admit("192.0.2.1") is None
    assert gate.refused["concurrency"] == 1


def test_rate_cap_per_source_refills_with_time():
    clock = Clock()
    gate = Gate(PortPolicy(max_rate_per_ip=2), clock)
    assert [gate.admit("192.0.2.1") for _ in range(3)][:2] == [None, None]
    assert gate.refused["rate"] == 1
    assert gate.admit("192.0.2.9") is None  # per source
    clock.now += 0.5  # one token back at 2/s
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is not None


def test_tracked_sources_stay_bounded():
    gate = Gate(PortPolicy(max_rate_per_ip=1000), Clock())
    for i in range(MAX_TRACKED_SOURCES + 10):
        gate.admit(str(ipaddress.IPv6Address(0x20010DB8 << 96 | i)))
        gate.release(str(ipaddress.IPv6Address(0x20010DB8 << 96 | i)))
    assert len(gate.sources) <= MAX_TRACKED_SOURCES


def test_client_address_strips_zone_and_maps():
    assert client_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_address("::ffff:10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    assert client_address("x") is None


def test_parse_policies_and_errors():
    policies = parse_policies(
        {"8080": {"allow": ["10.0.0.0/8"], "max-conns-per-ip": 3}, "default": {"max_rate_per_ip": 1.5}}, "f.toml"
    )
    assert policies[8080] == PortPolicy(allow=nets("10.0.0.0/8"), max_conns_per_ip=3)
    assert policies[None].max_rate_per_ip == 1.5
    for bad, message in [
        ({"http": {}}, "port number or 'default'"),
        ({"8080": {"alow": []}}, "unknown key 'alow'"),
        ({"8080": {"allow": "10.0.0.0/8"}}, "list of CIDR"),
        ({"8080": {"allow": ["10.0.0.300/8"]}}, "ports.8080.allow"),
        ({"8080": {"max-conns-per-ip": -1}}, "max-conns-per-ip"),
        ({"8080": {"max-rate-per-ip": "fast"}}, "max-rate-per-ip"),
        ({"8080": 5}, "must be a table"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_policies(bad, "f.toml")


# --- on a live relay (in memory) -----------------------------------------------------


def test_refused_client_is_closed_at_once_and_others_carry_on(state):
    world = World(state, RelaySettings(tunnel_port=7835, port_policies={8080: PortPolicy(allow=nets("203.0.113.0/24"))}))
    agent = up(world, state)
    denied = world.relay.public[8080].buildProtocol(IPv4Address("TCP", "198.51.100.9", 1234))
    assert denied is None  # Twisted closes the connection without a stream
    assert world.relay.public[8080].gate.refused["acl"] == 1
    client, client_sock, target, target_sock = stream(world, agent)  # 203.0.113.7 is allowed
    client.dataReceived(b"ok")
    agent.flush()
    assert target_sock.value() == b"ok"


def test_concurrency_cap_is_released_when_a_client_leaves(state):
    world = World(state, RelaySettings(tunnel_port=7835, port_policies={None: PortPolicy(max_conns_per_ip=1)}))
    agent = up(world, state, {8080: Target("127.0.0.1", 80)})
    client, client_sock, target, target_sock = stream(world, agent)
    assert world.relay.public[8080].buildProtocol(client_sock.getPeer()) is None
    client.readConnectionLost()
    target.readConnectionLost()
    agent.flush()
    client.writeConnectionLost()
    client.connectionLost(None)
    assert world.relay.public[8080].buildProtocol(client_sock.getPeer()) is not None


def test_ipv6_client_on_a_dual_stack_port(state):
    world = World(state, RelaySettings(tunnel_port=7835, port_policies={8080: PortPolicy(allow=nets("2001:db8::/32"))}))
    up(world, state)
    assert world.relay.public[8080].buildProtocol(IPv6Address("TCP", "2001:db8::1", 1)) is not None
    assert world.relay.public[8080].buildProtocol(IPv6Address("TCP", "::ffff:192.0.2.1", 1)) is None
