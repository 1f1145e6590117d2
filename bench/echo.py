"""Echo target for the benchmark: echoes every byte back, holds idle connections open.

python bench/echo.py --listen 127.0.0.1:PORT [--listen ...]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(addresses: list[tuple[str, int]]) -> None:
    servers = [
        await asyncio.start_server(handle, host, port, backlog=4096) for host, port in addresses
    ]
    print("echo listening on " + ", ".join(f"{h}:{p}" for h, p in addresses), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="echo target")
    p.add_argument("--listen", action="append", required=True, help="HOST:PORT (repeatable)")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    addresses = []
    for item in args.listen:
        host, _, port = item.rpartition(":")
        addresses.append((host or "127.0.0.1", int(port)))
    try:
        asyncio.run(serve(addresses))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
