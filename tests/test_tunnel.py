"""The relay and agent tunnel protocols in memory: real TLS through iosim, a hand-advanced clock,
fake sockets for public clients and targets. No sockets, no sleeps."""

from __future__ import annotations

import gc
import socket

import pytest
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure
from twisted.test import iosim

from relay import defaults, tlswire
from relay.agent import AgentTunnel, Target
from relay.protocol import ErrorCode
from relay.protocol.frames import HEADER, Data, FrameDecoder, GoAway, encode_data
from relay.server import RelaySettings
from relay.state import State, init_state
from relay.tls import PinnedClientOptions, client_options_for_ca
from relay.tunnel import BULK_READ, STREAM_READ_SIZE, TunnelSettings

from .inmemory import FakeSocket, World, garbage_left_by, stream, token, up


@pytest.fixture
def world(state):
    return World(state)


# --- authentication and ports --------------------------------------------------------


def test_agent_authenticates_and_relay_listens(world, state):
    agent = up(world, state, {8080: Target("127.0.0.1", 80), 9000: Target("::1", 22)})
    assert agent.tunnel.welcomed
    assert world.relay.tunnels["a1"] is agent.relay_tunnel
    assert sorted(world.relay.public) == [8080, 9000]
    assert [(p, i) for p, _, _, i in world.clock.tcpServers] == [(8080, ""), (9000, "")]
    assert agent.service.attempt == 0


def test_bad_token_is_refused_and_nothing_listens(world, state):
    token(state)
    agent = world.agent("a1.not-the-secret", {8080: Target("127.0.0.1", 80)})
    agent.flush()
    assert not agent.tunnel.welcomed
    assert world.relay.tunnels == {}
    assert world.relay.public == {}
    assert world.clock.tcpServers == []
    assert not agent.tunnel.connected_tunnel  # the relay closed it


def test_refused_port_alone_is_refused_and_asked_again(world, state):
    agent = up(world, state, {8080: Target("127.0.0.1", 80), 7000: Target("127.0.0.1", 70)})
    assert sorted(world.relay.public) == [8080]
    retry = [c for c in world.clock.getDelayedCalls() if c.func == agent.tunnel._ask_again]
    assert len(retry) == 1 and retry[0].args == (7000,)
    # Asked again after the delay, refused again: the next try backs off further.
    first_at = retry[0].getTime()
    world.clock.advance(defaults.LISTEN_RETRY_INITIAL + 1)
    agent.flush()
    again = [c for c in world.clock.getDelayedCalls() if c.func == agent.tunnel._ask_again]
    assert len(again) == 1 and again[0].args == (7000,)
    assert again[0].getTime() - world.clock.seconds() >= defaults.LISTEN_RETRY_INITIAL  # upper half of 2x
    assert again[0].getTime() > first_at
    assert sorted(world.relay.public) == [8080]  # 8080 kept serving throughout


def test_tunnel_port_and_privileged_ports_are_refused(world, state):
    agent = up(world, state, {7835: Target("127.0.0.1", 80), 80: Target("127.0.0.1", 80), 8080: Target("h", 1)}, ports=None)
    assert sorted(world.relay.public) == [8080]
    assert agent.tunnel.connected_tunnel


def test_port_served_by_another_agent_is_refused_for_the_second(world, state):
    first = up(world, state, {8080: Target("127.0.0.1", 80)}, name="a1", ports="8080")
    second = up(world, state, {8080: Target("127.0.0.1", 81), 9000: Target("127.0.0.1", 82)}, name="a2", ports="8080,9000")
    assert world.relay.public[8080].tunnel is first.relay_tunnel
    assert world.relay.public[9000].tunnel is second.relay_tunnel
    assert first.tunnel.connected_tunnel and second.tunnel.connected_tunnel


def test_same_agent_reconnecting_takes_over_at_once(world, state):
    tok = token(state)
    old = world.agent(tok, {8080: Target("127.0.0.1", 80)})
    old.flush()
    client, client_sock, _, _ = stream(world, old)
    new = world.agent(tok, {8080: Target("127.0.0.1", 81)})
    new.flush()
    old.flush()
    assert world.relay.tunnels["a1"] is new.relay_tunnel
    assert world.relay.public[8080].tunnel is new.relay_tunnel  # no re-listen, no gap
    assert len(world.clock.tcpServers) == 1
    assert not old.tunnel.connected_tunnel
    assert client_sock.aborted  # streams of the replaced tunnel go with it
    assert old.service._next_delay == old.service.settings.reconnect_max
    _, _, target, _ = stream(world, new)
    assert target.target == Target("127.0.0.1", 81)


# --- streams -------------------------------------------------------------------------


def test_bytes_flow_both_ways_to_the_configured_target(world, state):
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    assert agent.targets.connects[0][0] == Target("127.0.0.1", 80)
    client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    agent.flush()
    assert target_sock.value() == b"GET / HTTP/1.0\r\n\r\n"
    target.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nhi")
    agent.flush()
    assert client_sock.value() == b"HTTP/1.0 200 OK\r\n\r\nhi"


def test_stream_sockets_are_read_256_kib_at_a_time(world, state):
    agent = up(world, state)
    _, client_sock, _, target_sock = stream(world, agent)
    assert client_sock.bufferSize == target_sock.bufferSize == STREAM_READ_SIZE == 256 * 1024


def test_one_read_of_bulk_data_reaches_the_target_in_one_write(world, state):
    # 256 KiB read from the client is four 64 KiB DATA frames; delivered together from one
    # TLS read, they go to the target socket in one writeSequence, not four writes.
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    data = bytes(range(256)) * 1024
    client.dataReceived(data)
    agent.flush()
    assert target_sock.value() == data
    assert target_sock.sequences == [4]
    target_sock.clear()
    target_sock.sequences.clear()
    client.dataReceived(b"small")  # the window was credited back: more flows, one write
    agent.flush()
    assert target_sock.value() == b"small" and target_sock.sequences == [1]


def record_libssl(monkeypatch, name: str) -> list:
    """Record each call tlswire makes of libssl's `name` (through pyOpenSSL's binding): the
    SSL or BIO it was made on, the length it asked for (the last argument), what it returned."""
    calls = []
    lib = tlswire._lib

    class Recording:
        def __getattr__(self, attr):
            return getattr(lib, attr)

    def recorded(*args):
        out = getattr(lib, name)(*args)
        calls.append((args[0], args[-1], out))
        return out

    recording = Recording()
    setattr(recording, name, recorded)
    monkeypatch.setattr(tlswire, "_lib", recording)
    return calls


def made_by(calls: list, tls) -> list:
    """(asked, returned) of the recorded calls made on TLS transport `tls`'s connection."""
    connection = tls._tlsConnection
    handles = {connection._ssl, connection._from_ssl, connection._into_ssl}
    return [(asked, out) for handle, asked, out in calls if handle in handles]


def test_a_large_tunnel_write_leaves_tls_in_one_bio_read(world, state, monkeypatch):
    # The send BIO is read once, sized by what it holds: not a second call to prove it
    # empty, and not copied again into bytes (pyOpenSSL's bio_read does both).
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    reads = record_libssl(monkeypatch, "BIO_read")
    data = bytes(range(256)) * 1024
    client.dataReceived(data)
    world.clock.advance(0)  # the end of the reactor turn
    relay_reads = made_by(reads, agent.relay_tunnel.transport)
    assert len(relay_reads) == 1 and relay_reads[0][0] == relay_reads[0][1] > len(data)
    agent.flush()
    assert target_sock.value() == data


def test_what_a_turn_queued_leaves_before_the_next_tunnel_read_is_handled(world, state):
    # An echo's reply, read from the target, waits for the end of the reactor turn; but
    # not behind a tunnel read (under load, 256 KiB of a bulk stream's frames) that the
    # same turn brings: it is written first.
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    tls = agent.tls
    order = []
    original = tls.writeSequence
    tls.writeSequence = lambda chunks: (order.append(("written", len(target_sock.value()))), original(chunks))
    target.dataReceived(b"reply")
    assert order == []  # the turn is not over
    stream_id = next(iter(agent.tunnel.streams))
    agent.tunnel.dataReceived(encode_data(stream_id, b"bulk" * 1000))
    assert order[0] == ("written", 0)  # before the read's data reached the target
    assert target_sock.value() == b"bulk" * 1000
    agent.flush()
    assert client_sock.value() == b"reply"


def record_data_frames(tunnel) -> list[tuple[int, int]]:
    """(stream id, payload size) of every DATA frame `tunnel` writes from now on, in order."""
    sent: list[tuple[int, int]] = []
    decoder = FrameDecoder()
    original = tunnel.transport.writeSequence

    def writeSequence(chunks):
        for frame in decoder.feed(b"".join(bytes(c) for c in chunks)):
            if isinstance(frame, Data) and frame.payload:
                sent.append((frame.stream_id, len(frame.payload)))
        original(chunks)

    tunnel.transport.writeSequence = writeSequence
    return sent


def test_a_bulk_read_is_sent_after_the_small_reads_of_the_same_turn(world, state):
    # One reactor turn reads a bulk stream's 256 KiB, then an echo's few bytes (epoll
    # hands out the socket that became ready first). The echo's frame leaves first: the
    # bulk read is framed, encrypted and sent at the end of the turn.
    agent = up(world, state)
    bulk, _, _, bulk_target = stream(world, agent)
    echo, _, _, echo_target = stream(world, agent)
    sent = record_data_frames(agent.relay_tunnel)
    data = bytes(range(256)) * 1024
    bulk.dataReceived(data)
    assert sent == []
    echo.dataReceived(b"ping")
    world.clock.advance(0)  # the end of the turn
    assert sent[0] == (echo.stream_id, 4)
    assert sent[1:] == [(bulk.stream_id, 64 * 1024)] * 4
    agent.flush()
    assert bulk_target.value() == data and echo_target.value() == b"ping"


def bulk_read_waits(world, agent, client, target_sock) -> bool:
    """Whether a 256 KiB read of the relay's `client` waited for the end of the reactor
    turn; either way it must then reach the target whole."""
    sent = record_data_frames(agent.relay_tunnel)
    data = bytes(range(256)) * 1024
    client.dataReceived(data)
    waited = sent == []
    world.clock.advance(0)  # the end of the turn
    assert sent == [(client.stream_id, 64 * 1024)] * 4
    agent.flush()
    assert target_sock.value() == data
    return waited


def test_a_bulk_read_of_the_only_open_stream_is_sent_at_once(world, state):
    # Alone it makes no one wait, and the wait would cost it CPU per byte (bench/).
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    assert not bulk_read_waits(world, agent, client, target_sock)


def test_a_closed_stream_no_longer_makes_bulk_reads_wait(world, state):
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    other, _, _, _ = stream(world, agent)
    assert world.relay.open_streams.count == 2
    other.connectionLost(Failure(error.ConnectionLost()))
    assert world.relay.open_streams.count == 1
    assert not bulk_read_waits(world, agent, client, target_sock)


def test_a_stream_of_another_agent_makes_bulk_reads_wait(world, state):
    # The relay's reactor serves every agent's tunnel: one agent's bulk stream makes way
    # for another agent's small one.
    first = up(world, state)
    second = up(world, state, {9000: Target("127.0.0.1", 90)}, name="a2", ports="9000")
    client, _, _, target_sock = stream(world, first)
    stream(world, second, 9000)
    assert bulk_read_waits(world, first, client, target_sock)


def test_what_a_stream_reads_behind_its_waiting_bulk_read_keeps_its_place(world, state):
    # Data read after a bulk read still waiting for the end of the turn, and the FIN,
    # go after it.
    agent = up(world, state)
    bulk, _, _, bulk_target = stream(world, agent)
    stream(world, agent)  # a second stream open: bulk reads wait
    data = bytes(range(256)) * 1024
    bulk.dataReceived(data)
    bulk.dataReceived(b"tail")
    bulk.readConnectionLost()
    world.clock.advance(0)
    agent.flush()
    assert bulk_target.value() == data + b"tail"
    assert bulk_target.write_closed


def test_a_bulk_read_waiting_when_its_client_resets_is_sent_before_the_reset(world, state):
    agent = up(world, state)
    bulk, _, _, bulk_target = stream(world, agent)
    stream(world, agent)  # a second stream open: bulk reads wait
    data = bytes(range(256)) * 1024
    bulk.dataReceived(data)
    bulk.connectionLost(Failure(error.ConnectionLost()))  # then a reset, in the same turn
    world.clock.advance(0)
    agent.flush()
    assert bulk_target.value() == data
    assert bulk_target.aborted


def test_a_bulk_tunnel_read_is_handled_after_the_small_reads_of_the_same_turn(world, state):
    # At the agent, one reactor turn reads 256 KiB or more of the tunnel (a bulk stream's
    # frames), then an echo target's reply. The reply is read and written before the
    # tunnel read is decrypted and delivered, not after.
    agent = up(world, state)
    bulk, _, _, bulk_target = stream(world, agent)
    _, echo_sock, echo_target, _ = stream(world, agent)
    data = bytes(range(256)) * 1024
    bulk.dataReceived(data)  # the relay sends it: more than 256 KiB of ciphertext
    world.clock.advance(0)
    ciphertext = agent.pump.serverIO.getOutBuffer()
    assert len(ciphertext) >= tlswire.BULK_TUNNEL_READ
    order = []
    original = agent.tls.writeSequence
    agent.tls.writeSequence = lambda chunks: (order.append(len(bulk_target.value())), original(chunks))
    agent.pump.clientIO.bufferReceived(ciphertext)  # one read of the tunnel
    assert bulk_target.value() == b""  # not yet: the turn is not over
    echo_target.dataReceived(b"reply")
    world.clock.advance(0)
    assert order[0] == 0  # the reply left before the bulk read reached its target
    assert bulk_target.value() == data
    agent.flush()
    assert echo_sock.value() == b"reply"


def test_a_small_tunnel_read_is_handled_at_once(world, state):
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    stream(world, agent)
    client.dataReceived(b"x" * 1000)
    world.clock.advance(0)
    agent.pump.clientIO.bufferReceived(agent.pump.serverIO.getOutBuffer())
    assert target_sock.value() == b"x" * 1000  # no clock advance needed


def test_a_bulk_tunnel_read_waiting_when_the_tunnel_closes_is_delivered_first(world, state):
    agent = up(world, state)
    bulk, _, _, bulk_target = stream(world, agent)
    stream(world, agent)
    data = bytes(range(256)) * 1024
    bulk.dataReceived(data)
    world.clock.advance(0)
    agent.pump.clientIO.bufferReceived(agent.pump.serverIO.getOutBuffer())
    assert bulk_target.value() == b""
    agent.tls.connectionLost(Failure(error.ConnectionDone()))
    assert bulk_target.value() == data


@pytest.mark.parametrize("end", ["relay", "agent with --ca", "agent with --pin"])
def test_a_bulk_read_is_encrypted_in_whole_record_aligned_writes(world, state, monkeypatch, end):
    # pyOpenSSL turns on partial writes (one record, 16 KiB, per SSL_write call); every
    # tunnel connection turns them off, whatever made its context. A 256 KiB read (four
    # 64 KiB frames, each a 12-byte header and its payload) is written in nine calls, each
    # but the last a whole number of records, and each takes all it is given.
    creator = PinnedClientOptions("127.0.0.1", state.ca_pin()) if end == "agent with --pin" else None
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, creator=creator)
    agent.flush()
    client, client_sock, target, target_sock = stream(world, agent)
    tls = agent.relay_tunnel.transport
    if end != "relay":
        client, client_sock, target, target_sock = target, target_sock, client, client_sock
        tls = agent.tls
    writes = record_libssl(monkeypatch, "SSL_write")
    data = bytes(range(256)) * 1024
    client.dataReceived(data)
    calls = made_by(writes, tls)
    assert [asked for asked, _ in calls] == [16384, 49152] * 4 + [4 * 12]
    assert all(out == asked for asked, out in calls)
    agent.flush()
    assert target_sock.value() == data


def test_received_plaintext_reaches_the_tunnel_as_a_view_of_one_read(world, state, monkeypatch):
    # Decrypted records go to the tunnel as one read-only view of a buffer SSL_read filled
    # (not a bytes copy per record, then a join of them), and the stream's socket gets
    # views of it.
    agent = up(world, state)
    client, _, _, target_sock = stream(world, agent)
    seen = []
    original = type(agent.tunnel).dataReceived
    monkeypatch.setattr(type(agent.tunnel), "dataReceived", lambda self, data: (seen.append(data), original(self, data)))
    data = bytes(range(256)) * 1024
    client.dataReceived(data)
    agent.flush()
    assert target_sock.value() == data
    assert seen and all(type(d) is memoryview and d.readonly for d in seen)
    assert sum(map(len, seen)) == len(data) + 4 * 12  # all of it, in as few views as reads


def test_a_tunnel_read_of_up_to_a_mebibyte_is_one_delivery(world, state, monkeypatch):
    # Four streams' 256 KiB reads arrive in one TCP read of the tunnel: their plaintext
    # reaches the tunnel in one call (one reactor turn, one decode), not one per 256 KiB.
    agent = up(world, state)
    streams = [stream(world, agent) for _ in range(4)]
    seen = []
    original = type(agent.tunnel).dataReceived
    monkeypatch.setattr(type(agent.tunnel), "dataReceived", lambda self, data: (seen.append(len(data)), original(self, data)))
    data = bytes(range(256)) * 1024
    for client, _, _, _ in streams:
        client.dataReceived(data)
    agent.flush()
    assert [sock.value() == data for _, _, _, sock in streams] == [True] * 4
    assert seen[0] >= 2**20  # a whole mebibyte at once (it was 256 KiB at most)


def test_interleaved_streams_are_delivered_in_order_each(world, state):
    agent = up(world, state)
    a, _, _, a_target = stream(world, agent)
    b, _, _, b_target = stream(world, agent)
    for i in range(3):  # one TLS read carries a1 b1 a2 b2 a3 b3
        a.dataReceived(b"a%d" % i)
        b.dataReceived(b"b%d" % i)
    agent.flush()
    assert a_target.value() == b"a0a1a2" and b_target.value() == b"b0b1b2"


def record_write_order(**socks) -> list[str]:
    """The names of `socks` in the order they are written to from now on, once per send."""
    order: list[str] = []
    for name, sock in socks.items():
        original = sock.writeSequence
        sock.writeSequence = lambda chunks, name=name, original=original: (
            order.append(name),
            original(chunks),
        )
    return order


def test_a_read_delivers_its_smaller_streams_first_each_in_order(world, state):
    # One tunnel read brings a bulk stream's frames with an echo's among them: the echo's
    # bytes go to its socket first, not after the bulk stream's send; each stream's bytes
    # keep their order, and a stream's frames of the read leave in one send.
    agent = up(world, state)
    _, _, bulk, bulk_sock = stream(world, agent)
    _, _, echo, echo_sock = stream(world, agent)
    _, _, other, other_sock = stream(world, agent)
    order = record_write_order(bulk=bulk_sock, echo=echo_sock, other=other_sock)
    payload = [bytes([i]) * 65536 for i in range(3)]
    read = b"".join(
        [
            encode_data(bulk.stream_id, payload[0]),
            encode_data(other.stream_id, b"o" * 100),
            encode_data(bulk.stream_id, payload[1]),
            encode_data(echo.stream_id, b"ping"),
            encode_data(bulk.stream_id, payload[2]),
            encode_data(other.stream_id, b"p" * 100),
        ]
    )
    agent.tunnel.dataReceived(read)
    assert order == ["echo", "other", "bulk"]
    assert echo_sock.value() == b"ping"
    assert other_sock.value() == b"o" * 100 + b"p" * 100
    assert bulk_sock.value() == b"".join(payload)
    assert bulk_sock.sequences == [3]  # the three frames in one send


def test_a_fin_ends_the_run_that_is_reordered(world, state):
    # DATA is reordered only up to the next other event: a stream's FIN, or its reset,
    # comes after everything the read brought before it, whatever its size.
    agent = up(world, state)
    _, _, bulk, bulk_sock = stream(world, agent)
    _, _, echo, echo_sock = stream(world, agent)
    order = record_write_order(bulk=bulk_sock, echo=echo_sock)
    read = (
        encode_data(bulk.stream_id, b"b" * 65536)
        + encode_data(bulk.stream_id, b"", fin=True)
        + encode_data(echo.stream_id, b"ping")
    )
    agent.tunnel.dataReceived(read)
    assert order == ["bulk", "echo"]
    assert bulk_sock.write_closed and bulk_sock.value() == b"b" * 65536
    assert echo_sock.value() == b"ping"


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        (IPv4Address("TCP", "203.0.113.7", 40000), "203.0.113.7"),
        (IPv6Address("TCP", "2001:db8::7", 40001), "2001:db8::7"),
        (IPv6Address("TCP", "::ffff:203.0.113.8", 40002), "203.0.113.8"),  # a v4 client on a dual-stack port
    ],
)
def test_the_open_names_the_public_clients_address(world, state, peer, host):
    agent = up(world, state)
    opened = []
    stream_opened = agent.tunnel.stream_opened
    agent.tunnel.stream_opened = lambda event: (opened.append(event), stream_opened(event))
    world.public_client(8080, peer)
    agent.flush()
    assert [(e.port, e.client_host, e.client_port) for e in opened] == [(8080, host, peer.port)]


def test_early_data_waits_for_the_target_connection(world, state):
    agent = up(world, state)
    client, client_sock = world.public_client(8080)
    client.dataReceived(b"hello before connect")
    agent.flush()
    assert len(agent.targets.connects) == 1
    # What waits is a copy, not a view that would keep the whole TLS read alive.
    assert [type(c) for c in agent.tunnel.streams[1]._early] == [bytes]
    target, target_sock = agent.targets.succeed()
    agent.flush()
    assert target_sock.value() == b"hello before connect"


def test_a_target_connected_inside_connect_gets_open_data_and_fin_of_one_read(world, state):
    """relay/dial.py connects a loopback target inside endpoint.connect(), before the
    agent has stored the Deferred: the OPEN, the request and the FIN of one TLS read all
    reach the target, in order, and the ACCEPT goes back."""
    agent = up(world, state)
    agent.targets.at_once = True
    client, client_sock = world.public_client(8080)
    client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    client.readConnectionLost()
    agent.flush()
    (target_sock,) = agent.targets.sockets
    assert target_sock.value() == b"GET / HTTP/1.0\r\n\r\n" and target_sock.write_closed
    stream = agent.tunnel.streams[1]
    assert stream.connecting is None
    stream.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n")
    stream.readConnectionLost()
    agent.flush()
    assert client_sock.value() == b"HTTP/1.0 200 OK\r\n\r\n" and client_sock.write_closed


class SocketTransport(FakeSocket):
    """A fake TCP transport over one end of a real socketpair (no network): read_at_once
    reads the socket itself, as it would a TCP socket's."""

    def __init__(self, sock):
        super().__init__()
        self.socket = sock


class ResetSocket(socket.socket):
    def recv(self, *args):
        raise ConnectionResetError(104, "Connection reset by peer")


def public_client_over(world, sock):
    proto = world.relay.public[8080].buildProtocol(None)
    transport = SocketTransport(sock)
    proto.makeConnection(transport)
    return proto, transport


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_what_a_client_sent_before_its_accept_leaves_with_the_open(world, state, pair):
    agent = up(world, state)
    ours, client = pair
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    proto, transport = public_client_over(world, ours)
    assert proto.stream_id == 1 and not transport.aborted
    agent.flush()  # the OPEN and the request reach the agent before its target connects
    assert agent.tunnel.streams[1]._early == [b"GET / HTTP/1.1\r\n\r\n"]
    target, target_sock = agent.targets.succeed()
    agent.flush()
    assert target_sock.value() == b"GET / HTTP/1.1\r\n\r\n"  # no dataReceived from the reactor


def test_nothing_sent_yet_is_nothing_read(world, state, pair):
    agent = up(world, state)
    ours, client = pair
    proto, transport = public_client_over(world, ours)
    agent.flush()
    target, target_sock = agent.targets.succeed()
    agent.flush()
    assert target_sock.value() == b"" and not transport.aborted
    client.sendall(b"later")  # the reactor's read, as usual
    proto.dataReceived(ours.recv(100))
    agent.flush()
    assert target_sock.value() == b"later"


def test_a_client_reset_before_its_accept_is_a_reset(world, state, pair):
    agent = up(world, state)
    ours, client = pair
    resetting = ResetSocket(fileno=socket.dup(ours.fileno()))
    try:
        proto, transport = public_client_over(world, resetting)
        assert transport.aborted  # not left for the reactor, which would see a clean EOF
    finally:
        resetting.close()
    proto.connectionLost(Failure(error.ConnectionAborted()))  # what the abort ends in
    agent.flush()
    assert not world.relay.tunnels["a1"].session.has_stream(1)
    assert 1 not in agent.tunnel.streams  # reset at the agent too, its connect given up
    assert agent.targets.connects[0][1].called


def test_a_write_after_lose_connection_is_dropped_as_twisted_does(world, state, monkeypatch):
    agent = up(world, state)
    tls = agent.tls
    writes = record_libssl(monkeypatch, "SSL_write")
    tls.unregisterProducer()
    tls.loseConnection()
    tls.write(b"late")
    tls.writeSequence([b"late", b"r"])
    assert made_by(writes, tls) == []


def test_an_ssl_write_that_fails_ends_the_tunnel_with_the_error(world, state):
    agent = up(world, state)
    client, _, _, _ = stream(world, agent)
    tls = agent.relay_tunnel.transport
    tls._tlsConnection.shutdown()  # close_notify sent: OpenSSL refuses to write after it
    lost = []
    agent.relay_tunnel.connectionLost = lambda reason: lost.append(reason)
    client.dataReceived(bytes(BULK_READ))  # written at once
    assert tls._lostTLSConnection
    agent.flush()
    assert len(lost) == 1 and "protocol is shutdown" in str(lost[0].value)


def test_half_close_each_way(world, state):
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    client.readConnectionLost()  # the client shut down its sending side
    agent.flush()
    assert target_sock.write_closed
    target.dataReceived(b"still talking")
    agent.flush()
    assert client_sock.value() == b"still talking"
    target.readConnectionLost()
    agent.flush()
    assert client_sock.write_closed
    assert not client_sock.aborted and not target_sock.aborted


def test_reset_propagates_as_reset(world, state):
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    client.connectionLost(Failure(error.ConnectionLost("reset by peer")))
    agent.flush()
    assert target_sock.aborted
    client2, client2_sock, target2, target2_sock = stream(world, agent)
    target2.connectionLost(Failure(error.ConnectionLost()))
    agent.flush()
    assert client2_sock.aborted


def test_target_unreachable_resets_the_client(world, state):
    agent = up(world, state)
    client, client_sock = world.public_client(8080)
    agent.flush()
    agent.targets.connects[0][1].errback(Failure(error.ConnectionRefusedError()))
    agent.flush()
    assert client_sock.aborted
    assert agent.tunnel.connected_tunnel  # other streams carry on


def test_relay_cannot_make_the_agent_connect_elsewhere(world, state):
    agent = up(world, state)
    relay_tunnel = agent.relay_tunnel
    sid = relay_tunnel.session.open_stream(9001, "203.0.113.9", 1)  # a port the agent never exposed
    relay_tunnel.flush()
    agent.flush()
    assert agent.targets.connects == []
    assert not relay_tunnel.session.has_stream(sid)  # the agent answered RESET NOT_ALLOWED
    assert agent.tunnel.connected_tunnel


def test_stalled_target_stops_credit_and_the_client_stops_being_read(world, state):
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    target.pauseProducing()  # the target's socket buffer is full
    chunk = b"x" * 65536
    sent = 0
    for _ in range(20):
        if client_sock.producerState == "paused":
            break
        client.dataReceived(chunk)
        sent += len(chunk)
        agent.flush()
    assert client_sock.producerState == "paused"  # the relay stopped reading the client
    assert sent <= defaults.INITIAL_WINDOW + 65536
    assert len(target_sock.value()) <= defaults.INITIAL_WINDOW  # the agent holds at most one window
    # Another stream is not affected.
    c2, c2_sock, t2, t2_sock = stream(world, agent)
    c2.dataReceived(b"ping")
    agent.flush()
    assert t2_sock.value() == b"ping"
    # The target drains: credit flows, the client is read again, every byte arrives.
    target.resumeProducing()
    agent.flush()
    assert client_sock.producerState == "producing"
    client.dataReceived(b"tail")
    agent.flush()
    assert target_sock.value() == b"x" * sent + b"tail"


def test_full_tunnel_pauses_every_stream(world, state):
    agent = up(world, state)
    _, s1, _, _ = stream(world, agent)
    _, s2, _, _ = stream(world, agent)
    agent.relay_tunnel.pauseProducing()
    assert s1.producerState == s2.producerState == "paused"
    agent.relay_tunnel.resumeProducing()
    assert s1.producerState == s2.producerState == "producing"


# --- liveness, limits, bad input ---------------------------------------------------------


def test_silent_tunnel_is_declared_dead_and_ports_are_freed(world, state):
    settings = TunnelSettings(heartbeat_interval=5, dead_after=3)
    world.relay.settings = RelaySettings(tunnel_port=7835, tunnel=settings)
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, tunnel=settings)
    agent.flush()
    assert 8080 in world.relay.public
    world.clock.advance(5)  # heartbeats flow while the path is alive
    agent.flush()
    assert agent.tunnel.connected_tunnel
    for _ in range(4):  # the path dies: nothing is pumped any more
        world.clock.advance(5)
    assert agent.relay_tunnel.transport.disconnecting
    assert agent.tunnel.transport.disconnecting
    agent.flush()  # the loss reaches both protocols
    assert world.relay.public == {}
    assert world.relay.tunnels == {}
    assert [c for c in world.clock.getDelayedCalls() if c.func == agent.service._connect] or not agent.service.running


def test_dead_tunnel_is_noticed_at_dead_timeout_not_a_heartbeat_later(world, state):
    """Silence is judged from the last byte received, to the moment: with 5 s x 3 a tunnel
    whose last byte came at t is dead at t + 15 s, not at the first PING after that."""
    settings = TunnelSettings(heartbeat_interval=5, dead_after=3)
    world.relay.settings = RelaySettings(tunnel_port=7835, tunnel=settings)
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, tunnel=settings)
    agent.flush()
    world.clock.advance(7)  # between heartbeats, both ends hear each other one last time
    agent.tunnel.session.send_ping()
    agent.tunnel.flush()
    agent.flush()
    last_heard = world.clock.seconds()
    for _ in range(149):  # the path dies; a tenth of a second at a time
        world.clock.advance(0.1)
    assert not agent.relay_tunnel.transport.disconnecting  # 14.9 s of silence: not yet
    world.clock.advance(0.15)
    assert world.clock.seconds() - last_heard < 15.1
    assert agent.relay_tunnel.transport.disconnecting
    assert agent.tunnel.transport.disconnecting


def silent_relay(world, state, connect_timeout=3.0):
    """An agent connected to something that accepts the TCP connection and never answers."""
    from twisted.internet.protocol import Factory

    from relay.agent import AgentService, AgentSettings, AgentTunnel
    from relay.tlswire import TunnelTLSFactory

    settings = AgentSettings(token=token(state, "a1"), expose={8080: Target("127.0.0.1", 80)}, connect_timeout=connect_timeout)
    service = AgentService(world.clock, None, settings, relay_name="localhost:7835")
    creator = client_options_for_ca("localhost", state.ca_cert_path)
    client = TunnelTLSFactory(creator, True, Factory.forProtocol(lambda: AgentTunnel(service)), clock=world.clock).buildProtocol(None)
    transport = iosim.FakeTransport(client, True)
    client.makeConnection(transport)
    return service, client.wrappedProtocol, transport


def test_the_agent_gives_up_on_a_relay_that_never_answers_after_its_connect_timeout(world, state, logs):
    """--connect-timeout covers the TLS handshake and the welcome, not only TCP: a silent
    peer used to hold each attempt until the dead-tunnel check (45 s at the defaults)."""
    service, tunnel, transport = silent_relay(world, state, connect_timeout=3.0)
    world.clock.advance(2.9)
    assert not transport.disconnecting
    world.clock.advance(0.2)
    assert transport.disconnecting and tunnel.timed_out
    assert [line for line in logs if "did not complete the TLS handshake and accept this agent within 3 s" in line]


def test_a_welcomed_tunnel_outlives_the_connect_timeout(world, state):
    agent = up(world, state)
    assert agent.tunnel.welcomed
    world.clock.advance(30)
    agent.flush()
    assert agent.tunnel.connected_tunnel and not agent.tunnel.timed_out


def test_a_relay_that_refuses_the_agent_is_not_reported_as_silent(world, state, logs):
    """A GOAWAY before the welcome (a bad token) is the relay's answer: the agent logs what
    the relay said, never that the relay did not answer."""
    agent = world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)})
    agent.flush()
    assert not agent.tunnel.welcomed and agent.tunnel._welcome_timer is None
    world.clock.advance(30)
    agent.flush()
    assert not [line for line in logs if "did not complete the TLS handshake" in line]
    assert not agent.tunnel.timed_out


def test_stopping_the_agent_before_the_relay_answered_does_not_wait_for_a_goodbye(world, state):
    """No session to say GOAWAY on: the connection is dropped at once, not after the 5 s
    close grace."""
    service, tunnel, transport = silent_relay(world, state)
    service.running = True
    service.tunnel = tunnel
    assert service.stopService() is None
    assert transport.disconnecting


def test_handshake_timeout_closes_a_silent_connection(world):
    server = world.server_tls.buildProtocol(None)
    transport = iosim.FakeTransport(server, True)
    server.makeConnection(transport)
    assert world.relay.unauthenticated == 1
    world.clock.advance(defaults.HANDSHAKE_TIMEOUT + 0.1)
    assert transport.disconnecting
    server.connectionLost(Failure(error.ConnectionDone()))
    assert world.relay.unauthenticated == 0


def test_unauthenticated_connections_are_capped(state):
    world = World(state, RelaySettings(tunnel_port=7835, max_unauthenticated=2))
    transports = []
    for _ in range(3):
        server = world.server_tls.buildProtocol(None)
        transports.append(iosim.FakeTransport(server, True))
        server.makeConnection(transports[-1])
    assert [t.disconnecting for t in transports] == [False, False, True]
    assert world.relay.unauthenticated == 2


def test_unauthenticated_connections_are_capped_per_source(state):
    """One address cannot take every handshake slot: past its own cap it alone is refused."""
    from twisted.internet.address import IPv4Address

    world = World(state, RelaySettings(tunnel_port=7835, max_unauthenticated_per_ip=2))

    def connect(host):
        server = world.server_tls.buildProtocol(None)
        transport = iosim.FakeTransport(server, True, peerAddress=IPv4Address("TCP", host, 40000))
        server.makeConnection(transport)
        return server, transport

    crowd = [connect("198.51.100.9") for _ in range(3)]
    assert [t.disconnecting for _, t in crowd] == [False, False, True]
    other, other_transport = connect("198.51.100.10")
    assert not other_transport.disconnecting
    assert world.relay.unauthenticated_by_source == {"198.51.100.9": 2, "198.51.100.10": 1}
    crowd[0][0].connectionLost(Failure(error.ConnectionDone()))
    assert world.relay.unauthenticated_by_source["198.51.100.9"] == 1
    _, again = connect("198.51.100.9")
    assert not again.disconnecting
    # and a real agent from yet another address still gets in
    agent = up(world, state)
    assert agent.tunnel.welcomed


def test_protocol_error_closes_only_that_tunnel(world, state):
    good = up(world, state, {9000: Target("127.0.0.1", 80)}, name="good", ports="9000")
    bad = up(world, state, {8080: Target("127.0.0.1", 80)}, name="bad", ports="8080")
    c, c_sock, t, t_sock = stream(world, good, 9000)
    bad.tls.write(HEADER.pack(1, 0, 0, 99, 4) + b"evil")  # DATA for a stream never opened
    bad.flush()
    good.flush()
    assert not bad.tunnel.connected_tunnel
    assert 8080 not in world.relay.public
    c.dataReceived(b"still fine")
    good.flush()
    assert t_sock.value() == b"still fine"


def test_huge_frame_header_is_refused_before_buffering(world, state):
    agent = up(world, state)
    agent.tls.write(HEADER.pack(1, 0, 0, 1, 0xFFFFFFFF))
    agent.flush()
    assert not agent.tunnel.connected_tunnel
    assert world.relay.tunnels == {}


def test_goaway_reason_reaches_the_agent(world, state):
    agent = up(world, state)
    seen = []
    agent.service.go_away_received = lambda code, reason: seen.append((code, reason))
    agent.relay_tunnel.close(ErrorCode.SHUTDOWN, "maintenance")
    agent.flush()
    assert seen == [(ErrorCode.SHUTDOWN, "maintenance")]


def test_relay_drain_says_goaway_and_stops_listening(world, state):
    agent = up(world, state)
    seen = []
    agent.service.go_away_received = lambda code, reason: seen.append(code)
    d = world.relay.drain()
    agent.flush()
    assert seen == [ErrorCode.SHUTDOWN]
    assert world.relay.public == {}
    world.clock.advance(0.2)
    assert d.called


# --- TLS identity ---------------------------------------------------------------------


def test_pinned_ca_is_accepted(world, state):
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, creator=PinnedClientOptions("127.0.0.1", state.ca_pin()))
    agent.flush()
    assert agent.tunnel.welcomed


def test_wrong_pin_never_sends_the_token(world, state, tmp_path):
    init_state(tmp_path / "other", ["localhost"])
    other_pin = State(tmp_path / "other").ca_pin()
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, creator=PinnedClientOptions("localhost", other_pin))
    seen = []
    agent.relay_tunnel.control_received = seen.append
    agent.flush()
    assert not agent.tunnel.welcomed
    assert seen == []  # no hello, so the token never left the agent
    assert world.relay.public == {}


def test_wrong_ca_or_wrong_name_is_refused(world, state, tmp_path):
    init_state(tmp_path / "other", ["localhost"])
    wrong_ca = world.agent(token(state), {8080: Target("h", 1)}, creator=client_options_for_ca("localhost", State(tmp_path / "other").ca_cert_path))
    wrong_ca.flush()
    wrong_name = world.agent(token(state), {8080: Target("h", 1)}, creator=client_options_for_ca("relay.example.com", state.ca_cert_path))
    wrong_name.flush()
    assert not wrong_ca.tunnel.welcomed and not wrong_name.tunnel.welcomed
    assert world.relay.tunnels == {}


def test_decoder_sees_goaway_on_auth_failure(world, state):
    token(state)
    agent = world.agent("a1.wrong", {8080: Target("127.0.0.1", 80)})
    frames = []
    original = agent.tunnel.dataReceived

    def spy(data):
        frames.extend(decoder.feed(data))
        original(data)

    decoder = FrameDecoder()
    agent.tunnel.dataReceived = spy
    agent.flush()
    goaways = [f for f in frames if isinstance(f, GoAway)]
    assert goaways and goaways[0].code == ErrorCode.AUTH_FAILED


def test_client_without_alpn_is_closed(world, state):
    from OpenSSL import SSL
    from twisted.internet import ssl

    class NoALPN:
        def __init__(self):
            self._options = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_3)
            self._options.getContext().set_verify(SSL.VERIFY_PEER, lambda *a: True)

        def clientConnectionForTLS(self, proto):
            connection = self._options.clientConnectionForTLS(proto)
            connection.set_connect_state()
            return connection

    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from zope.interface import directlyProvides

    creator = NoALPN()
    directlyProvides(creator, IOpenSSLClientConnectionCreator)
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, creator=creator)
    agent.flush()
    assert not agent.tunnel.welcomed
    assert world.relay.tunnels == {}


def test_pin_of_a_ca_the_leaf_does_not_chain_to_is_refused(state, tmp_path):
    """A CA certificate is public: putting it into a chain must not make a foreign leaf pass."""
    from OpenSSL import crypto

    from relay.tls import parse_pin, pin_matches

    init_state(tmp_path / "evil", ["localhost"])
    evil = State(tmp_path / "evil")
    ours_ca = crypto.load_certificate(crypto.FILETYPE_PEM, state.ca_cert_path.read_bytes())
    ours_leaf = crypto.load_certificate(crypto.FILETYPE_PEM, state.server_cert_path.read_bytes())
    evil_leaf = crypto.load_certificate(crypto.FILETYPE_PEM, evil.server_cert_path.read_bytes())
    pin = parse_pin(state.ca_pin())
    assert pin_matches(pin, [ours_leaf, ours_ca])
    assert not pin_matches(pin, [evil_leaf, ours_ca])
    leaf_pin = parse_pin(state.ca_pin())  # sanity: a leaf pin is checked on the leaf itself
    assert not pin_matches(leaf_pin, [evil_leaf])


def test_ca_pin_refuses_an_agent_certificate_posing_as_the_relay(state):
    """The CA that `relay init` makes also signs agents' client certificates: one of them, with
    its key, must not pass for the relay with agents that pin the CA."""
    from OpenSSL import crypto

    from relay.tls import parse_pin, pin_matches

    issued = state.issue_certificate("mallory")
    ca = crypto.load_certificate(crypto.FILETYPE_PEM, state.ca_cert_path.read_bytes())
    agent_leaf = crypto.load_certificate(crypto.FILETYPE_PEM, issued.pem)
    server_leaf = crypto.load_certificate(crypto.FILETYPE_PEM, state.server_cert_path.read_bytes())
    pin = parse_pin(state.ca_pin())
    assert pin_matches(pin, [server_leaf, ca])
    assert not pin_matches(pin, [agent_leaf, ca])
    # Pinning that very certificate is another matter: the pin then is the identity.
    assert pin_matches(parse_pin(issued.fingerprint), [agent_leaf])


def test_agent_pinning_the_ca_never_sends_its_token_to_an_agent_certificate(world, state):
    """In memory over real TLS: a relay that presents an agent certificate (and its key) gets
    no hello from an agent that pins the CA, so never its token."""
    from twisted.internet import ssl

    from relay.tlswire import TunnelTLSFactory

    impostor = ssl.PrivateCertificate.loadPEM(state.issue_certificate("mallory").pem)
    ca = ssl.Certificate.loadPEM(state.ca_cert_path.read_bytes())
    options = ssl.CertificateOptions(
        privateKey=impostor.privateKey.original,
        certificate=impostor.original,
        extraCertChain=[ca.original],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        acceptableProtocols=[b"relay/1"],
    )
    world.server_tls = TunnelTLSFactory(options, False, world.relay.tunnel_factory(), clock=world.clock)
    pinned = PinnedClientOptions("localhost", state.ca_pin())
    agent = world.agent(token(state), {8080: Target("127.0.0.1", 80)}, creator=pinned)
    seen = []
    agent.relay_tunnel.control_received = seen.append
    agent.flush()
    assert not agent.tunnel.welcomed
    assert seen == []
    assert world.relay.public == {}


def test_open_the_agent_never_answers_is_reset_and_frees_its_slot(world, state):
    """A target connect that never completes (here: never answered at all) must not hold the
    public client, and its stream slot, for as long as the tunnel lives."""
    world.relay.settings = RelaySettings(tunnel_port=7835, open_timeout=30.0)
    agent = up(world, state)
    hung, hung_sock = world.public_client(8080)
    agent.flush()
    assert len(agent.targets.connects) == 1  # the agent got the OPEN and is connecting
    interval = TunnelSettings().heartbeat_interval
    for _ in range(3):  # heartbeats at 15, 30, 45 s: expired at the first one past 30 s
        world.clock.advance(interval)
        agent.flush()
    assert hung_sock.aborted
    assert world.relay.tunnels, "the tunnel itself stays up"
    client, client_sock, target, target_sock = stream(world, agent)
    client.dataReceived(b"still works")
    agent.flush()
    assert target_sock.value() == b"still works"


def test_tunnel_reads_leave_no_reference_cycles(world, state):
    # Each TLS read of the tunnel ends in WANT_READ. pyOpenSSL raises it; kept with its
    # traceback, it held every frame up the stack, and with them the read and its
    # decrypt buffer, in a cycle only the garbage collector freed (relay/tlswire.py).
    agent = up(world, state)
    client, _, target, target_sock = stream(world, agent)
    data = bytes(range(256)) * 256
    client.dataReceived(data)
    agent.flush()
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            client.dataReceived(data)
            target.dataReceived(b"ack")
            agent.flush()
        garbage = gc.collect()
    finally:
        gc.enable()
    assert target_sock.value() == data * 21
    assert garbage == 0


def test_a_tunnel_is_freed_without_the_garbage_collector(world, state):
    # Every connection to the tunnel port makes a RelayTunnel, a stranger's that never
    # gets past TCP too, and every attempt of the agent an AgentTunnel. Their throttled
    # log held a Logger bound to the tunnel itself (Logger is a descriptor whose
    # instance-bound copy names the instance as its source): a reference cycle each, with
    # the session and the TLS protocol in it, that only the garbage collector freed.
    agent = up(world, state)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            world.relay.tunnel_factory().buildProtocol(None)
            AgentTunnel(agent.service)
        garbage = gc.collect()
    finally:
        gc.enable()
    assert garbage == 0


STRANGER = IPv4Address("TCP", "203.0.113.9", 40000)


def stranger(world, send=b"", wait=0.0):
    """A connection to the tunnel port that never authenticates. It ends as tcp.Connection
    ends one: the transport lets go of its producer, then the protocol is told."""
    server = world.server_tls.buildProtocol(STRANGER)
    sock = FakeSocket(STRANGER)
    server.makeConnection(sock)
    if send:
        server.dataReceived(send)
    if wait:
        world.clock.advance(wait)
    sock.producer = None
    server.connectionLost(Failure(error.ConnectionAborted() if sock.aborted else error.ConnectionDone()))
    return sock


@pytest.mark.parametrize(
    ("send", "wait", "cap"),
    [
        (b"", 0.0, 8),
        (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", 0.0, 8),
        (b"", defaults.HANDSHAKE_TIMEOUT + 0.1, 8),
        (b"", 0.0, 1),
    ],
    ids=["hangs-up", "not-tls", "silent-until-the-handshake-timeout", "over-the-per-source-cap"],
)
def test_what_strangers_connections_leave_is_freed_without_the_garbage_collector(state, send, wait, cap):
    # Every tunnel registers itself as the producer of its TLS transport; Twisted's TLS
    # protocol kept it after the connection was lost. A tunnel that ended without an
    # orderly close() (refused, timed out, failed TLS, aborted, dead) stayed a reference
    # cycle, at the rate strangers connect.
    world = World(state, RelaySettings(tunnel_port=7835, max_unauthenticated_per_ip=cap))
    waiting = world.server_tls.buildProtocol(STRANGER)  # one still handshaking, throughout
    waiting.makeConnection(FakeSocket(STRANGER))
    assert stranger(world, send, wait).aborted == (cap == 1 or wait > 0)
    assert garbage_left_by(lambda: stranger(world, send, wait)) == 0


def test_public_ports_let_go_of_are_freed_without_the_garbage_collector(world, state, monkeypatch):
    # A listening port keeps its factory (tcp.Port.factory), and the factory kept the port:
    # every public port an agent let go of (it left, was revoked, or the relay drained) was
    # a reference cycle.
    class Port:  # as tcp.Port; MemoryReactor's keeps every factory in tcpServers instead
        def __init__(self, factory):
            self.factory = factory

        def stopListening(self):
            return defer.succeed(None)

    monkeypatch.setattr(world.clock, "listenTCP", lambda port, factory, backlog=50, interface="": Port(factory))
    agent = up(world, state, {8080: Target("127.0.0.1", 80), 9000: Target("127.0.0.1", 90)})
    tunnel = agent.relay_tunnel

    def listen_and_release():
        assert world.relay.listen(tunnel, 8080) is None and world.relay.listen(tunnel, 9000) is None
        world.relay.release_ports(tunnel)
        assert world.relay.public == {}

    assert garbage_left_by(listen_and_release) == 0


def test_a_dead_tunnel_is_freed_without_the_garbage_collector(state):
    # The heartbeat that finds a tunnel dead aborts it and schedules no other: the fired
    # DelayedCall stayed in _heartbeat, holding the tunnel's own _beat, a reference cycle
    # on either end. (A connection that stays silent past the dead timeout, within a long
    # handshake timeout: the same heartbeat as an agent's tunnel, without iosim's cycles.)
    world = World(
        state,
        RelaySettings(tunnel_port=7835, handshake_timeout=60, tunnel=TunnelSettings(heartbeat_interval=1.0, dead_after=2)),
    )
    waiting = world.server_tls.buildProtocol(STRANGER)
    waiting.makeConnection(FakeSocket(STRANGER))

    def falls_silent():
        assert stranger(world, wait=2.5).aborted  # by the heartbeat: the handshake has 60 s

    assert garbage_left_by(falls_silent) == 0
