"""Loopback network tools for the e2e tests: which TCP connections a process holds (from
/proc), and a thread-based TCP forwarder that can go silent without closing its sockets."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from pathlib import Path

from .conftest import HOST

# /proc/net/tcp states (include/net/tcp_states.h)
TCP_LISTEN = "0A"


def _decode_address(text: str) -> tuple[str, int]:
    """'0100007F:1F90' (or the 32-hex-digit IPv6 form) from /proc/net/tcp* -> (ip, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw)
    else:
        ip = socket.inet_ntop(socket.AF_INET6, raw)
        ip = ip.removeprefix("::ffff:")
    return ip, int(port, 16)


def tcp_connections(pid: int) -> list[tuple[tuple[str, int], tuple[str, int], str]]:
    """(local, remote, state) of every non-listening TCP socket that process PID holds open."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            link = os.readlink(fd_dir / fd)
            if link.startswith("socket:["):
                inodes.add(int(link[len("socket:[") : -1]))
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if inode in inodes and state != TCP_LISTEN:
                found.append((_decode_address(local), _decode_address(remote), state))
    return found


class _Pair:
    def __init__(self, inside: socket.socket, outside: socket.socket) -> None:
        self.inside = inside
        self.outside = outside
        self.frozen = threading.Event()
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for s in (self.inside, self.outside):
            with contextlib.suppress(OSError):
                s.close()


class Forwarder:
    """127.0.0.1:PORT -> 127.0.0.1:TARGET, two pump threads per connection.

    freeze(): every current connection stops passing bytes both ways, but both of its
    sockets stay open (a half-dead path: a NAT that dropped its mapping, a pulled cable).
    While `accepting` is False, new connections are closed at once (the path is down);
    set it back to True and new connections pass again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepting = True
        self.pairs: list[_Pair] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop, "forwarder-accept")

    def _start(self, fn, name: str, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                inside, _ = self.sock.accept()
            except OSError:
                return
            if not self.accepting or self._closed:
                self.refused += 1
                inside.close()
                continue
            try:
                outside = socket.create_connection((HOST, self.target), timeout=5)
            except OSError:
                inside.close()
                continue
            pair = _Pair(inside, outside)
            with self._lock:
                self.pairs.append(pair)
            self._start(self._pump, "forwarder-up", pair, inside, outside)
            self._start(self._pump, "forwarder-down", pair, outside, inside)

    @staticmethod
    def _pump(pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not pair.closed.is_set():
                if pair.frozen.is_set():
                    pair.closed.wait(0.05)  # hold the bytes in the kernel: read nothing
                    continue
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable or pair.frozen.is_set():
                    continue
                data = src.recv(1 << 16)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> int:
        """Silence every current connection (sockets stay open); returns how many."""
        with self._lock:
            pairs = list(self.pairs)
        for pair in pairs:
            pair.frozen.set()
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            pairs, threads = list(self.pairs), list(self._threads)
        for pair in pairs:
            pair.close()
        for t in threads:
            t.join(5)
