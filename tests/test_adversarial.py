"""Hostile peers, in memory over real TLS (iosim) on a hand-advanced clock: no sockets, no sleeps.

A hostile agent is a real agent with a valid credential whose tunnel stops running our
protocol once it is up: it writes raw relay/1 frames and records what the relay sends.
A hostile relay is a test double (FakeRelay) that speaks docs/protocol.md to a real
AgentService/AgentTunnel. A hostile client is a flood of public connections.

Every attack checks that the victim stays up, that a healthy agent or stream carries bytes
exactly afterwards, that what the victim buffers stays bounded (byte counts the code
exposes), and that the cause is logged, rate-limited where a peer could repeat it.
"""

from __future__ import annotations

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from relay import defaults
from relay.access import PortPolicy
from relay.agent import AgentService, AgentSettings, AgentTunnel, Target
from relay.protocol.frames import (
    HEADER,
    Control,
    Data,
    ErrorCode,
    FrameDecoder,
    GoAway,
    Open,
    OpenOk,
    Ping,
    ProtocolError,
    Reset,
    Window,
    encode,
    encode_data,
)
from relay.server import RelaySettings
from relay.tls import client_options_for_ca, server_options
from relay.tunnel import TunnelSettings

from .inmemory import CLIENT, FakeTargets, World, stream, token, up

CHUNK = 64 * defaults.KiB  # one socket read
WINDOW = defaults.INITIAL_WINDOW


def matching(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


# --- helpers: a healthy agent, a hostile agent ---------------------------------------------


def healthy(world, state):
    return up(world, state, {9000: Target("127.0.0.1", 90)}, name="good", ports="9000")


def assert_flows(world, agent, port=9000, tag=b"after the attack"):
    """A new stream on `agent` carries bytes both ways, exactly."""
    client, client_sock, target, target_sock = stream(world, agent, port)
    client.dataReceived(tag)
    agent.flush()
    assert target_sock.value() == tag
    target.dataReceived(tag[::-1])
    agent.flush()
    assert client_sock.value() == tag[::-1]
    assert not client_sock.aborted and not target_sock.aborted


class Hostile:
    """An authenticated agent that now writes raw frames and only records what the relay says."""

    def __init__(self, world, state, name="bad", ports="8080", expose=None):
        self.world = world
        self.agent = up(world, state, expose or {8080: Target("127.0.0.1", 80)}, name=name, ports=ports)
        assert self.agent.tunnel.welcomed
        self.relay_tunnel = self.agent.relay_tunnel
        self.frames: list = []
        decoder = FrameDecoder()
        self.agent.tunnel.dataReceived = lambda data: self.frames.extend(decoder.feed(data))

    def send(self, *frames) -> None:
        self.agent.tls.write(b"".join(f if isinstance(f, bytes | bytearray) else encode(f) for f in frames))

    def flush(self) -> None:
        self.agent.flush()

    def of(self, kind) -> list:
        return [f for f in self.frames if isinstance(f, kind)]

    def data(self, stream_id: int) -> bytes:
        return b"".join(f.payload for f in self.of(Data) if f.stream_id == stream_id)

    @property
    def up(self) -> bool:
        return self.agent.tunnel.connected_tunnel and self.world.relay.tunnels.get(self.relay_tunnel.agent_name) is self.relay_tunnel

    def client(self, port=8080, peer=CLIENT):
        """A public client of this agent's port; returns (protocol, socket, stream id)."""
        client, sock = self.world.public_client(port, peer)
        self.flush()
        opens = self.of(Open)
        assert opens and opens[-1].port == port
        return client, sock, opens[-1].stream_id


# --- a hostile agent -----------------------------------------------------------------------


@pytest.fixture
def world(state):
    return World(state)


def test_agent_sending_open_closes_only_its_tunnel(world, state, logs):
    good = healthy(world, state)
    bad = Hostile(world, state)
    c, c_sock, t, t_sock = stream(world, good, 9000)
    bad.send(Open(1, 9000, "198.51.100.66", 1))  # agents never open streams
    bad.flush()
    good.flush()
    assert not bad.up
    assert any(isinstance(f, GoAway) and f.code == ErrorCode.PROTOCOL_ERROR for f in bad.frames)
    assert 8080 not in world.relay.public and 9000 in world.relay.public
    assert matching(logs, "protocol error: the agent sent OPEN")
    assert good.targets.connects[-1][0] == Target("127.0.0.1", 90)  # nothing new was opened
    c.dataReceived(b"old stream")
    good.flush()
    assert t_sock.value() == b"old stream"
    assert_flows(world, good)


def test_agent_that_never_grants_window_gets_one_window_and_the_client_is_paused(world, state):
    good = healthy(world, state)
    bad = Hostile(world, state)
    client, sock, sid = bad.client()
    bad.send(OpenOk(sid))
    bad.flush()
    sent = 0
    for _ in range(20):
        if sock.producerState == "paused":
            break
        client.dataReceived(b"c" * CHUNK)
        sent += CHUNK
        bad.flush()
    assert sock.producerState == "paused"  # the relay stopped reading the public client
    assert bad.data(sid) == b"c" * WINDOW  # exactly one window went to the agent
    session = bad.relay_tunnel.session
    assert session.queued_bytes == sent - WINDOW <= CHUNK  # held: at most one read
    assert bad.relay_tunnel._backlog_while_paused == 0
    # A second stream of the same agent has its own window.
    client2, sock2, sid2 = bad.client()
    client2.dataReceived(b"second")
    bad.flush()
    assert bad.data(sid2) == b"second"
    assert bad.up
    assert_flows(world, good)
    # Credit at last: the held bytes go out, and the client is read again.
    bad.send(Window(sid, WINDOW))
    bad.flush()
    assert bad.data(sid) == b"c" * sent
    assert session.queued_bytes == 0
    assert sock.producerState == "producing"


def test_window_overflow_past_2_31_closes_only_that_tunnel(world, state, logs):
    good = healthy(world, state)
    bad = Hostile(world, state)
    client, sock, sid = bad.client()
    bad.send(OpenOk(sid), Window(sid, 2**31 - 1))  # credit would be 2**31 - 1 + 256 KiB
    bad.flush()
    good.flush()
    assert not bad.up
    assert sock.aborted
    assert matching(logs, f"protocol error: window of stream {sid} grew past 2**31-1")
    assert_flows(world, good)


def test_data_beyond_the_window_resets_only_that_stream_and_is_logged(world, state, logs):
    good = healthy(world, state)
    bad = Hostile(world, state)
    c1, s1, sid1 = bad.client()
    c2, s2, sid2 = bad.client()
    s1.producer.pauseProducing()  # the client reads nothing, so the relay grants no credit
    bad.send(OpenOk(sid1), OpenOk(sid2))
    flood = [encode_data(sid1, b"z" * CHUNK) for _ in range(WINDOW // CHUNK)]
    bad.send(*flood, encode_data(sid1, b"!"), *flood)  # one byte past the window, then more
    bad.flush()
    assert s1.aborted
    assert s1.value() == b"z" * WINDOW  # the client got the window, not a byte more
    assert Reset(sid1, ErrorCode.FLOW_CONTROL) in bad.frames
    assert not bad.relay_tunnel.session.has_stream(sid1)
    assert len(matching(logs, "beyond its window")) == 1
    # The other stream of the same tunnel goes on.
    bad.send(Data(sid2, b"fine"))
    c2.dataReceived(b"also fine")
    bad.flush()
    assert s2.value() == b"fine" and not s2.aborted
    assert bad.data(sid2) == b"also fine"
    assert bad.up
    # The same violation repeated on many streams is logged once per interval.
    for _ in range(20):
        _, sock, sid = bad.client()
        sock.producer.pauseProducing()
        bad.send(*[encode_data(sid, b"z" * CHUNK) for _ in range(WINDOW // CHUNK + 1)])
        bad.flush()
        assert sock.aborted and len(sock.value()) == WINDOW
    assert len(matching(logs, "beyond its window")) == 1
    world.clock.advance(11)
    _, sock, sid = bad.client()
    sock.producer.pauseProducing()
    bad.send(*[encode_data(sid, b"z" * CHUNK) for _ in range(WINDOW // CHUNK + 1)])
    bad.flush()
    assert len(matching(logs, "beyond its window")) == 2
    assert matching(logs, "(20 more like this")
    assert_flows(world, good)


@pytest.mark.parametrize(
    "frame",
    [Data(7, b"x"), Window(7, 1), OpenOk(7), Reset(7, 0), Data(2, b"x"), Window(4, 1)],
    ids=["data", "window", "open_ok", "reset", "data-even-id", "window-even-id"],
)
def test_frames_for_a_stream_never_opened_close_only_that_tunnel(world, state, logs, frame):
    good = healthy(world, state)
    bad = Hostile(world, state)
    _, sock, sid = bad.client()  # stream 1 exists; 7 and even ids were never opened
    bad.send(frame)
    bad.flush()
    good.flush()
    assert not bad.up and sock.aborted
    assert matching(logs, f"frame for stream {frame.stream_id}, which was never opened")
    assert_flows(world, good)


def test_frames_for_another_agents_stream_never_reach_it(world, state, logs):
    good = healthy(world, state)
    bad = Hostile(world, state)
    c, c_sock, t, t_sock = stream(world, good, 9000)  # stream 1 on the good tunnel
    sid = good.relay_tunnel.streams and next(iter(good.relay_tunnel.streams))
    bad.send(Data(sid, b"evil"), Reset(sid, ErrorCode.NORMAL))  # ids are per tunnel
    bad.flush()
    good.flush()
    assert not bad.up
    assert c_sock.value() == b"" and not c_sock.aborted
    assert matching(logs, f"frame for stream {sid}, which was never opened")
    t.dataReceived(b"only mine")
    good.flush()
    assert c_sock.value() == b"only mine"
    assert_flows(world, good)


def test_frames_for_a_closed_stream_are_dropped_and_the_tunnel_goes_on(world, state):
    good = healthy(world, state)
    bad = Hostile(world, state)
    client, sock, sid = bad.client()
    client.connectionLost(Failure(error.ConnectionLost()))  # the client resets: stream gone
    bad.flush()
    assert Reset(sid, ErrorCode.RESET_BY_PEER) in bad.frames
    bad.send(Data(sid, b"late" * 1000), Window(sid, 5), OpenOk(sid), Reset(sid, 3), Data(sid, b"", fin=True))
    bad.flush()
    assert bad.up and sock.value() == b""
    _, sock2, sid2 = bad.client()
    bad.send(OpenOk(sid2), Data(sid2, b"next stream"))
    bad.flush()
    assert sock2.value() == b"next stream"
    assert_flows(world, good)


def test_data_after_fin_and_second_open_ok_are_protocol_errors(world, state, logs):
    good = healthy(world, state)
    first = Hostile(world, state)
    _, _, sid = first.client()
    first.send(OpenOk(sid), Data(sid, b"", fin=True), Data(sid, b"more"))
    first.flush()
    assert not first.up
    assert matching(logs, f"DATA on stream {sid} after its FIN")
    second = Hostile(world, state, name="bad2", ports="8081", expose={8081: Target("h", 1)})
    _, _, sid = second.client(8081)
    second.send(OpenOk(sid), OpenOk(sid))
    second.flush()
    assert not second.up
    assert matching(logs, f"second OPEN_OK for stream {sid}")
    assert_flows(world, good)


def test_ping_flood_from_a_peer_that_reads_is_answered_and_nothing_piles_up(world, state):
    good = healthy(world, state)
    bad = Hostile(world, state)
    acks_before = len([f for f in bad.of(Ping) if f.ack])
    for batch in range(10):
        bad.send(*[Ping(batch * 1000 + i) for i in range(1000)])
        bad.flush()
    acks = [f.opaque for f in bad.of(Ping) if f.ack][acks_before:]
    assert acks == list(range(10000))
    assert bad.relay_tunnel._backlog_while_paused == 0
    assert bad.agent.pump.serverIO.stream == []  # the relay holds nothing for it
    assert bad.up
    assert_flows(world, good)


def one_way(agent) -> None:
    """Move the agent's bytes to the relay, never the relay's to the agent: a peer that does not read."""
    for _ in range(100):
        data = agent.pump.clientIO.getOutBuffer()
        if not data:
            return
        agent.pump.serverIO.bufferReceived(data)
        agent.pump.clock.advance(0)  # the end of the relay's reactor turn: its writes go out


def socket_buffer(transport, limit: int) -> list[int]:
    """Make an iosim transport pause its producer past `limit` unsent bytes, as a TCP transport does.
    Returns a list that records the largest buffer seen."""
    largest = [0]
    write = transport.write

    def bounded_write(data):
        write(data)
        size = sum(map(len, transport.stream))
        largest[0] = max(largest[0], size)
        if size > limit and transport.producer is not None and not getattr(transport, "_paused", False):
            transport._paused = True
            transport.producer.pauseProducing()

    transport.write = bounded_write
    return largest


def test_a_slow_peer_crediting_many_streams_is_not_taken_for_one_that_stopped_reading(state, logs):
    """While our tunnel is paused (the peer reads slowly), its WINDOW frames release the
    data our streams read before the pause: one read per stream at most, in memory either
    way. Counted as backlog, 8 streams x 256 KiB went past the bound (256 KiB + 2 x max
    window) and a healthy tunnel was cut off; only what the peer makes us say counts."""
    settings = TunnelSettings(max_window=WINDOW)
    world = World(state, RelaySettings(tunnel_port=7835, tunnel=settings))
    agent = up(world, state, {9000: Target("127.0.0.1", 90)}, name="good", ports="9000")
    bound = defaults.MAX_PENDING_CONTROL + 2 * settings.max_window
    payload = bytes(range(256)) * (2 * WINDOW // 256)  # two windows: one sent, one pending
    streams = [stream(world, agent, 9000) for _ in range(8)]
    for client, _, _, _ in streams:
        client.dataReceived(payload)
    world.clock.advance(0)  # the end of the reactor turn, where bulk reads are sent
    relay_tunnel = agent.relay_tunnel
    pending = sum(len(c) for s in relay_tunnel.session._streams.values() for c in s.pending)
    assert pending == 8 * WINDOW > bound
    # The relay's frames reach the agent, whose targets take them and credit them ...
    agent.pump.clientIO.bufferReceived(agent.pump.serverIO.getOutBuffer())
    world.clock.advance(0)
    relay_tunnel.pauseProducing()  # ... while the relay's own socket is full
    one_way(agent)  # the WINDOWs arrive: every pending read is released into a paused tunnel
    assert not agent.pump.serverIO.disconnecting
    assert not matching(logs, "peer stopped reading")
    relay_tunnel.resumeProducing()
    agent.flush()
    for _, client_sock, _, target_sock in streams:
        assert target_sock.value() == payload and not client_sock.aborted


def test_ping_flood_from_a_peer_that_never_reads_is_cut_off(state, logs):
    settings = TunnelSettings(max_window=WINDOW)  # the bound is MAX_PENDING_CONTROL + 2 x max window
    world = World(state, RelaySettings(tunnel_port=7835, tunnel=settings))
    good = healthy(world, state)
    bad = Hostile(world, state)
    sock_limit = 64 * defaults.KiB
    largest = socket_buffer(bad.agent.pump.serverIO, sock_limit)
    bound = defaults.MAX_PENDING_CONTROL + 2 * settings.max_window
    batch = 1000
    pong = len(encode(Ping(0, ack=True)))
    backlog = 0
    for n in range(200):
        if bad.agent.pump.serverIO.disconnecting:
            break
        bad.send(*[Ping(n * batch + i) for i in range(batch)])
        one_way(bad.agent)
        backlog = max(backlog, bad.relay_tunnel._backlog_while_paused)
    assert bad.agent.pump.serverIO.disconnecting  # the relay aborted it
    assert n * batch * pong > bound  # it did ping past the bound
    # Counted: at most the bound plus the pongs of one read (32 KiB of pings), which it
    # then did not write. Written: the emulated socket buffer plus the write that crossed it
    # (the pongs of one read, at most one batch), then at most the bound.
    assert backlog <= bound + 32 * defaults.KiB
    assert largest[0] <= sock_limit + batch * pong + bound
    assert matching(logs, "peer stopped reading; closing")
    bad.flush()
    good.flush()
    assert "bad" not in world.relay.tunnels and 8080 not in world.relay.public
    assert_flows(world, good)


def test_thousands_of_ports_get_at_most_max_ports_and_the_refusals_are_logged_rate_limited(world, state, logs):
    assert RelaySettings().max_ports_per_agent == defaults.MAX_PORTS_PER_AGENT
    good = healthy(world, state)
    bad = Hostile(world, state, ports=None, expose={20000: Target("h", 1)})
    limit = defaults.MAX_PORTS_PER_AGENT
    many = list(range(20000, 22700))  # as many as fit in one CONTROL frame
    before = len(bad.frames)
    bad.send(Control({"type": "listen", "ports": many}))
    bad.flush()
    replies = [f.message for f in bad.frames[before:] if isinstance(f, Control)]
    ok = [m["port"] for m in replies if m["type"] == "listen_ok"]
    failed = [m for m in replies if m["type"] == "listen_fail"]
    assert ok == many[:limit]  # 20000 again, then new ones up to the maximum
    assert failed == []  # the rest were not even looked at
    owned = [p for p, f in world.relay.public.items() if f.tunnel is bad.relay_tunnel]
    assert len(owned) == limit
    assert matching(logs, f"only the first {limit}")
    # Asking again and again: every port refused, the relay's log does not grow with it.
    for _ in range(5):
        before = len(bad.frames)
        bad.send(Control({"type": "listen", "ports": many[limit:]}))
        bad.flush()
        fails = [f.message for f in bad.frames[before:] if isinstance(f, Control)]
        assert len(fails) == limit and all(m["type"] == "listen_fail" and "the maximum" in m["reason"] for m in fails)
    assert len([p for p, f in world.relay.public.items() if f.tunnel is bad.relay_tunnel]) == limit
    assert len(matching(logs, "refused: agent bad already has")) == 1
    assert len(matching(logs, f"only the first {limit}")) == 1
    assert bad.up
    assert_flows(world, good)


def test_unknown_control_messages_are_logged_rate_limited(world, state, logs):
    good = healthy(world, state)
    bad = Hostile(world, state)
    bad.send(*[Control({"type": f"junk{i}"}) for i in range(500)])
    bad.flush()
    assert bad.up
    assert len(matching(logs, "ignoring control message")) == 1
    assert_flows(world, good)


def test_max_agents_refuses_the_next_agent_alone_and_logs_it(state, logs):
    assert RelaySettings().max_agents == defaults.MAX_AGENTS
    world = World(state, RelaySettings(tunnel_port=7835, max_agents=2))
    good = healthy(world, state)
    other = up(world, state, {8080: Target("127.0.0.1", 80)}, name="a1", ports="8080")
    seen = []
    extra = []
    for i in range(10):
        agent = world.agent(token(state, f"x{i}", "9500"), {9500: Target("h", 1)})
        agent.service.go_away_received = lambda code, reason: seen.append((code, reason))
        agent.flush()
        extra.append(agent)
    assert not any(a.tunnel.welcomed or a.tunnel.connected_tunnel for a in extra)
    assert seen == [(ErrorCode.REFUSED, "the relay serves its maximum of 2 agents")] * 10
    assert sorted(world.relay.tunnels) == ["a1", "good"]
    assert 9500 not in world.relay.public
    assert len(matching(logs, "maximum of 2 agents")) == 1
    assert_flows(world, good)
    assert_flows(world, other, 8080)


def test_unauthenticated_flood_is_refused_and_logged_rate_limited(state, logs):
    assert RelaySettings().max_unauthenticated == defaults.MAX_UNAUTHENTICATED
    world = World(state, RelaySettings(tunnel_port=7835, max_unauthenticated=2))
    good = healthy(world, state)
    transports = []
    for _ in range(50):
        server = world.server_tls.buildProtocol(None)
        transports.append(iosim.FakeTransport(server, True))
        server.makeConnection(transports[-1])
    assert [t.disconnecting for t in transports] == [False, False] + [True] * 48
    assert world.relay.unauthenticated == 2
    assert len(matching(logs, "already handshaking")) == 1
    assert_flows(world, good)


# --- a hostile client ----------------------------------------------------------------------


def test_client_flood_beyond_max_streams_is_refused_alone(state, logs):
    world = World(state, RelaySettings(tunnel_port=7835, tunnel=TunnelSettings(max_streams=4)))
    agent = up(world, state)
    streams = [stream(world, agent) for _ in range(4)]
    refused = []
    for i in range(100):
        _, sock = world.public_client(8080, IPv4Address("TCP", "198.51.100.2", 1000 + i))
        refused.append(sock)
    agent.flush()
    assert all(s.aborted for s in refused)
    assert len(agent.targets.connects) == 4  # the agent never heard of the refused ones
    assert agent.relay_tunnel.session.stream_count == 4
    assert len(matching(logs, "refusing a client of port 8080")) == 1
    for i, (client, _client_sock, _target, target_sock) in enumerate(streams):
        client.dataReceived(b"stream %d" % i)
        agent.flush()
        assert target_sock.value() == b"stream %d" % i
    world.clock.advance(11)
    agent.flush()
    world.public_client(8080)
    assert matching(logs, "(99 more like this in the last 10 s)")


def test_default_max_streams_on_the_relay(world, state):
    bad = Hostile(world, state)  # never answers: every stream stays open
    for _ in range(defaults.MAX_STREAMS):
        world.public_client(8080)
    _, sock = world.public_client(8080)
    assert sock.aborted
    assert bad.relay_tunnel.session.stream_count == defaults.MAX_STREAMS


def test_client_flood_over_the_per_source_caps_is_refused_alone(state, logs):
    policy = PortPolicy(max_conns_per_ip=3, max_rate_per_ip=50)
    world = World(state, RelaySettings(tunnel_port=7835, port_policies={8080: policy}))
    agent = up(world, state)
    attacker = IPv4Address("TCP", "198.51.100.66", 1)
    built = [world.relay.public[8080].buildProtocol(attacker) for _ in range(200)]
    assert sum(p is not None for p in built) == 3
    assert world.relay.public[8080].gate.refused["concurrency"] == 197
    assert len(matching(logs, "public port 8080: refused a client")) == 1
    client, client_sock, target, target_sock = stream(world, agent)  # another source
    client.dataReceived(b"unaffected")
    agent.flush()
    assert target_sock.value() == b"unaffected"


# --- a hostile relay -----------------------------------------------------------------------


class FakeRelay(Protocol):
    """A relay double: says welcome and listen_ok to any hello, records every frame, sends raw frames."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.frames: list = []
        self.error: ProtocolError | None = None
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        try:
            new = self.decoder.feed(data)
        except ProtocolError as e:
            self.error = e
            return
        self.frames += new
        for frame in new:
            if isinstance(frame, Control) and frame.message["type"] == "hello":
                self.send(Control({"type": "welcome", "agent": "a1"}))
                self.send(*[Control({"type": "listen_ok", "port": p}) for p in frame.message["ports"]])

    def connectionLost(self, reason=None) -> None:
        self.lost = True

    def send(self, *frames) -> None:
        self.transport.write(b"".join(f if isinstance(f, bytes | bytearray) else encode(f) for f in frames))

    def of(self, kind) -> list:
        return [f for f in self.frames if isinstance(f, kind)]

    def data(self, stream_id: int) -> bytes:
        return b"".join(f.payload for f in self.of(Data) if f.stream_id == stream_id)

    def credit(self, stream_id: int) -> int:
        return sum(f.increment for f in self.of(Window) if f.stream_id == stream_id)


class Victim:
    """A real AgentService and AgentTunnel, connected over TLS to a FakeRelay."""

    def __init__(self, state, expose, tunnel=None):
        self.clock = MemoryReactorClock()
        self.relay = FakeRelay()
        server_tls = TLSMemoryBIOFactory(
            server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path),
            False,
            Factory.forProtocol(lambda: self.relay),
            clock=self.clock,
        )
        settings = AgentSettings(token="a1.secret", expose=expose, tunnel=tunnel or TunnelSettings())
        self.service = AgentService(self.clock, None, settings, relay_name="localhost:7835")
        self.service.running = True
        self.targets = FakeTargets()
        self.service.target_endpoint = self.targets.endpoint
        creator = client_options_for_ca("localhost", state.ca_cert_path)
        client_tls = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: AgentTunnel(self.service)), clock=self.clock)
        server = server_tls.buildProtocol(None)
        client = client_tls.buildProtocol(None)
        self.pump = iosim.connect(server, iosim.FakeTransport(server, True), client, iosim.FakeTransport(client, False), greet=False, clock=self.clock)
        self.tunnel: AgentTunnel = client.wrappedProtocol
        self.service._connected(self.tunnel)
        self.flush()
        assert self.tunnel.welcomed

    def flush(self) -> None:
        self.pump.flush()

    def open(self, stream_id: int, port: int) -> None:
        self.relay.send(Open(stream_id, port, "203.0.113.7", 40000))
        self.flush()

    def assert_only_configured_targets(self) -> None:
        allowed = set(self.service.settings.expose.values())
        assert all(target in allowed for target, _, _ in self.targets.connects)


EXPOSE = {8080: Target("127.0.0.1", 80), 8081: Target("127.0.0.1", 81)}


def test_relay_asking_for_unexposed_ports_is_refused_and_connects_nowhere(state, logs):
    victim = Victim(state, EXPOSE)
    ports = [22, 80, 443, 8082, 65535, 7835] * 20
    for i, port in enumerate(ports):
        victim.relay.send(Open(2 * i + 1, port, "10.0.0.1", 22))
    victim.flush()
    assert victim.targets.connects == []
    refusals = victim.relay.of(Reset)
    assert [r.stream_id for r in refusals] == [2 * i + 1 for i in range(len(ports))]
    assert {r.code for r in refusals} == {ErrorCode.NOT_ALLOWED}
    assert victim.tunnel.streams == {} and victim.tunnel.session.stream_count == 0
    assert len(matching(logs, "which this agent does not expose")) == 1
    # The agent is still up, and an exposed port goes to its one configured target.
    sid = 2 * len(ports) + 1
    victim.open(sid, 8081)
    assert [t for t, _, _ in victim.targets.connects] == [Target("127.0.0.1", 81)]
    target, target_sock = victim.targets.succeed()
    victim.relay.send(Data(sid, b"hello"))
    target.dataReceived(b"world")
    victim.flush()
    assert target_sock.value() == b"hello"
    assert victim.relay.data(sid) == b"world"
    victim.assert_only_configured_targets()


@pytest.mark.parametrize(
    "raw, why",
    [
        (HEADER.pack(1, 0, 0, 1, defaults.MAX_DATA_PAYLOAD + 1), "DATA frame of 65537 bytes exceeds"),
        (HEADER.pack(1, 7, 0, 0, 0xFFFFFFFF), "CONTROL frame of 4294967295 bytes exceeds"),
        (HEADER.pack(2, 5, 0, 0, 8) + bytes(8), "unsupported protocol version 2"),
        (HEADER.pack(1, 9, 0, 0, 0), "unknown frame type 9"),
        (HEADER.pack(1, 7, 0, 0, 3) + b"[1]", "not a JSON object"),
        (HEADER.pack(1, 2, 0, 1, 4) + bytes(4), "OPEN frame for port 0"),
        (HEADER.pack(1, 2, 0, 1, 6) + b"\x1f\x90\x00\x01\xff\xfe", "not UTF-8"),
        (encode(OpenOk(1)), "the relay sent OPEN_OK"),
        (encode(Open(2, 8080, "h", 1)), "out of sequence"),
        (HEADER.pack(1, 1, 0, 1, 4) + bytes(4), "zero increment"),
    ],
    ids=["data-too-big", "control-4g", "version", "type", "json", "port0", "utf8", "open_ok", "even-open", "window0"],
)
def test_malformed_frames_from_the_relay_close_the_tunnel_and_connect_nowhere(state, logs, raw, why):
    victim = Victim(state, EXPOSE)
    victim.relay.send(raw)
    victim.flush()
    assert victim.targets.connects == []
    goaways = victim.relay.of(GoAway)
    assert goaways and goaways[0].code == ErrorCode.PROTOCOL_ERROR and why in goaways[0].reason
    assert [line for line in matching(logs, "protocol error: ") if why in line]
    assert victim.relay.lost and not victim.tunnel.connected_tunnel
    assert victim.service._retry is not None and victim.service._retry.active()  # it will reconnect


def test_relay_that_never_grants_window_stops_the_target_being_read(state):
    victim = Victim(state, EXPOSE)
    victim.open(1, 8080)
    target, sock = victim.targets.succeed()
    victim.flush()
    sent = 0
    for _ in range(20):
        if sock.producerState == "paused":
            break
        target.dataReceived(b"t" * CHUNK)
        sent += CHUNK
        victim.flush()
    assert sock.producerState == "paused"
    assert victim.relay.data(1) == b"t" * WINDOW
    assert victim.tunnel.session.queued_bytes == sent - WINDOW <= CHUNK
    # Another stream is not affected.
    victim.open(3, 8081)
    target2, sock2 = victim.targets.succeed()
    target2.dataReceived(b"other")
    victim.relay.send(Data(3, b"in"))
    victim.flush()
    assert victim.relay.data(3) == b"other" and sock2.value() == b"in"
    victim.assert_only_configured_targets()


def test_relay_sending_beyond_the_window_resets_only_that_stream(state, logs):
    victim = Victim(state, EXPOSE)
    victim.open(1, 8080)
    victim.open(3, 8081)
    target1, sock1 = victim.targets.succeed(0)
    target3, sock3 = victim.targets.succeed(1)
    sock1.producer.pauseProducing()  # the target reads nothing: no credit goes back
    victim.relay.send(*[encode_data(1, b"r" * CHUNK) for _ in range(WINDOW // CHUNK + 3)])
    victim.flush()
    assert sock1.aborted and len(sock1.value()) == WINDOW
    assert Reset(1, ErrorCode.FLOW_CONTROL) in victim.relay.frames
    assert victim.relay.credit(1) == 0
    assert matching(logs, "beyond its window")
    victim.relay.send(Data(3, b"still here"))
    victim.flush()
    assert sock3.value() == b"still here" and not sock3.aborted
    assert victim.tunnel.connected_tunnel


def test_early_data_is_credited_once(state):
    """Data that arrives before the target is connected must be credited once, not twice:
    crediting it twice lets the relay have more than a window in flight."""
    victim = Victim(state, EXPOSE)
    victim.open(1, 8080)
    early = 100 * defaults.KiB
    victim.relay.send(Data(1, b"e" * (early // 2)), Data(1, b"e" * (early // 2)))
    victim.flush()
    assert victim.relay.credit(1) == 0  # nothing written to the target yet
    target, sock = victim.targets.succeed()
    victim.flush()
    assert sock.value() == b"e" * early
    assert victim.relay.credit(1) == early


def test_relay_opening_beyond_the_agents_stream_limit_is_refused_and_logged(state, logs):
    victim = Victim(state, EXPOSE, tunnel=TunnelSettings(max_streams=3))
    for i in range(50):
        victim.relay.send(Open(2 * i + 1, 8080, "10.0.0.1", 1))
    victim.flush()
    assert len(victim.targets.connects) == 3
    assert [r.stream_id for r in victim.relay.of(Reset)] == [2 * i + 1 for i in range(3, 50)]
    assert {r.code for r in victim.relay.of(Reset)} == {ErrorCode.REFUSED}
    assert len(matching(logs, "streams already open")) == 1
    target, sock = victim.targets.succeed(0)
    victim.relay.send(Data(1, b"first stream"))
    victim.flush()
    assert sock.value() == b"first stream"
    victim.assert_only_configured_targets()


def test_connect_failures_from_a_client_flood_are_logged_rate_limited(state, logs):
    victim = Victim(state, EXPOSE)
    for i in range(50):
        victim.open(2 * i + 1, 8080)
        victim.targets.connects[-1][1].errback(Failure(error.ConnectionRefusedError()))
    victim.flush()
    assert [r.code for r in victim.relay.of(Reset)] == [ErrorCode.CONNECT_FAILED] * 50
    assert len(matching(logs, "cannot reach 127.0.0.1:80")) == 1
    assert victim.tunnel.connected_tunnel


def test_client_flood_on_a_port_whose_target_is_down_is_logged_rate_limited_on_the_relay(world, state, logs):
    good = healthy(world, state)
    agent = up(world, state)
    socks = []
    for _ in range(50):
        _, sock = world.public_client(8080)
        agent.flush()
        agent.targets.connects[-1][1].errback(Failure(error.ConnectionRefusedError()))
        agent.flush()
        socks.append(sock)
    assert all(s.aborted for s in socks)
    assert agent.relay_tunnel.session.stream_count == 0 and agent.relay_tunnel.streams == {}
    assert len(matching(logs, "stream for port 8080 refused: CONNECT_FAILED")) == 1
    assert len(matching(logs, "cannot reach 127.0.0.1:80")) == 1
    assert_flows(world, good)


def test_bytes_after_a_protocol_error_are_neither_buffered_nor_logged_again(world, state, logs):
    """After a protocol error the tunnel is closing, but TLS still hands us what the peer sends
    until it closes too (up to the close grace): none of it may pile up in the decoder."""
    good = healthy(world, state)
    bad = Hostile(world, state)
    junk = HEADER.pack(0, 0, 0, 1, 4) + bytes(4)  # version 0
    bad.send(junk + b"j" * (2 * defaults.MiB))  # one write: the relay reads it all before closing
    bad.flush()
    good.flush()
    assert not bad.up
    assert bad.relay_tunnel.session.receive_buffered <= len(junk) + 64 * defaults.KiB
    assert len(matching(logs, "protocol error:")) == 1  # not once more per read of junk
    assert_flows(world, good)


def test_bytes_after_a_protocol_error_from_the_relay_are_not_buffered(state, logs):
    victim = Victim(state, EXPOSE)
    victim.relay.send(HEADER.pack(1, 9, 0, 0, 0) + b"j" * (2 * defaults.MiB))
    victim.flush()
    assert not victim.tunnel.connected_tunnel
    assert victim.tunnel.session.receive_buffered <= 12 + 64 * defaults.KiB
    assert len(matching(logs, "protocol error:")) == 1  # not once more per read of junk


def test_many_hellos_after_a_failed_one_are_not_read(world, state, logs):
    """A stranger whose hello failed must not get more tries (nor more log lines) from the
    frames it packed behind it, before the close completes."""
    good = healthy(world, state)
    token(state, "a1")
    calls = []
    verify = state.verify_token
    state.verify_token = lambda t: calls.append(t) or verify(t)
    stranger = world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)})
    hello = encode(Control({"type": "hello", "version": 1, "token": "a1.guess", "ports": [8080]}))
    stranger.tls.write(hello * 500)  # sent right after the handshake, with the agent's own hello
    stranger.flush()
    good.flush()
    assert not stranger.tunnel.welcomed and not stranger.tunnel.connected_tunnel
    assert len(calls) == 1
    assert len(matching(logs, "authentication failed (the token")) == 1
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def test_relay_repeating_listen_fail_keeps_one_retry_per_port(state, logs):
    victim = Victim(state, EXPOSE)
    victim.relay.send(*[Control({"type": "listen_fail", "port": 8080, "reason": "no"}) for _ in range(1000)])
    victim.relay.send(*[Control({"type": "listen_fail", "port": 22, "reason": "not ours"}) for _ in range(100)])
    victim.flush()
    retries = [c for c in victim.clock.getDelayedCalls() if c.func == victim.tunnel._ask_again]
    assert [c.args for c in retries] == [(8080,)]  # one pending retry, not a thousand timers
    assert len(matching(logs, "relay refused public port 8080")) == 1
    victim.clock.advance(retries[0].getTime() - victim.clock.seconds())  # 2.5-5 s: before any heartbeat
    victim.flush()
    asks = [f.message for f in victim.relay.of(Control) if f.message["type"] == "listen"]
    assert asks == [{"type": "listen", "ports": [8080]}]
    assert victim.tunnel.connected_tunnel


@pytest.mark.parametrize("port", [[8080], {"p": 1}, None, "8080", 8080.0])
def test_relay_sending_a_port_that_is_not_a_number_is_ignored(state, logs, port):
    victim = Victim(state, EXPOSE)
    victim.relay.send(Control({"type": "listen_ok", "port": port}), Control({"type": "listen_fail", "port": port}))
    victim.open(1, 8080)
    assert victim.tunnel.connected_tunnel
    assert [t for t, _, _ in victim.targets.connects] == [Target("127.0.0.1", 80)]
    assert not [c for c in victim.clock.getDelayedCalls() if c.func == victim.tunnel._ask_again]


def test_failed_authentications_from_one_address_log_one_line_per_interval(world, state, logs):
    good = healthy(world, state)
    token(state, "a1")
    for _ in range(30):
        world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)}).flush()
    assert len(matching(logs, "authentication failed (the token")) == 1
    world.clock.advance(10)
    world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)}).flush()
    assert matching(logs, "authentication failed (the token")[-1].endswith("(29 more like this in the last 10 s)")
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def test_failed_authentications_from_many_addresses_are_capped_in_all(world, state, logs):
    """One line per address would let a stranger with an IPv6 /64 write a line per connection."""
    from relay.logs import GROUP_LINES

    good = healthy(world, state)
    token(state, "a1")
    for i in range(GROUP_LINES + 20):
        world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)}, peer_host=f"203.0.113.{i}").flush()
    failed = matching(logs, "authentication failed (the token")
    assert len(failed) == GROUP_LINES
    assert [line.split(":")[0] for line in failed] == [f"tunnel 203.0.113.{i}" for i in range(GROUP_LINES)]
    world.clock.advance(10)
    world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)}, peer_host="192.0.2.9").flush()
    assert matching(logs, "authentication failed (the token")[-1].endswith("(20 more of this kind were not logged)")
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def _without_alpn():
    """A TLS client that offers no ALPN (and accepts any relay certificate)."""
    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from zope.interface import implementer

    @implementer(IOpenSSLClientConnectionCreator)
    class NoALPN:
        def __init__(self):
            self._options = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_3)
            self._options.getContext().set_verify(SSL.VERIFY_PEER, lambda *a: True)

        def clientConnectionForTLS(self, proto):  # noqa: N802 (Twisted's name)
            connection = self._options.clientConnectionForTLS(proto)
            connection.set_connect_state()
            return connection

    return NoALPN()


def _stranger_with_a_bad_frame(world, host):
    """A TLS client that never says hello and sends a frame of protocol version 0."""
    stranger = world.agent("x.y", {8080: Target("127.0.0.1", 80)}, peer_host=host)
    stranger.tunnel.tunnel_ready = lambda: None  # no hello
    stranger.flush()
    stranger.tls.write(HEADER.pack(0, 0, 0, 1, 4) + bytes(4))
    stranger.flush()
    assert not stranger.relay_tunnel.connected_tunnel


def _stranger_without_alpn(world, host):
    stranger = world.agent("x.y", {8080: Target("127.0.0.1", 80)}, creator=_without_alpn(), peer_host=host)
    stranger.flush()
    assert not stranger.relay_tunnel.connected_tunnel


@pytest.mark.parametrize(
    ("attack", "line"),
    [(_stranger_with_a_bad_frame, "protocol error:"), (_stranger_without_alpn, "did not negotiate ALPN")],
    ids=["bad-frame", "no-alpn"],
)
def test_what_strangers_provoke_before_hello_is_logged_once_per_address_and_capped(world, state, logs, attack, line):
    from relay.logs import GROUP_LINES

    good = healthy(world, state)
    for i in range(GROUP_LINES + 5):
        for _ in range(3):
            attack(world, f"203.0.113.{i}")
    def relays(lines):  # the stranger's own client logs the missing ALPN too
        return [entry for entry in matching(lines, line) if entry.startswith("tunnel 203.0.113.")]

    assert [entry.split(":")[0] for entry in relays(logs)] == [f"tunnel 203.0.113.{i}" for i in range(GROUP_LINES)]
    world.clock.advance(10)
    attack(world, "203.0.113.0")
    assert relays(logs)[-1].endswith(
        "(15 more of this kind were not logged) (2 more like this in the last 10 s)"
    )
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def test_silent_strangers_are_logged_once_per_address_and_capped(world, state, logs):
    """Connections that never start TLS each hold a handshake slot until the timeout; from
    many addresses they would still write up to a line per slot per timeout (25 lines/s at
    the defaults). Logged like the other failures before hello."""
    from relay.logs import GROUP_LINES

    good = healthy(world, state)

    def silent(host):
        address = IPv4Address("TCP", host, 40000)
        server = world.server_tls.buildProtocol(address)
        transport = iosim.FakeTransport(server, True, peerAddress=address)
        server.makeConnection(transport)
        return server, transport

    def time_out(connections):
        world.clock.advance(defaults.HANDSHAKE_TIMEOUT + 0.1)
        for server, transport in connections:
            assert transport.disconnecting
            server.connectionLost(Failure(error.ConnectionLost()))

    def relays(lines):
        return [entry for entry in matching(lines, "no TLS handshake and hello within") if entry.startswith("tunnel 203.0.113.")]

    time_out([silent(f"203.0.113.{i}") for i in range(GROUP_LINES + 5) for _ in range(3)])
    assert [entry.split(":")[0] for entry in relays(logs)] == [f"tunnel 203.0.113.{i}" for i in range(GROUP_LINES)]
    assert world.relay.unauthenticated == 0
    time_out([silent("203.0.113.0")])
    assert relays(logs)[-1].endswith("(15 more of this kind were not logged) (2 more like this in the last 10 s)")
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def test_strangers_saying_hello_while_agents_json_is_broken_are_logged_like_failures(world, state, logs):
    """Every hello needs agents.json; while it is broken, a stranger's hello logged an error
    line each time."""
    from relay.logs import GROUP_LINES

    good = healthy(world, state)
    state.agents_path.write_text("{half written")
    for i in range(GROUP_LINES + 5):
        for _ in range(3):
            world.agent("x.y", {8080: Target("127.0.0.1", 80)}, peer_host=f"203.0.113.{i}").flush()
    lines = [line for line in matching(logs, "cannot check its credential") if line.startswith("tunnel 203.0.113.")]
    assert [line.split(":")[0] for line in lines] == [f"tunnel 203.0.113.{i}" for i in range(GROUP_LINES)]
    assert world.relay.tunnels.keys() == {"good"}
    assert_flows(world, good)


def test_twisteds_accept_errors_on_a_public_port_are_limited(world, state, logs):
    """Out of descriptors, Twisted's accept loop closes each waiting client and logs three
    lines for it (EMFILE): a stranger that kept connecting wrote three lines a connection.
    The loop's logger, read from the port as tcp.Port.doRead does, is the relay's limited
    log."""
    from twisted.internet import tcp
    from twisted.internet.protocol import Factory

    from relay.listening import quiet_accept_errors

    port = tcp.Port(0, Factory(), interface="127.0.0.1", reactor=world.clock)  # never started
    quiet_accept_errors(port, world.relay._accept_log)
    for i in range(30):
        with tcp._BuffersLogs(port._logger.namespace, port._logger.observer) as log:  # as in doRead
            log.info("EMFILE encountered; releasing reserved file descriptor.")
            log.info("EMFILE recovery: Closed socket from {address}", address=("203.0.113.7", 40000 + i))
            log.info("Re-reserving EMFILE recovery file descriptor.")
    accept_lines = [line for line in logs if "EMFILE" in line]
    assert len(accept_lines) == 3
    assert all(line.startswith("public ports: ") for line in accept_lines)
    world.clock.advance(10)
    with tcp._BuffersLogs(port._logger.namespace, port._logger.observer) as log:
        log.info("EMFILE encountered; releasing reserved file descriptor.")
    assert [line for line in logs if "EMFILE" in line][-1].endswith("(29 more like this in the last 10 s)")


def test_an_authenticated_agents_protocol_error_is_always_logged(world, state, logs):
    """The limit is for strangers: an agent with a credential is named in every line."""
    for _ in range(3):
        bad = Hostile(world, state)
        bad.send(HEADER.pack(0, 0, 0, 1, 4) + bytes(4))
        bad.flush()
        assert not bad.up
    assert len(matching(logs, "protocol error:")) == 3
