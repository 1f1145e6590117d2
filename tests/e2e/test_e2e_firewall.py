"""Issue 3: the agent behind a firewall. Out through a real proxy (pproxy) for every scheme,
its only way out; wrong proxy credentials and refused destinations are logged clearly; and
a half-dead tunnel (a path that stops passing bytes without closing) is detected by both
sides' heartbeats, the relay frees the public port, and the agent comes back."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from .conftest import (
    HOST,
    connect,
    echo_once,
    echo_roundtrip,
    free_ports,
    port_accepts,
    read_line,
    recv_exactly,
    wait_until,
)
from .netutil import Forwarder, tcp_connections

pytestmark = pytest.mark.e2e

USER = "fw-user"
PASSWORD = "pw-Zq8x7Lk2Vb"  # distinctive: it must never appear in a log


def assert_secret_free(*procs) -> None:
    for proc in procs:
        assert PASSWORD not in proc.log(), f"the proxy password appears in the {proc.kind}'s log"


# --------------------------------------------------------------------------- through pproxy


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        pytest.param("socks5://127.0.0.1:{port}", "socks5://127.0.0.1:{port}", id="socks5"),
        pytest.param(
            f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"socks5://{USER}:{PASSWORD}@127.0.0.1:{{port}}",
            id="socks5-auth",
        ),
        # pproxy speaks no SOCKS4a; with the relay given as an IPv4 literal, socks4a sends
        # the address itself, which any SOCKS4 proxy takes.
        pytest.param(
            f"socks4://127.0.0.1:{{port}}#{USER}",
            f"socks4a://{USER}@127.0.0.1:{{port}}",
            id="socks4a",
        ),
        pytest.param("socks4://127.0.0.1:{port}", "socks4://127.0.0.1:{port}", id="socks4"),
        pytest.param("http://127.0.0.1:{port}", "http://127.0.0.1:{port}", id="http"),
        pytest.param(
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"http://{USER}:{PASSWORD}@127.0.0.1:{{port}}",
            id="http-basic",
        ),
    ],
)
def test_tunnel_through_real_proxy(harness, pproxy, listen: str, url: str):
    proxy_port = pproxy(listen)
    state = harness.state()
    relay = harness.relay(state)
    echo = harness.echo()
    (public,) = free_ports(1)
    agent = harness.agent(
        relay,
        state.token("behind-proxy"),
        {public: echo.port},
        ca=state.ca,
        extra=["--proxy", url.format(port=proxy_port), "--connect-timeout", "5"],
    )
    agent.wait_for_log(
        r"reaching the relay through the proxy (socks5|socks4a|socks4|http)://(\*\*\*@)?127\.0\.0\.1:"
    )
    agent.wait_listening()

    payload = os.urandom(256 * 1024)
    with connect(public) as client:
        assert echo_roundtrip(client, payload) == payload

        # With a stream open, the agent holds exactly: one connection to the proxy (the
        # tunnel) and its connection to the inside target. Nothing to the relay directly.
        wait_until(lambda: echo.active == 1, 5, "the agent's connection to the echo target")
        conns = tcp_connections(agent.pid)
        remotes = [remote for _, remote, _ in conns]
        assert (HOST, relay.tunnel_port) not in remotes, f"the agent bypassed the proxy: {conns}"
        assert remotes.count((HOST, proxy_port)) == 1, f"not one tunnel through the proxy: {conns}"
        assert set(remotes) <= {(HOST, proxy_port), (HOST, echo.port)}, (
            f"unexpected connections: {conns}"
        )

        # And the relay's tunnel peer is pproxy's outgoing socket, not the agent's.
        tunnel_peers = {
            remote
            for local, remote, _ in tcp_connections(relay.pid)
            if local[1] == relay.tunnel_port
        }
        proxy_locals = {local for local, _, _ in tcp_connections(pproxy.pid(proxy_port))}
        agent_locals = {local for local, _, _ in conns}
        assert tunnel_peers, "the relay holds no tunnel connection"
        assert tunnel_peers <= proxy_locals, (
            f"relay tunnel peers {tunnel_peers} are not pproxy's {proxy_locals}"
        )
        assert not tunnel_peers & agent_locals

    assert echo_once(public, b"again") == b"again"
    assert_secret_free(agent, relay)


@pytest.mark.parametrize(
    ("listen", "url", "message"),
    [
        pytest.param(
            f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"socks5://{USER}:wrong-{PASSWORD}@127.0.0.1:{{port}}",
            # pproxy hangs up instead of sending the RFC 1929 failure status.
            r"proxy socks5://\*\*\*@127\.0\.0\.1:{port} closed the connection on receiving the "
            r"username/password; it probably rejected them",
            id="socks5",
        ),
        pytest.param(
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"http://{USER}:wrong-{PASSWORD}@127.0.0.1:{{port}}",
            r"proxy http://\*\*\*@127\.0\.0\.1:{port} rejected the username/password "
            r"\(HTTP 407 Proxy Authentication Required\)",
            id="http",
        ),
        pytest.param(
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            "http://127.0.0.1:{port}",
            r"proxy http://127\.0\.0\.1:{port} requires authentication; give http://USER:PASSWORD@ "
            r"in the proxy URL \(HTTP 407 Proxy Authentication Required\)",
            id="http-none-given",
        ),
    ],
)
def test_wrong_proxy_credentials(harness, pproxy, listen: str, url: str, message: str):
    proxy_port = pproxy(listen)
    state = harness.state()
    relay = harness.relay(state)
    echo = harness.echo()
    (public,) = free_ports(1)
    mark = relay.mark()
    agent = harness.agent(
        relay, state.token("bad-proxy-creds"), {public: echo.port}, ca=state.ca,
        extra=["--proxy", url.format(port=proxy_port)],
    )  # fmt: skip
    line = rf"cannot connect to the relay 127\.0\.0\.1:{relay.tunnel_port}: " + message.format(
        port=proxy_port
    )
    # Three failures in a row: the first retries come after ~1, ~2 and ~4 s (default backoff).
    agent.wait_for_log(line, timeout=20, count=3)
    agent.wait_for_log(r"reconnecting in [\d.]+ s", timeout=5, count=3)
    delays = [float(d) for d in re.findall(r"reconnecting in ([\d.]+) s", agent.log())]
    # Backoff: attempt n waits in the upper half of min(60, 2**n) s (logged to 0.1 s).
    for n, delay in enumerate(delays[:3]):
        ceiling = min(60.0, 2.0**n)
        assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, f"retry {n} after {delay} s: {delays}"
    assert delays[0] < delays[2], f"no backoff: {delays}"
    assert agent.alive()
    agent.assert_not_logged(r"tunnel to the relay is up")
    relay.assert_not_logged(r"agent \S+ connected", after=mark)
    assert not port_accepts(public)
    assert_secret_free(agent, relay)


def _socks5_refuser(conn: socket.socket) -> None:
    """A SOCKS5 proxy whose rules forbid every destination (reply 2)."""
    assert recv_exactly(conn, 3) == b"\x05\x01\x00"
    conn.sendall(b"\x05\x00")
    request = recv_exactly(conn, 4)
    assert request[:3] == b"\x05\x01\x00"
    recv_exactly(conn, {1: 4, 4: 16}[request[3]] + 2)
    conn.sendall(b"\x05\x02\x00\x01" + bytes(6))


def _http_refuser(conn: socket.socket) -> None:
    """An HTTP proxy whose rules forbid every CONNECT (403)."""
    while read_line(conn) not in (b"", b"\r"):
        pass
    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("kind", ["pproxy-http-blocked", "socks5-ruleset", "http-403"])
def test_proxy_refuses_the_destination(harness, pproxy, kind: str):
    state = harness.state()
    relay = harness.relay(state)
    echo = harness.echo()
    (public,) = free_ports(1)
    target = rf"127\.0\.0\.1:{relay.tunnel_port}"
    if kind == "pproxy-http-blocked":
        proxy_port = pproxy("http://127.0.0.1:{port}", "-b", r"{127\.0\.0\.1}")
        url = f"http://127.0.0.1:{proxy_port}"
        # pproxy hangs up without a status line when a rule blocks the destination.
        why = rf"proxy http://127\.0\.0\.1:{proxy_port} closed the connection during the HTTP CONNECT handshake for {target}"
    elif kind == "socks5-ruleset":
        proxy_port = harness.server(_socks5_refuser, "socks5-refuser").port
        url = f"socks5://127.0.0.1:{proxy_port}"
        why = (
            rf"proxy socks5://127\.0\.0\.1:{proxy_port} cannot reach {target}: "
            r"connection not allowed by ruleset \(SOCKS5 reply 2\)"
        )
    else:
        proxy_port = harness.server(_http_refuser, "http-refuser").port
        url = f"http://127.0.0.1:{proxy_port}"
        why = rf"proxy http://127\.0\.0\.1:{proxy_port} does not allow a connection to {target} \(HTTP 403 Forbidden\)"
    mark = relay.mark()
    agent = harness.agent(
        relay,
        state.token("refused-destination"),
        {public: echo.port},
        ca=state.ca,
        extra=["--proxy", url],
    )
    agent.wait_for_log(rf"cannot connect to the relay {target}: {why}", timeout=15, count=2)
    agent.assert_not_logged(r"tunnel to the relay is up")
    relay.assert_not_logged(r"agent \S+ connected", after=mark)


# --------------------------------------------------------------------------- half-dead tunnel

DEAD_LINE = r"tunnel \S+: nothing received for \d+ s; the tunnel is dead"


def _wait_log_time(proc, pattern: str, timeout: float, after: int) -> float:
    """Wait for PATTERN and return the monotonic time at which it was first seen."""
    proc.wait_for_log(pattern, timeout=timeout, after=after)
    return time.monotonic()


def _half_dead(
    harness, figures, heartbeat: list[str], detect_within: float, label: str
) -> tuple[float, float]:
    state = harness.state()
    relay = harness.relay(state, extra=heartbeat)
    forwarder = Forwarder(relay.tunnel_port)
    harness.on_stop(forwarder.close)
    echo = harness.echo()
    (public,) = free_ports(1)
    agent = harness.agent(
        f"{HOST}:{forwarder.port}", state.token("half-dead"), {public: echo.port}, ca=state.ca,
        extra=[*heartbeat, "--reconnect-max", "2"],
    )  # fmt: skip
    agent.wait_listening()
    payload = os.urandom(64 * 1024)
    assert echo_once(public, payload) == payload
    held = connect(public, timeout=detect_within + 10)
    harness.on_stop(held.close)
    assert echo_roundtrip(held, b"held stream") == b"held stream"

    relay_mark, agent_mark = relay.mark(), agent.mark()
    forwarder.accepting = False  # the path is down: no new connection either, for now
    assert forwarder.freeze() == 1
    frozen_at = time.monotonic()

    # Both sides notice on their own (each judges by what it receives). Poll both logs
    # together: the two detections are independent and may come in either order.
    seen: dict[str, float] = {}
    deadline = frozen_at + detect_within
    for _ in range(int(detect_within / 0.05) + 100):
        now = time.monotonic()
        for name, proc, mark in (("relay", relay, relay_mark), ("agent", agent, agent_mark)):
            if name not in seen and proc.search(DEAD_LINE, mark):
                seen[name] = now
        if "relay" in seen and "closed" not in seen and not port_accepts(public, timeout=0.2):
            seen["closed"] = time.monotonic()
        if len(seen) == 3 or now > deadline:
            break
        time.sleep(0.05)
    assert "relay" in seen, (
        f"the relay did not notice within {detect_within} s; log:\n{relay.tail()}"
    )
    assert "agent" in seen, (
        f"the agent did not notice within {detect_within} s; log:\n{agent.tail()}"
    )
    assert "closed" in seen, "the relay still accepts on the public port"
    relay.wait_for_log(rf"stopped listening on public port {public}\b", timeout=1, after=relay_mark)
    relay.assert_not_logged(r"GOAWAY|going away", after=relay_mark)
    relay_s, agent_s = seen["relay"] - frozen_at, seen["agent"] - frozen_at
    closed_s = seen["closed"] - seen["relay"]
    assert closed_s < 1.0, (
        f"the public port was still open {closed_s:.2f} s after the relay noticed"
    )
    # The held stream dies with the tunnel (the relay aborts its client side).
    held.settimeout(5)
    with pytest.raises((EOFError, ConnectionError)):
        recv_exactly(held, 1)
    agent.wait_for_log(r"tunnel to the relay lost", timeout=5, after=agent_mark)

    # The path comes back: the agent's next attempt goes through and the port serves again.
    back_at = time.monotonic()
    forwarder.accepting = True
    agent.wait_up(timeout=10, after=agent_mark)
    agent.wait_listening(timeout=10, after=agent_mark)
    assert echo_once(public, payload) == payload
    back_s = time.monotonic() - back_at
    figures(
        f"half-dead tunnel, {label}: relay noticed after {relay_s:.2f} s, agent after {agent_s:.2f} s; "
        f"public port refused {closed_s:.2f} s after the relay noticed; serving again {back_s:.2f} s "
        f"after the path came back (agent --reconnect-max 2)"
    )
    return relay_s, agent_s


def test_half_dead_tunnel_short_heartbeat(harness, figures):
    """--heartbeat-interval 1 --dead-after 3 on both sides: noticed 3-4 s after the last byte."""
    relay_s, agent_s = _half_dead(
        harness,
        figures,
        ["--heartbeat-interval", "1", "--dead-after", "3"],
        detect_within=8,
        label="1 s x 3",
    )
    # Dead at 3 s of silence after the last byte, which came at most one interval before the
    # freeze: between 2 and 3 s after it (+ slack for two processes on 2 busy cores).
    for who, took in (("relay", relay_s), ("agent", agent_s)):
        assert 2.0 <= took <= 4.5, f"the {who} noticed after {took:.2f} s"


def test_half_dead_tunnel_default_heartbeat(harness, figures):
    """The defaults (15 s x 3): documented as noticed 45 s after the last byte. ~50 s."""
    relay_s, agent_s = _half_dead(harness, figures, [], detect_within=70, label="defaults 15 s x 3")
    for who, took in (("relay", relay_s), ("agent", agent_s)):
        assert 30.0 <= took <= 47.0, f"the {who} noticed after {took:.2f} s"
