"""Bytes through one relay + agent pair: bulk, many streams, half-close, resets, backpressure.

One relay and one agent serve the whole module; every test uses its own target (and so
its own public port), so the tests do not see each other's connections.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from .conftest import (
    connect,
    echo_handler,
    echo_roundtrip,
    free_ports,
    read_line,
    recv_exactly,
    recv_until_eof,
    wait_until,
)

pytestmark = pytest.mark.e2e

BULK = 50 * 1024 * 1024
MiB = 1024 * 1024


class Pusher:
    """Target that writes to its client endlessly and records how far it got."""

    def __init__(self) -> None:
        self.sent = 0
        self.last_progress = time.monotonic()
        self.chunk = os.urandom(64 * 1024)
        self.connected = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        self.last_progress = time.monotonic()
        self.connected.set()
        while True:
            conn.sendall(self.chunk)
            self.sent += len(self.chunk)
            self.last_progress = time.monotonic()

    def stalled_for(self) -> float:
        return time.monotonic() - self.last_progress


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(BULK)


@pytest.fixture(scope="module")
def pair(module_harness, blob):
    h = module_harness
    results: dict[str, queue.Queue] = {name: queue.Queue() for name in ("halfclose", "reset")}

    def sink(conn: socket.socket) -> None:
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            count += len(data)
        conn.sendall(f"{digest.hexdigest()} {count}\n".encode())

    def source(conn: socket.socket) -> None:
        conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        recv_until_eof(conn, limit=1 << 20)

    def reply_after_eof(conn: socket.socket) -> None:
        data = recv_until_eof(conn)
        conn.sendall(b"reply:%d:%s\n" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    def close_write_first(conn: socket.socket) -> None:
        conn.sendall(b"greeting from the target\n" * 1000)
        conn.shutdown(socket.SHUT_WR)
        results["halfclose"].put(recv_until_eof(conn))

    def observe_reset(conn: socket.socket) -> None:
        conn.sendall(b"ready\n")
        try:
            data = recv_until_eof(conn)
        except ConnectionResetError:
            results["reset"].put("reset")
        else:
            results["reset"].put(f"clean EOF after {len(data)} bytes")

    def reset_client(conn: socket.socket) -> None:
        read_line(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    pusher = Pusher()
    targets = {
        "echo": h.server(echo_handler, "echo"),
        "idle": h.server(echo_handler, "idle-echo"),
        "sink": h.server(sink, "sink"),
        "source": h.server(source, "source"),
        "reply_after_eof": h.server(reply_after_eof, "reply-after-eof"),
        "close_write_first": h.server(close_write_first, "close-write-first"),
        "observe_reset": h.server(observe_reset, "observe-reset"),
        "reset_client": h.server(reset_client, "reset-client"),
        "push": h.server(pusher, "pusher"),
    }
    public = dict(zip(targets, free_ports(len(targets)), strict=True))
    state = h.state()
    relay = h.relay(state)
    agent = h.agent(relay, state.token("streams"), {public[n]: t.port for n, t in targets.items()}, ca=state.ca)
    agent.wait_listening()
    return SimpleNamespace(
        relay=relay, agent=agent, port=public, target=targets, results=results, pusher=pusher
    )


def test_bulk_50mb_each_way(pair, blob, figures):
    expected = hashlib.sha256(blob).hexdigest()

    # Upload: client -> relay -> agent -> sink, which answers with the digest of what it got.
    start = time.monotonic()
    with connect(pair.port["sink"], timeout=60) as s:
        view = memoryview(blob)
        for offset in range(0, BULK, MiB):
            s.sendall(view[offset : offset + MiB])
        s.shutdown(socket.SHUT_WR)
        line = read_line(s).decode()
    upload = time.monotonic() - start
    assert line == f"{expected} {BULK}"

    # Download: source -> agent -> relay -> client.
    start = time.monotonic()
    digest, count = hashlib.sha256(), 0
    with connect(pair.port["source"], timeout=60) as s:
        while data := s.recv(1 << 20):
            digest.update(data)
            count += len(data)
    download = time.monotonic() - start
    assert count == BULK
    assert digest.hexdigest() == expected

    figures(
        f"50 MiB upload {upload:.2f} s ({BULK / MiB / upload:.0f} MiB/s), "
        f"download {download:.2f} s ({BULK / MiB / download:.0f} MiB/s)"
    )


def test_100_concurrent_echo_streams(pair, figures):
    port = pair.port["echo"]

    def one(i: int) -> tuple[int, str, str]:
        rng = random.Random(i)
        data = rng.randbytes(rng.randint(200 * 1024, 500 * 1024))
        with connect(port, timeout=60) as s:
            got = echo_roundtrip(s, data)
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
        return len(data), hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest()

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    elapsed = time.monotonic() - start
    mismatched = [i for i, (_, sent, got) in enumerate(results) if sent != got]
    assert not mismatched, f"streams {mismatched} were not echoed byte-exact"
    total = sum(n for n, _, _ in results)
    figures(f"100 concurrent echo streams, {total / MiB:.1f} MiB each way, {elapsed:.2f} s")


def test_half_close_client_first(pair):
    payload = os.urandom(1 * MiB)
    with connect(pair.port["reply_after_eof"]) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the target sees EOF only if our FIN crosses the tunnel
        reply = recv_until_eof(s)
    assert reply == b"reply:%d:%s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


def test_half_close_target_first(pair):
    with connect(pair.port["close_write_first"]) as s:
        assert recv_until_eof(s) == b"greeting from the target\n" * 1000  # the target's FIN came through
        late = os.urandom(300 * 1024)
        s.sendall(late)  # our direction is still open
        s.shutdown(socket.SHUT_WR)
        assert pair.results["halfclose"].get(timeout=10) == late
        assert recv_until_eof(s) == b""


def test_client_reset_reaches_target(pair):
    with connect(pair.port["observe_reset"]) as s:
        assert read_line(s) == b"ready"  # the stream reaches the target
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert pair.results["reset"].get(timeout=10) == "reset"


def test_target_reset_reaches_client(pair):
    with connect(pair.port["reset_client"]) as s:
        s.sendall(b"reset me\n")
        with pytest.raises(ConnectionResetError):
            data = s.recv(1024)
            pytest.fail(f"expected a reset, got {data!r}")


def test_stalled_reader_does_not_stall_others(pair, figures):
    pusher = pair.pusher
    relay0, agent0 = pair.relay.rss_kib(), pair.agent.rss_kib()
    stalled = connect(pair.port["push"])  # never read
    try:
        assert pusher.connected.wait(10), "the pusher target was never connected"
        # Backpressure: the pusher blocks once every buffer on the way is full.
        wait_until(lambda: pusher.sent and pusher.stalled_for() > 1.0, 30, "the pushing target to block")
        blocked_at = pusher.sent

        # Another stream on the same tunnel stays responsive the whole time (~3 s).
        worst = 0.0
        with connect(pair.port["echo"]) as s:
            deadline = time.monotonic() + 3.0
            rounds = 0
            for i in range(1_000_000):  # bounded by the deadline; the count only caps the loop
                if time.monotonic() >= deadline:
                    break
                rounds += 1
                data = os.urandom(32 * 1024) + i.to_bytes(4, "big")
                t0 = time.monotonic()
                assert echo_roundtrip(s, data) == data
                worst = max(worst, time.monotonic() - t0)
        assert worst < 2.0, f"an echo round trip took {worst:.2f} s while another stream was stalled"

        assert pusher.sent == blocked_at, "the pusher made progress although nobody reads"
        assert pusher.stalled_for() > 3.0
        relay1, agent1 = pair.relay.rss_kib(), pair.agent.rss_kib()
        figures(
            f"stalled stream: pusher blocked after {blocked_at / MiB:.1f} MiB; worst echo RTT "
            f"{worst * 1000:.0f} ms over {rounds} round trips; relay RSS {relay0 // 1024}->{relay1 // 1024} MiB, "
            f"agent RSS {agent0 // 1024}->{agent1 // 1024} MiB"
        )
        assert blocked_at < 64 * MiB, f"{blocked_at / MiB:.0f} MiB buffered for one stalled stream"
        assert relay1 - relay0 < 64 * 1024, f"relay RSS grew {relay0} -> {relay1} KiB"
        assert agent1 - agent0 < 64 * 1024, f"agent RSS grew {agent0} -> {agent1} KiB"
    finally:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stalled.close()
    # The reset frees the pusher (its send fails) and the stream on both ends.
    wait_until(lambda: pair.target["push"].active == 0, 10, "the pusher's connection to close")


def test_1000_idle_streams(pair, figures):
    srv = pair.target["idle"]
    port = pair.port["idle"]
    relay0, agent0 = pair.relay.rss_kib(), pair.agent.rss_kib()
    socks: list[socket.socket] = []
    start = time.monotonic()
    try:
        for _ in range(1000):
            socks.append(connect(port, timeout=30))
        wait_until(lambda: srv.active >= 1000, 60, "1,000 streams to reach the target")
        opened = time.monotonic() - start
        relay1, agent1 = pair.relay.rss_kib(), pair.agent.rss_kib()
        figures(
            f"1,000 idle streams open in {opened:.1f} s: relay RSS {relay0 / 1024:.1f} -> "
            f"{relay1 / 1024:.1f} MiB (+{(relay1 - relay0) / 1000:.1f} KiB/stream), agent RSS "
            f"{agent0 / 1024:.1f} -> {agent1 / 1024:.1f} MiB (+{(agent1 - agent0) / 1000:.1f} KiB/stream)"
        )
        # Everything still works: a new stream, and the oldest, a middle and the newest idle one.
        with connect(pair.port["echo"]) as s:
            assert echo_roundtrip(s, b"still alive") == b"still alive"
        for i in (0, 500, 999):
            data = b"idle stream %d" % i
            socks[i].sendall(data)
            assert recv_exactly(socks[i], len(data)) == data
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: srv.active == 0, 30, "the 1,000 target connections to close")
