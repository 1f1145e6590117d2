"""Issue 2: the relay survives what strangers send to its tunnel port while a real stream keeps
working, and the agent comes back by itself when the relay is killed or stopped and restarted."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import struct
import time
from types import SimpleNamespace

import pytest

from .conftest import HOST, connect, echo_once, echo_roundtrip, free_ports

pytestmark = pytest.mark.e2e

HANDSHAKE_TIMEOUT = 2  # --handshake-timeout on the relay, so the silent cases are quick
HEADER = struct.Struct("!BBHII")  # docs/protocol.md §2: version, type, flags, stream id, length
PING, GOAWAY, CONTROL = 5, 6, 7
PROTOCOL_ERROR = 1


# --------------------------------------------------------------------------- one live stream


@pytest.fixture(scope="module")
def live(module_harness):
    """A relay, an agent and one echo stream held open through all the attacks of this module."""
    h = module_harness
    state = h.state()
    relay = h.relay(state, extra=["--handshake-timeout", str(HANDSHAKE_TIMEOUT)])
    echo = h.echo()
    (public,) = free_ports(1)
    agent = h.agent(relay, state.token("live"), {public: echo.port}, ca=state.ca)
    agent.wait_listening()
    held = connect(public, timeout=15)
    h.on_stop(held.close)
    ns = SimpleNamespace(state=state, relay=relay, agent=agent, public=public, held=held, rounds=0)
    roundtrip(ns)
    return ns


def roundtrip(live) -> None:
    """A byte-exact echo on the held stream, and one on a new connection."""
    live.rounds += 1
    payload = os.urandom(32 * 1024) + b"round %d" % live.rounds
    assert echo_roundtrip(live.held, payload) == payload
    assert echo_once(live.public, payload[:1000]) == payload[:1000]


def drain_until_closed(sock, timeout: float) -> bytes:
    """Read until the relay closes SOCK (EOF or reset); fail if it is still open after TIMEOUT."""
    sock.settimeout(timeout)
    got = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return bytes(got)
        except TimeoutError:
            pytest.fail(f"the relay kept the connection open for {timeout} s")
        if not chunk:
            return bytes(got)
        got += chunk
        if time.monotonic() > deadline:
            break
    pytest.fail(f"the relay kept the connection open for {timeout} s")


def tls_context(alpn: bool, ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        ctx.set_alpn_protocols(["relay/1"])
    return ctx


def parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of every whole frame in DATA."""
    frames = []
    for _ in range(1000):
        if len(data) < HEADER.size:
            break
        version, kind, flags, _stream, length = HEADER.unpack_from(data)
        assert version == 1
        if len(data) < HEADER.size + length:
            break
        frames.append((kind, flags, data[HEADER.size : HEADER.size + length]))
        data = data[HEADER.size + length :]
    return frames


def goaway_of(data: bytes) -> tuple[int, str]:
    for kind, _flags, payload in parse_frames(data):
        if kind == GOAWAY:
            code, _last = struct.unpack_from("!II", payload)
            return code, payload[8:].decode()
    pytest.fail(f"no GOAWAY among {parse_frames(data)}")


def stranger(live) -> socket.socket:
    """A connection to the tunnel port from a loopback address of its own per attack: the
    relay logs failed handshakes once per address per 10 s, and each attack checks its line."""
    stranger.count += 1
    return connect(live.relay.tunnel_port, source=f"127.0.0.{10 + stranger.count}")


stranger.count = 0


# Each attack opens a connection to the tunnel port and returns (socket, its local port,
# a check run once the relay closed it, a regex for the relay's reason after "tunnel HOST:PORT: ").


def garbage(live):
    sock = stranger(live)
    sock.sendall(bytes(range(256)) * 16)  # starts with 0x00: not a TLS record type
    return sock, None, r"closed before authenticating: .+"


def plain_http(live):
    sock = stranger(live)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: relay.example\r\nUser-Agent: e2e\r\n\r\n")

    def check(data: bytes) -> None:
        assert not data.startswith(b"HTTP/"), "the relay answered as a web server"

    return sock, check, r"closed before authenticating: .+"


def silent(live):
    sock = stranger(live)
    return sock, None, rf"no TLS handshake and hello within {HANDSHAKE_TIMEOUT} s; closing"


def huge_frame_after_handshake(live):
    raw = stranger(live)
    sock = tls_context(True, live.state.ca).wrap_socket(raw, server_hostname=HOST)
    assert sock.selected_alpn_protocol() == "relay/1"
    assert sock.version() == "TLSv1.3"
    # A CONTROL frame (limit 16 KiB) announcing 2**32-1 bytes of payload, and nothing else.
    sock.sendall(HEADER.pack(1, CONTROL, 0, 0, 0xFFFFFFFF))

    def check(data: bytes) -> None:
        code, reason = goaway_of(data)
        assert code == PROTOCOL_ERROR, (code, reason)
        assert "4294967295" in reason or "too large" in reason or "length" in reason, reason

    return sock, check, r"protocol error: .+"


def client_hello_without_alpn(live):
    """Plain TCP carrying the first flight of a TLS client that offers no ALPN, and then nothing."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context(False, live.state.ca).wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and hello[5] == 0x01, "not a TLS handshake record with a ClientHello"
    assert b"relay/1" not in hello
    sock = stranger(live)
    sock.sendall(hello)

    def check(data: bytes) -> None:
        assert data[:1] == b"\x16", (
            "the relay did not answer the ClientHello with a TLS handshake record"
        )

    return sock, check, rf"no TLS handshake and hello within {HANDSHAKE_TIMEOUT} s; closing"


def tls_without_alpn(live):
    """A whole TLS 1.3 handshake without ALPN: the relay says why in a GOAWAY and closes."""
    raw = stranger(live)
    sock = tls_context(False, live.state.ca).wrap_socket(raw, server_hostname=HOST)
    assert sock.selected_alpn_protocol() is None

    def check(data: bytes) -> None:
        assert goaway_of(data) == (PROTOCOL_ERROR, "peer did not negotiate ALPN relay/1")

    return sock, check, r"peer did not negotiate ALPN relay/1; closing"


@pytest.mark.parametrize(
    "attack",
    [
        garbage,
        plain_http,
        silent,
        huge_frame_after_handshake,
        client_hello_without_alpn,
        tls_without_alpn,
    ],
    ids=lambda f: f.__name__,
)
def test_stranger_on_the_tunnel_port(live, attack):
    relay, agent = live.relay, live.agent
    relay_mark, agent_mark = relay.mark(), agent.mark()
    roundtrip(live)  # before
    started = time.monotonic()
    sock, check, reason = attack(live)
    try:
        local_host, local_port = sock.getsockname()[:2]
        roundtrip(live)  # during: the stranger's connection is open
        data = drain_until_closed(sock, timeout=HANDSHAKE_TIMEOUT + 5)
        took = time.monotonic() - started
        if check is not None:
            check(data)
    finally:
        sock.close()
    relay.wait_for_log(rf"tunnel {re.escape(local_host)}:{local_port}: {reason}", timeout=5, after=relay_mark)
    if attack is silent:
        assert HANDSHAKE_TIMEOUT - 0.5 <= took <= HANDSHAKE_TIMEOUT + 3, took
    roundtrip(live)  # after
    assert relay.alive() and agent.alive()
    agent.assert_not_logged(r"tunnel to the relay lost|reconnecting", after=agent_mark)
    relay.assert_not_logged(r"Unhandled|Traceback", after=relay_mark)


# --------------------------------------------------------------------------- relay restarts


def _pair(harness):
    state = harness.state()
    relay = harness.relay(state)
    echo = harness.echo()
    (public,) = free_ports(1)
    agent = harness.agent(
        relay,
        state.token("restarts"),
        {public: echo.port},
        ca=state.ca,
        extra=["--reconnect-max", "2"],
    )
    agent.wait_listening()
    assert echo_once(public, b"before") == b"before"
    return state, relay, agent, public


def _back(harness, figures, state, old, agent, public, agent_mark: int, what: str) -> None:
    relay = harness.relay(state, tunnel_port=old.tunnel_port)  # same state dir, same port
    ready = time.monotonic()
    agent.wait_up(timeout=10, after=agent_mark)
    agent.wait_listening(timeout=10, after=agent_mark)
    payload = os.urandom(64 * 1024)
    assert echo_once(public, payload) == payload
    took = time.monotonic() - ready
    figures(
        f"{what}: the agent serves its port again {took:.2f} s after the new relay listens (--reconnect-max 2)"
    )
    assert took < 6.0
    relay.wait_for_log(r"agent restarts connected")


def test_relay_sigkill_and_restart(harness, figures):
    state, relay, agent, public = _pair(harness)
    held = connect(public)
    harness.on_stop(held.close)
    assert echo_roundtrip(held, b"held") == b"held"
    mark = agent.mark()
    relay.signal(signal.SIGKILL)
    assert relay.wait_exit(10) == -signal.SIGKILL
    agent.wait_for_log(r"tunnel to the relay lost", timeout=10, after=mark)
    # While the relay is down the agent keeps trying (refused), with backoff capped at 2 s.
    agent.wait_for_log(r"cannot connect to the relay .*refused", timeout=10, after=mark, count=2)
    with pytest.raises((EOFError, ConnectionError)):
        held.settimeout(5)
        echo_roundtrip(held, b"x")
    _back(harness, figures, state, relay, agent, public, mark, "relay SIGKILL + restart")
    agent.assert_not_logged(r"going away", after=mark)  # nobody could tell it


def test_relay_sigterm_goaway_and_restart(harness, figures):
    state, relay, agent, public = _pair(harness)
    mark = agent.mark()
    relay.signal(signal.SIGTERM)
    agent.wait_for_log(
        r"the relay is going away: the relay is shutting down", timeout=10, after=mark
    )
    # A clean stop; twistd re-raises the signal that stopped it, so the status is -SIGTERM.
    assert relay.wait_exit(15) in (0, -signal.SIGTERM)
    relay.wait_for_log(r"Main loop terminated", timeout=1)
    relay.assert_not_logged(r"Unhandled|Traceback")
    agent.wait_for_log(r"tunnel to the relay lost", timeout=10, after=mark)
    agent.wait_for_log(r"cannot connect to the relay .*refused", timeout=10, after=mark)
    _back(harness, figures, state, relay, agent, public, mark, "relay SIGTERM + restart")
