"""send_now: bytes go to the kernel at once when nothing is queued, else to Twisted's buffer,
always in order (a fake transport with Twisted's buffer attributes around a real
socketpair); and record_aligned, which cuts a tunnel write into SSL_write pieces."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL._util import lib as libssl
from OpenSSL.SSL import Connection

from relay.tlswire import RECORD_SIZE, missing_internals, record_aligned, send_now


class FakeTCP:
    """The attributes of twisted.internet.abstract.FileDescriptor that send_now reads."""

    def __init__(self, sock):
        self.socket = sock
        self.connected = True
        self.disconnecting = False
        self._writeDisconnected = False
        self._tempDataBuffer: list[bytes] = []
        self.dataBuffer = b""
        self.offset = 0
        self.queued: list[bytes] = []

    def writeSequence(self, chunks):
        for chunk in chunks:  # as Twisted's FileDescriptor.writeSequence checks
            if not isinstance(chunk, bytes):
                raise TypeError(f"Data must be bytes, not {type(chunk).__name__}")
        self.queued.extend(chunks)
        self._tempDataBuffer.extend(chunks)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def read(sock, n):
    out = b""
    for _ in range(1000):
        if len(out) >= n:
            break
        out += sock.recv(n - len(out))
    return out


def test_nothing_queued_goes_to_the_kernel_at_once(pair):
    a, b = pair
    t = FakeTCP(a)
    send_now(t, [b"head", b"er", b"-payload"])
    assert t.queued == []
    assert read(b, 14) == b"header-payload"


@pytest.mark.parametrize(
    "state",
    [
        {"_tempDataBuffer": [b"earlier"]},
        {"dataBuffer": b"earlier", "offset": 2},
        {"disconnecting": True},
        {"_writeDisconnected": True},
        {"connected": False},
    ],
)
def test_anything_queued_or_closing_leaves_it_to_twisted(pair, state):
    a, b = pair
    t = FakeTCP(a)
    for name, value in state.items():
        setattr(t, name, value)
    send_now(t, [b"later"])
    assert t.queued == [b"later"]  # behind what was queued, never ahead of it
    b.settimeout(0.05)
    with pytest.raises(TimeoutError):
        b.recv(10)


def test_what_the_kernel_does_not_take_is_queued_in_order(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = FakeTCP(a)
    chunks = [bytes([i]) * 100_000 for i in range(3)]
    send_now(t, chunks)
    assert t.queued, "a 300 kB write cannot fit a 4 KiB send buffer"
    sent = b"".join(chunks)[: 300_000 - sum(map(len, t.queued))]
    assert sent + b"".join(t.queued) == b"".join(chunks)
    assert read(b, len(sent)) == sent


@pytest.mark.parametrize("queued_before", [False, True])
def test_memoryviews_are_sent_as_they_are_and_queued_as_bytes(pair, queued_before):
    # Received DATA payloads are memoryviews of the TLS read (FrameDecoder); Twisted's buffer
    # takes only bytes.
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = FakeTCP(a)
    if queued_before:
        t._tempDataBuffer = [b"earlier"]
    blob = bytes(range(256)) * 1200
    chunks = [memoryview(blob)[:100_000], memoryview(blob)[100_000:]]
    send_now(t, chunks)
    assert t.queued and all(type(c) is bytes for c in t.queued)
    sent = blob[: len(blob) - sum(map(len, t.queued))]
    assert sent + b"".join(t.queued) == blob
    assert read(b, len(sent)) == sent
    assert (sent == b"") is queued_before


def test_a_socket_error_leaves_everything_to_twisted(pair):
    a, b = pair
    b.close()
    t = FakeTCP(a)
    for _ in range(3):  # the first send may still succeed; then EPIPE/ECONNRESET
        t.queued.clear()
        t._tempDataBuffer.clear()
        send_now(t, [b"x" * 1000])
    assert t.queued == [b"x" * 1000]


def test_a_transport_without_a_socket_is_written_as_usual():
    class Plain:
        def __init__(self):
            self.queued = []

        def writeSequence(self, chunks):
            self.queued.extend(chunks)

    t = Plain()
    send_now(t, [b"a", b"b"])
    assert t.queued == [b"a", b"b"]


# record_aligned: a tunnel write's chunks as SSL_write pieces


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3 * RECORD_SIZE + 5), max_size=12))
def test_record_aligned_pieces_are_the_chunks_in_whole_records(sizes):
    chunks = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    pieces = record_aligned(chunks)
    assert b"".join(pieces) == b"".join(chunks)
    assert all(len(p) % RECORD_SIZE == 0 for p in pieces[:-1])  # full records, as if joined
    assert all(len(p) for p in pieces)


def test_record_aligned_copies_only_what_shares_a_record():
    # Four 64 KiB DATA frames of a 256 KiB read: per frame, the 16 KiB record holding its
    # header is joined; the other three records are views of the payload, not copies.
    chunks = []
    for _ in range(4):
        chunks += [bytes(12), bytes(range(256)) * 256]
    pieces = record_aligned(chunks)
    assert [len(p) for p in pieces] == [16384, 49152] * 4 + [48]
    copied = [p for p in pieces if type(p) is bytes]
    assert sum(map(len, copied)) == 4 * RECORD_SIZE
    views = [p for p in pieces if type(p) is memoryview]
    assert all(any(v.obj is c for c in chunks) for v in views)
    assert record_aligned([b"a", b"b"]) == [b"ab"]  # small writes: one join, as before


def test_the_pyopenssl_internals_the_data_path_uses_are_checked_by_name():
    assert missing_internals(libssl, Connection) == []  # this pyOpenSSL has them all

    class OldLib:
        SSL_read = SSL_write = SSL_pending = BIO_read = BIO_get_mem_data = object()

    assert missing_internals(OldLib, object) == ["SSL_clear_mode", "Connection._raise_ssl_error"]
