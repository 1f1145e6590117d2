"""CPU per GB of the tunnel's TLS over loopback, two ways of driving OpenSSL from Python:

- memory-bio: what relay does (relay/tlswire.py). The sender SSL_writes 256 KiB into a
  memory BIO, BIO_reads the records out and sends them in one send(); the receiver reads
  up to 1 MiB of the socket, bio_writes it and SSL_reads the plaintext out.
- socket: OpenSSL on the socket itself (pyOpenSSL's Connection over a socket). No copy
  through a memory BIO, but OpenSSL sends each 16 KiB record with its own send() and,
  without read-ahead (not in pyOpenSSL's binding), reads each record with two recv()s.

One process sends, a forked one receives; each counts its own user and system CPU
(getrusage) over the transfer. Modes alternate for --rounds rounds; the medians print.
TLS 1.3 with TLS_AES_128_GCM_SHA256, the suite relay picks, and partial writes off as
relay has them. Run: .venv/bin/python -m bench.tls_modes [--gib 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import trustme
from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from OpenSSL._util import no_zero_allocator as uninitialised

MODES = ("memory-bio", "socket")
WRITE = 256 * 1024  # a stream read at the relay
READ = 1024 * 1024  # a tunnel read at the agent (TUNNEL_BUFFER_SIZE)
_WANT_READ, _WANT_WRITE = 2, 3  # SSL_get_error
_PARTIAL_WRITE = 0x00000001
DEADLINE = 300  # seconds a transfer may take before SIGALRM ends both processes


def _contexts(workdir: Path) -> tuple[SSL.Context, SSL.Context]:
    ca = trustme.CA()
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(workdir / "s.pem")
    ca.cert_pem.write_to_path(workdir / "ca.pem")
    contexts = []
    for server in (True, False):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
        if server:
            ctx.use_certificate_chain_file(str(workdir / "s.pem"))
            ctx.use_privatekey_file(str(workdir / "s.pem"))
        else:
            ctx.load_verify_locations(str(workdir / "ca.pem"))
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: ok)
        contexts.append(ctx)
    return contexts[0], contexts[1]


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _pending(conn: SSL.Connection) -> int:
    return lib.BIO_get_mem_data(conn._from_ssl, ffi.NULL)


def _bio_handshake(conn: SSL.Connection, sock: socket.socket) -> None:
    for _ in range(100):
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            if _pending(conn):
                sock.sendall(conn.bio_read(_pending(conn)))
            conn.bio_write(sock.recv(65536))
            continue
        if _pending(conn):
            sock.sendall(conn.bio_read(_pending(conn)))
        return
    raise RuntimeError("handshake did not finish")


def _ssl_call(conn: SSL.Connection, result: int) -> None:
    """A blocking socket's SSL_read or SSL_write that returned <= 0: retry on WANT_*."""
    if lib.SSL_get_error(conn._ssl, result) not in (_WANT_READ, _WANT_WRITE):
        raise RuntimeError(f"TLS call failed: {lib.SSL_get_error(conn._ssl, result)}")


def send(mode: str, ctx: SSL.Context, port: int, total: int) -> tuple[float, float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = SSL.Connection(ctx, None if mode == "memory-bio" else sock)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"relay.test")
    if mode == "memory-bio":
        _bio_handshake(conn, sock)
    else:
        conn.do_handshake()
    lib.SSL_clear_mode(conn._ssl, _PARTIAL_WRITE)
    payload = memoryview(os.urandom(WRITE))
    start = _cpu()
    with ffi.from_buffer(payload) as data:
        for _ in range(total // WRITE):
            result = lib.SSL_write(conn._ssl, data, WRITE)
            while result <= 0:
                _ssl_call(conn, result)
                result = lib.SSL_write(conn._ssl, data, WRITE)
            if mode == "memory-bio":
                pending = _pending(conn)
                buffer = uninitialised("char[]", pending)
                size = lib.BIO_read(conn._from_ssl, buffer, pending)
                sock.sendall(memoryview(ffi.buffer(buffer, size)))
    end = _cpu()
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):  # until the receiver's close: everything arrived (and the
        pass  # session tickets it sent are read, or closing would reset the connection)
    sock.close()
    return end[0] - start[0], end[1] - start[1]


def receive(mode: str, ctx: SSL.Context, listener: socket.socket, total: int) -> tuple[float, float, int]:
    sock, _ = listener.accept()
    conn = SSL.Connection(ctx, None if mode == "memory-bio" else sock)
    conn.set_accept_state()
    if mode == "memory-bio":
        _bio_handshake(conn, sock)
    else:
        conn.do_handshake()
    start = _cpu()
    got = 0
    while got < total:
        if mode == "memory-bio":
            data = sock.recv(READ)  # as Twisted's doRead, then TLSMemoryBIOProtocol
            if not data:
                raise RuntimeError(f"the sender closed after {got} of {total} bytes")
            conn.bio_write(data)
        while got < total:
            buffer = uninitialised("char[]", READ)
            size = 0
            while size < READ and got + size < total:
                result = lib.SSL_read(conn._ssl, buffer + size, READ - size)
                if result > 0:
                    size += result
                elif mode == "memory-bio" and lib.SSL_get_error(conn._ssl, result) == _WANT_READ:
                    break  # all that was received is read
                else:
                    _ssl_call(conn, result)
            got += size
            if size < READ:
                break
    end = _cpu()
    sock.close()
    return end[0] - start[0], end[1] - start[1], got


def one_run(mode: str, total: int, server: SSL.Context, client: SSL.Context) -> dict:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    read_end, write_end = os.pipe()
    signal.alarm(DEADLINE)  # blocking sockets: a peer that hangs must not hang us
    child = os.fork()
    if child == 0:  # the receiver
        code = 1
        try:
            signal.alarm(DEADLINE)  # a fork does not inherit the parent's alarm
            os.close(read_end)
            os.write(write_end, json.dumps(receive(mode, server, listener, total)).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)  # so a receiver that died leaves the read below at end of file
    listener.close()
    wall = time.monotonic()
    sent = send(mode, client, port, total)
    wall = time.monotonic() - wall
    received = json.loads(os.read(read_end, 200) or b"null")
    _, status = os.waitpid(child, 0)
    signal.alarm(0)
    os.close(read_end)
    if received is None or status != 0:
        raise RuntimeError(f"{mode}: the receiver failed (status {status})")
    *received, got = received
    if got != total:
        raise RuntimeError(f"{mode}: {got} bytes arrived of {total}")
    gb = total / 1e9
    return {
        "MBps": total / wall / 1e6,
        "sender_cpu_s_per_GB": sum(sent) / gb,
        "sender_sys_s_per_GB": sent[1] / gb,
        "receiver_cpu_s_per_GB": sum(received) / gb,
        "receiver_sys_s_per_GB": received[1] / gb,
        "total_cpu_s_per_GB": (sum(sent) + sum(received)) / gb,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_modes", description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="GiB per transfer (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="transfers per mode, alternating (default 5)")
    p.add_argument("--json", type=Path, default=None, help="also write every round here")
    args = p.parse_args(argv)
    total = max(int(args.gib * 2**30) // WRITE, 1) * WRITE
    with tempfile.TemporaryDirectory() as tmp:
        server, client = _contexts(Path(tmp))
        rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for index in range(args.rounds):
            for mode in MODES if index % 2 == 0 else MODES[::-1]:
                rounds[mode].append(one_run(mode, total, server, client))
    medians = {
        mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for mode, runs in rounds.items()
    }
    print(f"{args.rounds} rounds of {total / 2**30:.2f} GiB, medians; CPU-s per GB (of which system)")
    print(f"{'mode':<11} {'MB/s':>6} {'sender':>15} {'receiver':>15} {'total':>6}")
    for mode, m in medians.items():
        print(
            f"{mode:<11} {m['MBps']:6.0f} {m['sender_cpu_s_per_GB']:6.3f} ({m['sender_sys_s_per_GB']:.3f})"
            f" {m['receiver_cpu_s_per_GB']:6.3f} ({m['receiver_sys_s_per_GB']:.3f})"
            f" {m['total_cpu_s_per_GB']:6.3f}"
        )
    ratio = medians["socket"]["total_cpu_s_per_GB"] / medians["memory-bio"]["total_cpu_s_per_GB"]
    print(f"socket / memory-bio, total CPU per GB: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
