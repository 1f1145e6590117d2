"""--reuse-port: several relay processes share public ports (SO_REUSEPORT), and which agent owns
a shared port follows from the credentials alone."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from relay import server
from relay.agent import Target
from relay.listening import listen_public
from relay.server import RelaySettings
from relay.state import PortSet

from .inmemory import World, stream, up

LOOPBACK = "127.0.0.1"


# --- the socket ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def listening():
    """listen(port, reuse_port): a real listening port on 127.0.0.1, stopped after the test."""
    from twisted.internet import reactor

    ports = []

    def listen(port: int, reuse_port: bool):
        p = listen_public(reactor, port, Factory.forProtocol(Protocol), LOOPBACK, reuse_port)
        ports.append(p)
        return p

    yield listen
    for p in ports:
        p.stopListening()


def _reuse_port_of(port) -> int:
    sock = socket.socket(fileno=socket.dup(port.fileno()))
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        sock.close()


def test_two_reuse_port_listeners_share_one_port(listening):
    port = _free_port()
    first = listening(port, True)
    second = listening(port, True)
    assert first.getHost().port == second.getHost().port == port
    assert _reuse_port_of(first) and _reuse_port_of(second)


def test_without_reuse_port_a_second_listener_is_refused(listening):
    port = _free_port()
    first = listening(port, False)
    assert not _reuse_port_of(first)
    with pytest.raises(error.CannotListenError, match=str(port)):
        listening(port, False)


def test_reuse_port_cannot_join_a_port_held_without_it(listening):
    """A relay started without --reuse-port keeps its ports to itself."""
    port = _free_port()
    listening(port, False)
    with pytest.raises(error.CannotListenError, match="Address already in use"):
        listening(port, True)


def test_a_bad_interface_cannot_listen():
    from twisted.internet import reactor

    with pytest.raises(error.CannotListenError):
        listen_public(reactor, _free_port(), Factory.forProtocol(Protocol), "fe80::1%no-such-interface", True)


@pytest_twisted.inlineCallbacks
def test_a_shared_port_accepts_clients(listening):
    """The reactor accepts on the descriptor it adopted."""
    from twisted.internet import defer, endpoints, reactor

    made = defer.Deferred()

    class Accepted(Protocol):
        def connectionMade(self):
            made.callback(self.transport.getPeer().port)

    port = _free_port()
    listening(port, True).factory = Factory.forProtocol(Accepted)
    client = yield endpoints.TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=5).connect(Factory.forProtocol(Protocol))
    made.addTimeout(5, reactor)
    peer_port = yield made
    assert peer_port == client.transport.getHost().port
    client.transport.loseConnection()


# --- which agent owns a shared port ---------------------------------------------------


@pytest.fixture
def shared_world(state, monkeypatch):
    """An in-memory relay with reuse_port on; its listens are recorded, not made."""
    calls = []

    def record(reactor, port, factory, interface="", reuse_port=False):
        calls.append((port, reuse_port))
        return reactor.listenTCP(port, factory, interface=interface)

    monkeypatch.setattr(server, "listen_public", record)
    world = World(state, RelaySettings(tunnel_port=7835, reuse_port=True))
    world.listens = calls
    return world


def test_an_agent_alone_allowed_its_ports_gets_them_shared(shared_world, state):
    agent = up(shared_world, state, {8080: Target("127.0.0.1", 80), 9000: Target("127.0.0.1", 90)}, ports="8080,9000")
    assert sorted(shared_world.relay.public) == [8080, 9000]
    assert shared_world.listens == [(8080, True), (9000, True)]
    _, _, target, _ = stream(shared_world, agent)
    assert target.target == Target("127.0.0.1", 80)


def test_an_agent_without_a_port_list_gets_no_shared_port(shared_world, state, logs):
    agent = up(shared_world, state, {8080: Target("127.0.0.1", 80)}, ports=None)
    assert shared_world.relay.public == {}
    assert shared_world.listens == []
    assert agent.tunnel.connected_tunnel  # refused the port, not the tunnel
    assert any(
        "with --reuse-port, agent a1 needs an explicit port list (relay agent-token --ports 8080)" in line
        for line in logs
    ), logs


def test_a_port_another_agent_may_also_use_is_not_shared(shared_world, state, logs):
    """a2 and a3 could be served by other relay processes on 8080: a1 does not get it here,
    and keeps serving the port only it may use. a2 and a3 need not be connected anywhere."""
    state.issue_token("a2", PortSet.parse("8080"))
    state.issue_token("a3", PortSet.parse("8000-8100,9000"))
    agent = up(shared_world, state, {p: Target("127.0.0.1", p - 9000) for p in (8080, 9000, 9001)}, ports="8080,9000-9001")
    assert sorted(shared_world.relay.public) == [9001]
    assert shared_world.listens == [(9001, True)]
    text = "\n".join(logs)
    assert "port 8080 refused: with --reuse-port, port 8080 must be allowed to one agent only; it is also allowed to a2, a3" in text
    assert "9000: with --reuse-port, port 9000 must be allowed to one agent only; it is also allowed to a3" in text
    assert agent.tunnel.connected_tunnel
    _, _, target, _ = stream(shared_world, agent, 9001)
    assert target.target == Target("127.0.0.1", 1)


def test_an_agent_allowed_every_port_blocks_sharing_any(shared_world, state, logs):
    state.issue_token("anywhere", None)
    agent = up(shared_world, state, {9001: Target("127.0.0.1", 91)}, ports="9001")
    assert shared_world.relay.public == {}
    assert "it is also allowed to anywhere" in "\n".join(logs)
    assert agent.tunnel.connected_tunnel


def test_a_port_granted_to_another_agent_later_is_given_up_at_once(shared_world, state, logs):
    """Another relay process would give 8080 to a2 as soon as a2's credential allows it:
    this process stops serving it for a1 at its next look at agents.json, not at a1's
    next hello, so no client of a2 reaches a1's target."""
    agent = up(shared_world, state, {8080: Target("127.0.0.1", 80), 9000: Target("127.0.0.1", 90)}, ports="8080,9000")
    assert sorted(shared_world.relay.public) == [8080, 9000]
    state.issue_token("a2", PortSet.parse("8080"))
    shared_world.relay.check_credentials(force=True)
    agent.flush()
    assert sorted(shared_world.relay.public) == [9000]  # 9000 is still a1's alone
    assert not shared_world.relay.public.get(8080)
    text = "\n".join(logs)
    assert "agent a1: stopped listening on public port 8080: with --reuse-port, port 8080 must be allowed to one agent only; it is also allowed to a2" in text
    assert "relay refused public port 8080: with --reuse-port" in text  # the agent was told, and asks again later
    assert agent.tunnel.connected_tunnel and agent.tunnel._retry_timers.get(8080) is not None
    _, _, target, _ = stream(shared_world, agent, 9000)
    assert target.target == Target("127.0.0.1", 90)


def test_a_shared_port_outside_a_narrowed_list_is_given_up(shared_world, state, logs):
    agent = up(shared_world, state, {8080: Target("127.0.0.1", 80), 9000: Target("127.0.0.1", 90)}, ports="8080,9000")
    # a1's certificate (its other credential) now carries the narrower list; its token stays valid.
    state.record_certificate("a1", state.issue_certificate("a1"), PortSet.parse("9000"))  # `relay agent-cert a1 --ports 9000`
    shared_world.relay.check_credentials(force=True)
    agent.flush()
    assert sorted(shared_world.relay.public) == [9000]
    assert "stopped listening on public port 8080: port 8080 is not allowed for agent a1" in "\n".join(logs)


def test_without_reuse_port_the_relay_listens_on_its_own(state, monkeypatch):
    calls = []
    real = server.listen_public

    def record(reactor, port, factory, interface="", reuse_port=False):
        calls.append((port, reuse_port))
        return real(reactor, port, factory, interface, reuse_port)

    monkeypatch.setattr(server, "listen_public", record)
    world = World(state)
    state.issue_token("other", None)  # allowed everything: no matter without --reuse-port
    up(world, state, {8080: Target("127.0.0.1", 80)}, ports=None)
    assert calls == [(8080, False)]
    assert [p for p, *_ in world.clock.tcpServers] == [8080]


# --- the option ----------------------------------------------------------------------


def _settings(tap, argv, state):
    options = tap.Options()
    options.parseOptions(["--state", str(state.path), "--tunnel", "tcp:7835", *argv])
    return tap.makeService(options).relay.settings


def test_reuse_port_is_off_by_default_and_on_by_flag_or_config(no_listen_server_tap, state, tmp_path):
    tap = no_listen_server_tap
    assert _settings(tap, [], state).reuse_port is False
    assert _settings(tap, ["--reuse-port"], state).reuse_port is True
    config = tmp_path / "relay.toml"
    config.write_text("reuse_port = true\n")
    assert _settings(tap, ["--config", str(config)], state).reuse_port is True
    config.write_text('reuse_port = "yes"\n')
    with pytest.raises(usage.UsageError, match="key 'reuse-port' must be true or false"):
        _settings(tap, ["--config", str(config)], state)
