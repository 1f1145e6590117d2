"""Fixtures shared by the unit, in-memory and end-to-end tests."""

import socket
import subprocess
import sys
import time

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from relay.state import State, init_state


@pytest.fixture(autouse=True)
def frozen_startup(monkeypatch):
    """What both services schedule at start (gc.freeze of start-up objects) is recorded, not
    done: frozen, this test process would never free what its tests leave behind."""
    from relay import agent_tap, server_tap

    calls: list[str] = []
    for tap in (agent_tap, server_tap):
        monkeypatch.setattr(tap, "freeze_startup_objects", lambda tap=tap: calls.append(tap.__name__))
    return calls


@pytest.fixture
def state(tmp_path):
    """A relay state dir with a CA and a server certificate for localhost."""
    init_state(tmp_path / "st", ["localhost"])
    return State(tmp_path / "st")


@pytest.fixture
def logs():
    """Every twisted.logger event during the test, formatted as text."""
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# --- pproxy: a real third-party SOCKS4/SOCKS5/HTTP proxy, run as a subprocess on loopback

PPROXY_DEADLINE = 10.0


class PProxy:
    """start(listen_uri with {port}, *extra_args) -> port: runs pproxy until the test ends.

    `pid(port)` is the process id of the pproxy listening on PORT (to inspect its sockets)."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}

    def __call__(self, listen: str, *extra: str) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # --auth 0: pproxy otherwise trusts an IP for 30 days after one good login.
        cmd = [sys.executable, "-m", "pproxy", "-l", listen.format(port=port)]
        cmd += ["--auth", "0", *extra]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.procs[port] = proc
        deadline = time.monotonic() + PPROXY_DEADLINE
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pproxy exited: {proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pproxy did not listen within {PPROXY_DEADLINE:g} s")
                time.sleep(0.05)

    def pid(self, port: int) -> int:
        return self.procs[port].pid

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(PPROXY_DEADLINE)
            proc.stderr.close()


@pytest.fixture
def pproxy():
    """start(listen_uri with {port}, *extra pproxy args) -> port: runs pproxy until the test ends."""
    proxies = PProxy()
    try:
        yield proxies
    finally:
        proxies.stop()


@pytest.fixture
def no_listen_server_tap(monkeypatch):
    """relay.server_tap with a fake tunnel endpoint and no signal or rlimit changes, so
    makeService builds the real service tree without a socket."""
    from twisted.internet import defer

    from relay import server_tap

    class FakePort:
        def stopListening(self):  # noqa: N802 (Twisted's name)
            return defer.succeed(None)

    class FakeEndpoint:
        def listen(self, factory):
            return defer.succeed(FakePort())

    monkeypatch.setattr(server_tap, "_reload_on_sighup", lambda reactor, relay: None)
    monkeypatch.setattr(server_tap, "_raise_fd_limit", lambda: None)
    monkeypatch.setattr(server_tap.socket, "getfqdn", lambda: "relay.example.net")
    monkeypatch.setattr(server_tap.endpoints, "serverFromString", lambda reactor, desc: FakeEndpoint())
    return server_tap
