"""A userspace delay line: a TCP forwarder that holds every chunk for a fixed delay in each
direction and caps each direction's rate, so a loopback path behaves like a long, fat link.

    python bench/delayline.py --listen 127.0.0.1:PORT --to 127.0.0.1:PORT [--delay-ms 20] [--rate-mbs 50]

Each accepted connection gets its own outbound connection and two pipes (one per direction).
A pipe is a reader thread that stamps every chunk it reads and a writer thread that sends the
chunk no earlier than stamp + delay and no faster than the rate cap (token bucket over the
bytes sent). The reader stops reading once the queue holds `--queue-bytes` (default: two
bandwidth-delay products), so TCP backpressure reaches the sender as it would behind a real
link with a bounded buffer. FIN is forwarded after the same delay (half-close preserved).
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


class Pipe:
    """One direction: src socket -> (delay, rate cap) -> dst socket."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay: float, rate: float, limit: int, done
    ) -> None:
        self.src, self.dst = src, dst
        self.delay, self.rate, self.limit = delay, rate, limit
        self.queue: collections.deque = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.closed = False
        self.done = done

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.queued >= self.limit and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                data = self.src.recv(CHUNK)
                with self.cond:
                    self.queue.append((time.monotonic() + self.delay, data))
                    self.queued += len(data)
                    self.cond.notify_all()
                if not data:
                    return  # EOF travels as an empty chunk
        except OSError:
            self._fail()

    def _write(self) -> None:
        next_free = time.monotonic()
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    due, data = self.queue[0]
                now = time.monotonic()
                wait = max(due, next_free) - now
                if wait > 0:
                    time.sleep(wait)
                with self.cond:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                if not data:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self.done(self, clean=True)
                    return
                self.dst.sendall(data)
                next_free = max(next_free, now) + len(data) / self.rate
        except OSError:
            self._fail()

    def _fail(self) -> None:
        self.stop()
        self.done(self, clean=False)

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Link:
    """One forwarded connection: two pipes; sockets close when both directions are done."""

    def __init__(self, a: socket.socket, b: socket.socket, args) -> None:
        self.a, self.b = a, b
        self.lock = threading.Lock()
        self.finished = 0
        rate = args.rate_mbs * 1e6
        delay = args.delay_ms / 1000
        limit = args.queue_bytes or int(2 * rate * delay) + CHUNK
        self.pipes = [
            Pipe(a, b, delay, rate, limit, self._done),
            Pipe(b, a, delay, rate, limit, self._done),
        ]
        for p in self.pipes:
            p.start()

    def _done(self, pipe: Pipe, clean: bool) -> None:
        with self.lock:
            self.finished += 1
            if clean and self.finished < 2:
                return
        for p in self.pipes:
            p.stop()
        for s in (self.a, self.b):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it
            except OSError:
                pass
            s.close()


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--to", required=True, help="HOST:PORT to forward to")
    p.add_argument(
        "--delay-ms", type=float, default=20.0, help="one-way delay (default 20 ms: 40 ms RTT)"
    )
    p.add_argument(
        "--rate-mbs", type=float, default=50.0, help="rate cap per direction, MB/s (default 50)"
    )
    p.add_argument(
        "--queue-bytes", type=int, default=0, help="max bytes held per direction (default 2 BDP)"
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.create_server(parse_addr(args.listen), backlog=128)
    target = parse_addr(args.to)
    print(f"delayline listening on {args.listen} -> {args.to}", flush=True)
    while True:
        a, _ = listener.accept()
        try:
            b = socket.create_connection(target)
        except OSError:
            a.close()
            continue
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Link(a, b, args)


if __name__ == "__main__":
    sys.exit(main())
