"""Fixtures for the end-to-end tests: the installed twistd plugins as real processes on loopback.

Everything listens on 127.0.0.1. Every wait has a deadline; every process, socket and
thread started here is stopped by a finalizer, also when a test fails.

Processes: `Harness.relay()` / `Harness.agent()` start `twistd -n relay-server` /
`twistd -n relay-agent` from the directory of the Python running pytest, with their
log in a file under the test's tmp dir. Targets: `TcpServer` runs one handler per
accepted connection in a daemon thread (echo, sink, source, pusher, ...).

Measured figures (detection time, RSS, throughput) go through the `figures` fixture
and are printed in an "e2e figures" section at the end of the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
RELAY_CLI = BIN / "relay"
HOST = "127.0.0.1"

_FIGURES: list[str] = []


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """N distinct free ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll PREDICATE until it returns something truthy (which is returned); fail after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connect to 127.0.0.1:PORT succeeds (the connection is closed at once)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: port_accepts(port), timeout, f"127.0.0.1:{port} to accept connections")


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until connecting to PORT is refused (nobody listens)."""

    def refused() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    wait_until(refused, timeout, f"127.0.0.1:{port} to refuse connections")


def connect(port: int, timeout: float = 10.0, source: str | None = None) -> socket.socket:
    """A TCP connection to HOST:port, from the loopback address `source` if given (all of
    127.0.0.0/8 is loopback on Linux: a second "host" for per-address limits)."""
    s = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0) if source else None)
    s.settimeout(timeout)
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 31) -> bytes:
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send DATA on an echo stream while reading the echo (a sender thread avoids deadlock)."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = recv_exactly(sock, len(data))
    t.join(timeout=sock.gettimeout() or 10)
    if errors:
        raise errors[0]
    return got


def echo_once(port: int, payload: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """One short-lived echo through PORT; returns what came back."""
    with connect(port, timeout) as s:
        return echo_roundtrip(s, payload)


def rss_kib(pid: int) -> int:
    """VmRSS of PID in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def ca_pin(ca_pem: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(ca_pem.read_text())
    return "sha256:" + hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.lower() in ("all_proxy", "https_proxy", "http_proxy", "no_proxy", "relay_token"):
            del env[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A twistd child with its output (stdout and stderr) in a log file."""

    kind = "process"

    def __init__(self, args: list[str], cwd: Path, log_path: Path) -> None:
        self.args = args
        self.cwd = cwd
        self.log_path = log_path
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
        )
        self.pid = self.proc.pid

    # log

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Position in the log: pass as `after` to look only at what is logged from now on."""
        return len(self.log())

    def tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def search(self, pattern: str, after: int = 0) -> re.Match | None:
        return re.search(pattern, self.log()[after:], re.MULTILINE)

    def count(self, pattern: str, after: int = 0) -> int:
        return len(re.findall(pattern, self.log()[after:], re.MULTILINE))

    def wait_for_log(self, pattern: str, timeout: float = 10.0, after: int = 0, count: int = 1) -> re.Match:
        """Wait until PATTERN (a regex) appears COUNT times in the log after position AFTER."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()[after:]
            matches = list(re.finditer(pattern, text, re.MULTILINE))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None:
                text = self.log()[after:]  # what it wrote just before exiting
                matches = list(re.finditer(pattern, text, re.MULTILINE))
                if len(matches) >= count:
                    return matches[count - 1]
                pytest.fail(
                    f"{self.kind} (pid {self.pid}) exited with {self.proc.returncode} before logging "
                    f"{pattern!r}; log:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                pytest.fail(f"{self.kind} did not log {pattern!r} within {timeout:.1f} s; log:\n{self.tail()}")
            time.sleep(0.05)

    def assert_not_logged(self, pattern: str, after: int = 0) -> None:
        m = self.search(pattern, after)
        assert m is None, f"{self.kind} logged {m.group(0)!r}, which it must not; log:\n{self.tail()}"

    # life

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.kind} (pid {self.pid}) still running after {timeout:.1f} s; log:\n{self.tail()}")

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM, then SIGKILL if it is not gone within TIMEOUT s. Idempotent."""
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


class RelayProcess(Process):
    kind = "relay"

    def __init__(self, state: Path, tunnel_port: int, cwd: Path, log_path: Path, extra: list[str]) -> None:
        self.state = state
        self.tunnel_port = tunnel_port
        args = [
            str(TWISTD), "-n", "--logfile=-", "--pidfile=", "relay-server",
            "--state", str(state),
            "--tunnel", f"tcp:{tunnel_port}:interface={HOST}",
            "--public-interface", HOST,
            *extra,
        ]  # fmt: skip
        super().__init__(args, cwd, log_path)

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_for_log(rf"starting on {self.tunnel_port}\b", timeout)
        wait_port(self.tunnel_port, timeout)


class AgentProcess(Process):
    kind = "agent"

    def __init__(
        self,
        relay: str,
        token_file: Path,
        exposes: dict[int, int],
        cwd: Path,
        log_path: Path,
        ca: Path | None,
        pin: str | None,
        extra: list[str],
    ) -> None:
        self.exposes = exposes
        args = [
            str(TWISTD), "-n", "--logfile=-", "--pidfile=", "relay-agent",
            "--relay", relay, "--token-file", str(token_file),
        ]  # fmt: skip
        if ca is not None:
            args += ["--ca", str(ca)]
        if pin is not None:
            args += ["--pin", pin]
        for public, target in exposes.items():
            args += ["--expose", f"{public}={HOST}:{target}"]
        super().__init__(args + extra, cwd, log_path)

    def wait_listening(self, *ports: int, timeout: float = 15.0, after: int = 0) -> None:
        """Wait until the relay confirmed it listens on PORTS (default: every exposed port)."""
        for port in ports or tuple(self.exposes):
            self.wait_for_log(rf"relay listens on public port {port}\b", timeout, after=after)

    def wait_up(self, timeout: float = 15.0, after: int = 0, count: int = 1) -> None:
        self.wait_for_log(r"tunnel to the relay is up", timeout, after=after, count=count)


# --------------------------------------------------------------------------- targets


class TcpServer:
    """A listening socket on 127.0.0.1; each connection runs HANDLER(conn) in a daemon thread."""

    def __init__(self, handler: Callable[[socket.socket], None], name: str = "target") -> None:
        self.handler = handler
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.active = 0
        self.errors: list[BaseException] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self._closed:
                    conn.close()
                    return
                self.conns.append(conn)
                self.accepted += 1
                self.active += 1
            threading.Thread(target=self._run, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass  # resets and closes are the tests' business; handlers report what they must
        except BaseException as e:  # noqa: BLE001 - surfaced by the tests via .errors
            self.errors.append(e)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self.lock:
                self.active -= 1
                with contextlib.suppress(ValueError):
                    self.conns.remove(conn)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(1 << 16)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def tag_echo_handler(tag: bytes) -> Callable[[socket.socket], None]:
    """An echo that first says TAG + b"\\n", so a test can tell which target it reached."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(tag + b"\n")
        echo_handler(conn)

    return handler


def read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise EOFError(f"EOF after {bytes(buf)!r}")
        buf += b
        if len(buf) > limit:
            raise AssertionError("line too long")
    return bytes(buf[:-1])


# --------------------------------------------------------------------------- TLS state


def relay_cli(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(RELAY_CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=_child_env()
    )
    assert result.returncode == 0, f"relay {' '.join(args)} failed: {result.stderr}"
    return result.stdout


class RelayState:
    """A state dir made by `relay init`, with helpers to issue agent tokens into files."""

    def __init__(self, root: Path, hostnames: list[str] | None = None) -> None:
        self.root = root
        self.path = root / "state"
        args = ["init", "--state", str(self.path)]
        for name in hostnames or []:
            args += ["--hostname", name]
        out = relay_cli(*args, cwd=root)
        self.ca = self.path / "ca.pem"
        self.pin = ca_pin(self.ca)
        assert self.pin in out, f"`relay init` did not print the pin {self.pin}: {out}"

    def token(self, name: str, ports: str | None = None) -> Path:
        args = ["agent-token", "--state", str(self.path), name]
        if ports:
            args += ["--ports", ports]
        token = relay_cli(*args, cwd=self.root).strip()
        assert token and "\n" not in token
        path = self.root / f"{name}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        return path


# --------------------------------------------------------------------------- harness


class Harness:
    """Starts relays, agents and targets in one directory; stop() ends them all (newest first)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._stoppers: list[Callable[[], None]] = []
        self._n = 0

    def _log(self, kind: str) -> Path:
        self._n += 1
        return self.root / f"{self._n:02d}-{kind}.log"

    def state(self, hostnames: list[str] | None = None) -> RelayState:
        self._n += 1
        root = self.root / f"state{self._n}"
        root.mkdir()
        return RelayState(root, hostnames)

    def relay(
        self,
        state: RelayState,
        tunnel_port: int | None = None,
        extra: list[str] | None = None,
        drain_timeout: float = 2.0,
        ready: bool = True,
    ) -> RelayProcess:
        args = list(extra or [])
        if "--drain-timeout" not in args:
            args += ["--drain-timeout", str(drain_timeout)]
        proc = RelayProcess(state.path, tunnel_port or free_port(), self.root, self._log("relay"), args)
        self._stoppers.append(proc.stop)
        if ready:
            proc.wait_ready()
        return proc

    def agent(
        self,
        relay: RelayProcess | str,
        token_file: Path,
        exposes: dict[int, int],
        ca: Path | None = None,
        pin: str | None = None,
        extra: list[str] | None = None,
    ) -> AgentProcess:
        address = f"{HOST}:{relay.tunnel_port}" if isinstance(relay, RelayProcess) else relay
        proc = AgentProcess(address, token_file, exposes, self.root, self._log("agent"), ca, pin, list(extra or []))
        self._stoppers.append(proc.stop)
        return proc

    def server(self, handler: Callable[[socket.socket], None], name: str = "target") -> TcpServer:
        srv = TcpServer(handler, name)
        self._stoppers.append(srv.close)
        return srv

    def echo(self) -> TcpServer:
        return self.server(echo_handler, "echo")

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._stoppers.append(fn)

    def stop(self) -> None:
        errors = []
        while self._stoppers:
            fn = self._stoppers.pop()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - stop everything, then report
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path / "e2e")
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def module_harness(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    h = Harness(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """figures(text): record a measured figure; printed at the end of the run."""

    def add(text: str) -> None:
        line = f"{request.node.name}: {text}"
        _FIGURES.append(line)
        print(line)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _FIGURES:
        terminalreporter.section("e2e figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def pytest_configure(config) -> None:
    # 1,000 streams mean 2,000 sockets in this process (clients and targets) and 1,000 in
    # the agent, which inherits this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
