"""Fuzz targets: arbitrary bytes into the frame decoder, the relay's tunnel (hello and after) and
the agent's tunnel. Each target takes one bytes value and raises AssertionError (or lets any
other exception out) when an invariant breaks; a ProtocolError is a normal outcome.

Used by tests/fuzz_frames.py (the long run, outside the suite) and tests/test_fuzz_corpus.py
(replays tests/fuzz_corpus/ in the normal suite). No sockets, no sleeps: transports are fakes
and the clock is a MemoryReactorClock.

Every target reads two bytes first: byte 0 picks the preamble to play (relay: PREAMBLES; agent:
0-2, see agent(); the decoder ignores it), byte 1 the size of the pieces the rest is fed in,
so one input always replays the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay import defaults
from relay.agent import AgentService, AgentSettings, AgentTunnel, Target
from relay.protocol.frames import (
    HEADER_SIZE,
    Control,
    FrameDecoder,
    ProtocolError,
    encode,
)
from relay.server import Relay, RelaySettings, RelayTunnel
from relay.state import State, init_state

from .inmemory import FakeSocket, FakeTargets

MAX_BUFFERED = HEADER_SIZE + defaults.MAX_DATA_PAYLOAD
TUNNEL_PORT = 7835
MAX_PORTS = 4
EXPOSE = {8080: Target("127.0.0.1", 80), 9000: Target("10.0.0.1", 22)}


# --- the decoder ----------------------------------------------------------------------------


def decoder(data: bytes) -> str:
    """Feed data[2:] in pieces (size picked by data[1]); only ProtocolError may come out, the
    buffer stays bounded, and every decoded frame but CONTROL re-encodes to itself."""
    dec = FrameDecoder()
    frames = []
    try:
        for piece in _pieces(data[1:]):
            frames += dec.feed(piece)
            assert dec.buffered < MAX_BUFFERED, dec.buffered
    except ProtocolError as e:
        assert str(e)
        return "error:" + _label(str(e))
    for frame in frames:
        if not isinstance(frame, Control):
            assert FrameDecoder().feed(encode(frame)) == [frame], frame
    return "ok:" + ",".join(sorted({type(f).__name__ for f in frames}))


def _label(message: str) -> str:
    return "".join("N" if c.isdigit() else c for c in message)[:60]


# --- the relay: hello, then anything ------------------------------------------------------------


_STATE: State | None = None
_TOKEN = ""


def _state() -> tuple[State, str]:
    global _STATE, _TOKEN
    if _STATE is None:
        root = Path(tempfile.mkdtemp(prefix="relay-fuzz-"))
        init_state(root / "st", ["localhost"])
        _STATE = State(root / "st")
        _TOKEN = _STATE.issue_token("fz", None)
    return _STATE, _TOKEN


def _hello(token, ports=(8080,)) -> bytes:
    return encode(Control({"type": "hello", "version": 1, "token": token, "ports": list(ports)}))


PREAMBLES = ("none", "hello", "hello+client", "bad-token", "hello+clients+advance")


def _piece_size(data: bytes) -> int:
    return 1 + (data[0] * 131 if data else 0)


def _pieces(data: bytes):
    """data[1:] in pieces of a size that data[0] picks (1 to 33 406 bytes)."""
    size = _piece_size(data)
    for start in range(1, len(data), size):
        yield data[start : start + size]


def _check_output(sock: FakeSocket) -> list:
    """What a side wrote must be well-formed relay/1: our own output never trips our decoder."""
    dec = FrameDecoder()
    frames = dec.feed(sock.value())
    assert dec.buffered == 0, "a side wrote a partial frame"
    return frames


def relay(data: bytes) -> str:
    state, token = _state()
    mode = PREAMBLES[data[0] % len(PREAMBLES)] if data else "none"
    rest = data[1:]
    clock = MemoryReactorClock()
    settings = RelaySettings(tunnel_port=TUNNEL_PORT, max_ports_per_agent=MAX_PORTS, max_agents=4)
    the_relay = Relay(clock, state, settings)
    tunnel = RelayTunnel(the_relay)
    sock = FakeSocket(IPv4Address("TCP", "198.51.100.1", 5000))
    tunnel.makeConnection(sock)
    clients = []
    if mode != "none":
        tunnel.dataReceived(_hello("fz.wrong" if mode == "bad-token" else token, (8080, 9000)))
    if mode.startswith("hello+") and 8080 in the_relay.public:
        for _ in range(3 if "clients" in mode else 1):
            client = the_relay.public[8080].buildProtocol(IPv4Address("TCP", "203.0.113.7", 40000))
            client_sock = FakeSocket()
            client.makeConnection(client_sock)
            clients.append((client, client_sock))
    outcome = "ok"
    for piece in _pieces(rest):
        if not tunnel.connected_tunnel:
            break
        tunnel.dataReceived(piece)
        if tunnel._close_timer is not None:
            outcome = "closed"
        if "advance" in mode:
            clock.advance(7)
        for client, client_sock in clients:
            if client_sock.aborted or client.stream_id not in tunnel.streams or client_sock.producerState == "paused":
                continue  # a paused socket delivers nothing
            client.dataReceived(b"c" * 1000)
        _invariants_relay(the_relay, tunnel, _piece_size(rest))
    frames = _check_output(sock)
    # Losing the tunnel gives everything back.
    tunnel.connectionLost(Failure(error.ConnectionDone()))
    assert the_relay.public == {}, the_relay.public
    assert the_relay.tunnels == {}
    assert the_relay.unauthenticated == 0
    assert all(s.aborted or s.disconnecting for _, s in clients)
    kinds = sorted({type(f).__name__ for f in frames})
    return f"{mode}:{outcome}:{','.join(kinds)}"


def _decoder_bounded(tunnel, piece: int) -> None:
    """A partial frame at most; after a protocol error, at most the read it came in (the
    decoder keeps that read, and the tunnel feeds it nothing more)."""
    limit = MAX_BUFFERED + piece if tunnel._broken else MAX_BUFFERED - 1
    assert tunnel.session.receive_buffered <= limit, tunnel.session.receive_buffered


def _invariants_relay(the_relay: Relay, tunnel: RelayTunnel, piece: int) -> None:
    ports = [p for p, f in the_relay.public.items() if f.tunnel is tunnel]
    assert len(ports) <= MAX_PORTS, ports
    low, high = defaults.AGENT_PORT_RANGE
    assert all(low <= p <= high and p != TUNNEL_PORT for p in ports), ports
    if tunnel.agent is None:
        assert ports == [] and the_relay.tunnels == {}
    assert tunnel.session.queued_bytes <= 3 * 1000  # the clients' unsent bytes, never more
    _decoder_bounded(tunnel, piece)


# --- the agent: welcome, then anything -----------------------------------------------------


def agent(data: bytes) -> str:
    mode = data[0] % 3 if data else 0  # 0: welcome first; 1: nothing first; 2: welcome, connect targets
    rest = data[1:]
    clock = MemoryReactorClock()
    service = AgentService(clock, None, AgentSettings(token="fz.x", expose=EXPOSE), relay_name="fuzz")
    targets = FakeTargets()
    service.target_endpoint = targets.endpoint
    tunnel = AgentTunnel(service)
    sock = FakeSocket(IPv4Address("TCP", "192.0.2.1", 7835))
    tunnel.makeConnection(sock)
    if mode != 1:
        tunnel.dataReceived(encode(Control({"type": "welcome", "agent": "fz"})))
    connected = 0
    for piece in _pieces(rest):
        if not tunnel.connected_tunnel:
            break
        tunnel.dataReceived(piece)
        # The agent connects nowhere but its configured targets.
        allowed = set(EXPOSE.values())
        assert all(target in allowed for target, _, _ in targets.connects), targets.connects
        if mode == 2:
            for index in range(connected, len(targets.connects)):
                _, d, _ = targets.connects[index]
                if d.called:
                    continue
                if index % 3 == 2:
                    d.errback(Failure(error.ConnectionRefusedError()))
                else:
                    targets.succeed(index)
                _no_failure(d)
            connected = len(targets.connects)
        assert tunnel.session.queued_bytes == 0  # nothing reads targets here, so nothing is held
        retries = [c for c in clock.getDelayedCalls() if c.func == tunnel._ask_again]
        assert len(retries) <= len(EXPOSE), len(retries)  # one pending retry per exposed port
        _decoder_bounded(tunnel, _piece_size(rest))
        for stream in tunnel.streams.values():
            early = sum(map(len, stream._early))
            assert early <= defaults.INITIAL_WINDOW, early
    frames = _check_output(sock)
    tunnel.connectionLost(Failure(error.ConnectionDone()))
    assert tunnel.streams == {}
    kinds = sorted({type(f).__name__ for f in frames})
    return f"{mode}:{len(targets.connects) > 0}:{','.join(kinds)}"


def _no_failure(d: defer.Deferred) -> None:
    result = getattr(d, "result", None)
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)
        raise AssertionError(f"a target connect callback failed: {result.getTraceback()}")


TARGETS = {"decoder": decoder, "relay": relay, "agent": agent}
