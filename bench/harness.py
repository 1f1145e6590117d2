"""relay benchmark: relay vs ssh -R (aes128-gcm, chacha20-poly1305) vs direct TCP, on loopback.

Run it with `bench/run` (installs what it needs) or `.venv/bin/python -m bench`. See
docs/performance.md for the method and `--help` for the flags. Every process it starts is
stopped (by pid, with its descendants) before it exits, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = ["direct", "socat", "ssh-aes", "ssh-chacha", "relay", "relay2"]
LABELS = {
    "direct": "direct TCP",
    "socat": "socat (plain TCP forwarder)",
    "ssh-aes": "ssh -R aes128-gcm",
    "ssh-chacha": "ssh -R chacha20-poly1305",
    "relay": "relay",
    "relay2": "relay, 2 processes (--reuse-port)",
}
# relay2 measures what a second relay process behind SO_REUSEPORT gives: only where one
# tunnel carries many connections, and it is not a target.
RELAY2_WORKLOADS = {"bulk4", "keepalive", "newconn"}
CIPHERS = {"ssh-aes": "aes128-gcm@openssh.com", "ssh-chacha": "chacha20-poly1305@openssh.com"}
WORKLOADS = ["memory", "gib", "bulk1", "bulk4", "keepalive", "newconn", "echo", "rtt40"]
TOOLS = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "nginx": "nginx-light",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "socat": "socat",
}

# (key, label, unit, higher_is_better, short label for the plot). The table and plot come from this.
METRICS = [
    ("gib_MBps", "1 GiB in one stream client->target", "MB/s", True, "1 GiB stream"),
    ("bulk1_fwd_MBps", "1 stream client->target", "MB/s", True, "1 stream fwd"),
    ("bulk1_rev_MBps", "1 stream target->client (-R)", "MB/s", True, "1 stream rev"),
    ("bulk1_fwd_cpu_s_per_GB", "  CPU-s/GB tunnel procs, fwd", "s/GB", False, "CPU/GB fwd"),
    ("bulk1_rev_cpu_s_per_GB", "  CPU-s/GB tunnel procs, rev", "s/GB", False, "CPU/GB rev"),
    ("bulk4_MBps", "4 streams (-P 4)", "MB/s", True, "4 streams"),
    ("bulk4_cpu_s_per_GB", "  CPU-s/GB tunnel procs, 4 streams", "s/GB", False, "CPU/GB 4 streams"),
    ("keepalive_rps", "keep-alive HTTP 1 KiB, c=32", "req/s", True, "keep-alive req/s"),
    ("keepalive_p99_ms", "  keep-alive p99 latency", "ms", False, "keep-alive p99"),
    ("newconn_rps", "new connection per request, c=32", "conn/s", True, "new conn/s"),
    ("newconn_p99_ms", "  new connection p99 latency", "ms", False, "new conn p99"),
    ("echo_idle_p50_ms", "64 B echo, idle tunnel, p50", "ms", False, "echo idle p50"),
    ("echo_idle_p99_ms", "64 B echo, idle tunnel, p99", "ms", False, "echo idle p99"),
    ("echo_load_p50_ms", "64 B echo under bulk load, p50", "ms", False, "echo loaded p50"),
    ("echo_load_p99_ms", "64 B echo under bulk load, p99", "ms", False, "echo loaded p99"),
    ("echo_load_bulk_MBps", "  bulk stream beside the echo", "MB/s", True, "bulk beside echo"),
    ("mem_kib_per_stream", "PSS per idle stream (tunnel procs)", "KiB", False, "PSS/idle stream"),
    ("rtt40_MBps", "1 stream over 40 ms RTT delay line", "MB/s", True, "1 stream 40 ms RTT"),
]


class BenchError(Exception):
    pass


def tool(name: str) -> str | None:
    """A program on PATH, or in the sbin directories a non-root PATH may lack (nginx, sshd)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes and /proc


def children_of(pid: int) -> list[int]:
    """Every descendant of pid (by a /proc scan of parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid and of its children it has waited for, from
    /proc/PID/stat utime+cutime and stime+cstime: socat's per-connection children have
    exited, and been reaped, by the time a workload ends."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    user = int(fields[11]) + int(fields[13])
    system = int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (or any address)? Read /proc/net/tcp, connect nothing."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


_handed_out: set[int] = set()
_next_port = [20000 + (os.getpid() % 100) * 100]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports, outside the ephemeral range, never the same one twice per run."""
    lo, hi = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports: list[int] = []
    candidate = _next_port[0]
    while len(ports) < n:
        candidate += 1
        if lo <= candidate <= hi:
            candidate = hi + 1
        if candidate > 65535:
            candidate = 10000
        if candidate in _handed_out or listening(candidate):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        ports.append(candidate)
        _handed_out.add(candidate)
    _next_port[0] = candidate
    return ports


class Procs:
    """Every process the harness starts; stop() ends them and their descendants, by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        out = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw
        )
        out.close()
        self.started.append((name, proc))
        return proc

    def logfile(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            family = children_of(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
            for pid in family:  # e.g. sshd's per-connection processes, nginx workers
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.started = [(n, p) for n, p in self.started if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.started)):
            self.stop(proc)

    def check_alive(self, proc: subprocess.Popen, name: str) -> None:
        if proc.poll() is not None:
            tail = self.logfile(name).read_text(errors="replace")[-2000:]
            raise BenchError(f"{name} exited with {proc.returncode}:\n{tail}")


def wait_until(
    what: str, test, timeout: float = 15.0, procs: list[tuple[Procs, subprocess.Popen, str]] = ()
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return
        for p, proc, name in procs:
            p.check_alive(proc, name)
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()[-500:]}"
        )
    return res


# ---------------------------------------------------------------- targets (the "inside" services)


@dataclass
class TargetPorts:
    iperf: int
    http: int
    echo: int


class Targets:
    """iperf3 servers, one nginx serving a 1 KiB file, one echo server; one set of ports per variant
    so that TIME_WAIT or a lingering test of one variant cannot disturb the next."""

    def __init__(self, procs: Procs, work: Path, variants: list[str]) -> None:
        self.procs = procs
        self.work = work
        ports = free_ports(3 * len(variants))
        self.ports = {v: TargetPorts(*ports[3 * i : 3 * i + 3]) for i, v in enumerate(variants)}

    def start(self, need_http: bool) -> None:
        for v, tp in self.ports.items():
            proc = self.procs.start(
                f"iperf3-server-{v}", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(tp.iperf)]
            )
            wait_until(
                f"iperf3 server on {tp.iperf}",
                lambda tp=tp: listening(tp.iperf),
                procs=[(self.procs, proc, f"iperf3-server-{v}")],
            )
        echo_args = [a for tp in self.ports.values() for a in ("--listen", f"127.0.0.1:{tp.echo}")]
        proc = self.procs.start("echo", [sys.executable, str(BENCH / "echo.py"), *echo_args])
        for tp in self.ports.values():
            wait_until(
                "echo server", lambda tp=tp: listening(tp.echo), procs=[(self.procs, proc, "echo")]
            )
        if need_http:
            self._start_nginx()

    def _start_nginx(self) -> None:
        d = self.work / "nginx"
        (d / "www").mkdir(parents=True)
        (d / "tmp").mkdir()
        (d / "www" / "1k.bin").write_bytes(os.urandom(1024))
        listens = "\n".join(
            f"    listen 127.0.0.1:{tp.http} backlog=4096;" for tp in self.ports.values()
        )
        temp = "\n".join(
            f"  {kind}_temp_path {d}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        user = "user root;\n" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(
            f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
{temp}
  server {{
{listens}
    root {d}/www;
  }}
}}
"""
        )
        proc = self.procs.start(
            "nginx",
            [
                tool("nginx") or "nginx",
                "-e",
                f"{d}/error.log",
                "-p",
                f"{d}/",
                "-c",
                f"{d}/nginx.conf",
            ],
        )
        for tp in self.ports.values():
            wait_until(
                "nginx", lambda tp=tp: listening(tp.http), procs=[(self.procs, proc, "nginx")]
            )


# ---------------------------------------------------------------- variants (the tunnels)


@dataclass
class Variant:
    name: str
    targets: TargetPorts
    procs: Procs
    work: Path
    public: TargetPorts | None = None
    owned: list[subprocess.Popen] = field(default_factory=list)
    slow: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        raise NotImplementedError

    def tunnel_pids(self) -> dict[str, list[int]]:
        """The processes that carry the tunnel, by role, for CPU and PSS (empty for direct)."""
        return {}

    def start_slow_path(self, delay_port: int, public_port: int, args) -> int:
        """Set up the delay-line path; return the port a client connects to for the iperf3 target."""
        raise NotImplementedError

    def stop_slow_path(self) -> None:
        for proc in reversed(self.slow):
            self.procs.stop(proc)
        self.slow = []

    def stop(self) -> None:
        self.stop_slow_path()
        for proc in reversed(self.owned):
            self.procs.stop(proc)
        self.owned = []

    def _spawn(self, name: str, argv: list[str], slow: bool = False) -> subprocess.Popen:
        proc = self.procs.start(name, argv)
        (self.slow if slow else self.owned).append(proc)
        return proc

    def _delay_line(self, listen: int, to: int, args) -> subprocess.Popen:
        proc = self._spawn(
            f"delayline-{self.name}",
            [
                sys.executable,
                str(BENCH / "delayline.py"),
                "--listen", f"127.0.0.1:{listen}",
                "--to", f"127.0.0.1:{to}",
                "--delay-ms", str(args.rtt_ms / 2),
                "--rate-mbs", str(args.rtt_rate),
            ],
            slow=True,
        )  # fmt: skip
        wait_until(
            "delay line",
            lambda: listening(listen),
            procs=[(self.procs, proc, f"delayline-{self.name}")],
        )
        return proc


class Direct(Variant):
    def start(self) -> None:
        self.public = self.targets

    def start_slow_path(self, delay_port: int, public_port: int, args) -> int:
        self._delay_line(delay_port, self.targets.iperf, args)
        return delay_port


class Socat(Variant):
    """socat forwarding each public port to its target: a plain TCP relay in C (one process
    per connection, no encryption, no multiplexing), the floor any relay adds to direct TCP."""

    def start(self) -> None:
        self.public = TargetPorts(*free_ports(3))
        self.listeners = []
        for public, target in zip(
            (self.public.iperf, self.public.http, self.public.echo),
            (self.targets.iperf, self.targets.http, self.targets.echo),
            strict=True,
        ):
            name = f"socat-{public}"
            proc = self._spawn(
                name,
                [
                    tool("socat") or "socat",
                    f"TCP-LISTEN:{public},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                    f"TCP:127.0.0.1:{target},nodelay",
                ],
            )
            self.listeners.append(proc)
            wait_until(
                f"socat on {public}",
                lambda p=public: listening(p),
                procs=[(self.procs, proc, name)],
            )

    # No tunnel_pids: socat forks a process per connection, and whether a finished child's
    # CPU shows in its parent's cutime by the end of a workload depends on when socat reaps
    # it (runs showed 2.0 s/GB once and 0.00 the next), so its CPU is not reported.


class SshD:
    """One private sshd on a loopback port: own host key, own config, key auth, GatewayPorts no."""

    def __init__(self, procs: Procs, work: Path, port: int) -> None:
        self.procs, self.port = procs, port
        self.dir = work / "sshd"
        self.dir.mkdir()
        self.user = getpass.getuser()
        self.key = self.dir / "client_ed25519"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        d = self.dir
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_ed25519")], 30)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], 30)
        (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
        (d / "sshd_config").write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
UseDNS no
GatewayPorts no
AllowTcpForwarding yes
Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com
MaxStartups 100
LogLevel ERROR
"""
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        sshd = tool("sshd") or "/usr/sbin/sshd"
        run([sshd, "-t", "-f", str(d / "sshd_config")], 30)
        self.proc = self.procs.start("sshd", [sshd, "-D", "-e", "-f", str(d / "sshd_config")])
        wait_until(
            f"sshd on {self.port}",
            lambda: listening(self.port),
            procs=[(self.procs, self.proc, "sshd")],
        )

    def ssh_argv(self, cipher: str, port: int, forwards: list[tuple[int, int]]) -> list[str]:
        argv = [
            "ssh", "-F", "/dev/null", "-T", "-N",
            "-i", str(self.key), "-p", str(port), "-l", self.user,
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            "-o", f"Ciphers={cipher}",
        ]  # fmt: skip
        for public, target in forwards:
            argv += ["-R", f"{public}:127.0.0.1:{target}"]
        return argv + ["127.0.0.1"]

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)


class Ssh(Variant):
    sshd: SshD | None = None

    def start(self) -> None:
        pub = TargetPorts(*free_ports(3))
        self.public = pub
        forwards = [
            (pub.iperf, self.targets.iperf),
            (pub.http, self.targets.http),
            (pub.echo, self.targets.echo),
        ]
        self.ssh = self._spawn(
            f"ssh-{self.name}", self.sshd.ssh_argv(CIPHERS[self.name], self.sshd.port, forwards)
        )
        for port, _ in forwards:
            wait_until(
                f"ssh -R on {port}",
                lambda port=port: listening(port),
                procs=[(self.procs, self.ssh, f"ssh-{self.name}")],
            )

    def tunnel_pids(self) -> dict[str, list[int]]:
        # sshd forks per connection (monitor + session child); count the whole tree.
        return {
            "sshd": [self.sshd.proc.pid, *children_of(self.sshd.proc.pid)],
            "ssh": [self.ssh.pid],
        }

    def start_slow_path(self, delay_port: int, public_port: int, args) -> int:
        self._delay_line(delay_port, self.sshd.port, args)
        argv = self.sshd.ssh_argv(
            CIPHERS[self.name], delay_port, [(public_port, self.targets.iperf)]
        )
        proc = self._spawn(f"ssh-slow-{self.name}", argv, slow=True)
        wait_until(
            "ssh -R through the delay line",
            lambda: listening(public_port),
            timeout=30,
            procs=[(self.procs, proc, f"ssh-slow-{self.name}")],
        )
        return public_port


class Relay(Variant):
    def start(self) -> None:
        self.state = self.work / "relay-state"
        self.tunnel_port, *pub = free_ports(4)
        self.public = TargetPorts(*pub)
        self.slow_public = free_ports(1)[0]
        allowed = ",".join(map(str, [*pub, self.slow_public]))
        relay = str(VENV_BIN / "relay")
        run([relay, "init", "--state", str(self.state)], 60)
        self.token = self.work / "agent.token"
        self.token.write_text(
            run(
                [relay, "agent-token", "--state", str(self.state), "bench", "--ports", allowed], 60
            ).stdout
        )
        self.token.chmod(0o600)
        self.slow_token = self.work / "agent-slow.token"
        self.slow_token.write_text(
            run(
                [
                    relay,
                    "agent-token",
                    "--state",
                    str(self.state),
                    "bench-slow",
                    "--ports",
                    allowed,
                ],
                60,
            ).stdout
        )
        self.slow_token.chmod(0o600)
        self.server = self._start_server("relay-server", self.tunnel_port)
        exposes = [
            (self.public.iperf, self.targets.iperf),
            (self.public.http, self.targets.http),
            (self.public.echo, self.targets.echo),
        ]
        self.agent = self._start_agent("relay-agent", self.tunnel_port, self.token, exposes)

    def _start_server(self, name: str, tunnel_port: int, extra: tuple[str, ...] | list[str] = ()) -> subprocess.Popen:
        twistd = str(VENV_BIN / "twistd")
        server = self._spawn(
            name,
            [
                twistd, "-n", f"--logfile={self.procs.logfile(f'{name}-twistd')}", "--pidfile=", "relay-server",
                "--state", str(self.state), "--tunnel", f"tcp:{tunnel_port}:interface=127.0.0.1",
                "--public-interface", "127.0.0.1", *extra,
            ],
        )  # fmt: skip
        wait_until(
            f"{name} tunnel port",
            lambda: listening(tunnel_port),
            procs=[(self.procs, server, name)],
        )
        return server

    def _start_agent(
        self, name: str, port: int, token: Path, exposes, slow: bool = False
    ) -> subprocess.Popen:
        logfile = self.procs.logfile(f"{name}-twistd")
        argv = [
            str(VENV_BIN / "twistd"), "-n", f"--logfile={logfile}", "--pidfile=", "relay-agent",
            "--relay", f"127.0.0.1:{port}", "--token-file", str(token), "--ca", str(self.state / "ca.pem"), "--no-proxy",
        ]  # fmt: skip
        for public, target in exposes:
            argv += ["--expose", f"{public}=127.0.0.1:{target}"]
        proc = self._spawn(name, argv, slow=slow)

        def ready() -> bool:
            text = logfile.read_text(errors="replace") if logfile.exists() else ""
            return text.count("relay listens on public port") >= len(exposes) and all(
                listening(p) for p, _ in exposes
            )

        wait_until(
            f"{name} to be served",
            ready,
            timeout=30,
            procs=[(self.procs, proc, name), (self.procs, self.server, "relay-server")],
        )
        return proc

    def tunnel_pids(self) -> dict[str, list[int]]:
        return {"relay": [self.server.pid], "agent": [self.agent.pid]}

    def start_slow_path(self, delay_port: int, public_port: int, args) -> int:
        self._delay_line(delay_port, self.tunnel_port, args)
        self._start_agent(
            "relay-agent-slow",
            delay_port,
            self.slow_token,
            [(self.slow_public, self.targets.iperf)],
            slow=True,
        )
        return self.slow_public


class RelayPair(Relay):
    """Two relay processes sharing the public ports (--reuse-port), each with its own tunnel
    port and its own agent process; the agents share one credential, the only one allowed
    those ports. The kernel spreads the clients of a public port over the two processes."""

    def start(self) -> None:
        self.state = self.work / "relay2-state"
        *tunnels, iperf, http, echo = free_ports(5)
        self.public = TargetPorts(iperf, http, echo)
        relay = str(VENV_BIN / "relay")
        run([relay, "init", "--state", str(self.state)], 60)
        token = self.work / "agent2.token"
        ports = ",".join(map(str, (iperf, http, echo)))
        token.write_text(run([relay, "agent-token", "--state", str(self.state), "bench2", "--ports", ports], 60).stdout)
        token.chmod(0o600)
        exposes = [(iperf, self.targets.iperf), (http, self.targets.http), (echo, self.targets.echo)]
        self.servers, self.agents = [], []
        for n, tunnel in enumerate(tunnels, 1):
            self.server = self._start_server(f"relay-server-{n}", tunnel, ["--reuse-port"])
            self.servers.append(self.server)
            self.agents.append(self._start_agent(f"relay-agent-{n}", tunnel, token, exposes))

    def tunnel_pids(self) -> dict[str, list[int]]:
        return {"relay": [p.pid for p in self.servers], "agent": [p.pid for p in self.agents]}

    def start_slow_path(self, delay_port: int, public_port: int, args) -> int:
        raise BenchError("relay2 has no delay-line workload")


# ---------------------------------------------------------------- measurement helpers


def system_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(vals[:8])


class CpuMeter:
    """CPU seconds of each role's processes over a block, plus how busy the whole machine was."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def _split(self) -> dict[str, tuple[float, float]]:
        out = {}
        for role, pids in self.pids.items():
            times = [cpu_times(p) for p in pids]
            out[role] = (sum(t[0] for t in times), sum(t[1] for t in times))
        return out

    def __enter__(self):
        self.before = {role: sum(map(cpu_seconds, pids)) for role, pids in self.pids.items()}
        self.split_before = self._split()
        self.sys_before = system_ticks()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.delta = {
            role: sum(map(cpu_seconds, pids)) - self.before[role]
            for role, pids in self.pids.items()
        }
        after = self._split()
        self.user_sys = {
            role: {
                "user": round(after[role][0] - self.split_before[role][0], 3),
                "sys": round(after[role][1] - self.split_before[role][1], 3),
            }
            for role in after
        }
        busy, steal, total = (a - b for a, b in zip(system_ticks(), self.sys_before, strict=True))
        ncpu = os.cpu_count() or 1
        self.machine = {
            "busy_cpus": round(busy / max(total, 1) * ncpu, 2),  # of ncpu
            "steal_pct": round(100 * steal / max(total, 1), 1),
            "wall_s": round(time.monotonic() - self.t0, 2),
        }
        return False


def per_gb(delta: dict[str, float], nbytes: int) -> dict[str, float]:
    gb = nbytes / 1e9
    out = {role: round(s / gb, 3) for role, s in delta.items()} if gb > 0 else {}
    if out:
        out["total"] = round(sum(delta.values()) / gb, 3)
    return out


def iperf(
    port: int, seconds: float, reverse: bool = False, parallel: int = 1, nbytes: int = 0
) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-J", "--connect-timeout", "5000"]
    # a byte count (-n) instead of a duration (-t); the timeout allows 20 MB/s
    argv += ["-n", str(nbytes)] if nbytes else ["-t", str(max(1, round(seconds)))]
    seconds = nbytes / 20e6 if nbytes else seconds
    if reverse:
        argv.append("-R")
    if parallel > 1:
        argv += ["-P", str(parallel)]
    for attempt in range(5):
        res = run(argv, timeout=seconds + 30, check=False)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            data = {"error": res.stderr.strip() or res.stdout.strip()[-300:]}
        err = data.get("error")
        if err and "busy" in err and attempt < 4:
            time.sleep(1)  # the server is still finishing the previous test
            continue
        if err:
            raise BenchError(f"iperf3 -p {port}: {err}")
        recv = data["end"]["sum_received"]
        return {
            "bytes": int(recv["bytes"]),
            "seconds": recv["seconds"],
            "MBps": round(recv["bytes"] / recv["seconds"] / 1e6, 1),
        }
    raise BenchError("iperf3 server stayed busy")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(port: int, seconds: float, close: bool) -> dict:
    argv = [
        "wrk",
        "-c",
        "32",
        "-t",
        "2",
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    res = run([*argv, f"http://127.0.0.1:{port}/1k.bin"], timeout=seconds + 60)
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p99):
        raise BenchError(f"cannot parse wrk output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = re.search(r"(\d+) requests in", out)
    return {
        "rps": round(float(rps.group(1)), 1),
        "p50_ms": round(_ms(p50.group(1)), 3),
        "p99_ms": round(_ms(p99.group(1)), 3),
        "requests": int(requests.group(1)) if requests else None,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def echo_pingpong(port: int, seconds: float, interval: float = 0.005, size: int = 64) -> dict:
    """One connection; every `interval` send `size` bytes and wait for them to come back."""
    payload = os.urandom(size)
    samples: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n * interval
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                if not chunk:
                    raise BenchError("echo connection closed")
                got += len(chunk)
            samples.append((time.perf_counter() - t0) * 1e3)
            n += 1
    if len(samples) < 10:
        raise BenchError(f"only {len(samples)} echo samples")
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return {
        "samples": len(samples),
        "p50_ms": round(pick(0.50), 3),
        "p99_ms": round(pick(0.99), 3),
        "max_ms": round(samples[-1], 3),
    }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_idle_streams(port: int, count: int, batch: int = 100) -> list[socket.socket]:
    """Open `count` connections, each proven end to end with a 1-byte echo, in batches so no
    listen backlog overflows (a dropped SYN costs a 1 s retransmit)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            fresh = []
            for _ in range(min(batch, count - len(socks))):
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                fresh.append(s)
                socks.append(s)
            for s in fresh:
                s.sendall(b"x")
            for s in fresh:
                if s.recv(1) != b"x":
                    raise BenchError("an idle stream did not echo")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# ---------------------------------------------------------------- workloads


def measure_bulk(v: Variant, args, res: dict) -> None:
    pids = v.tunnel_pids()
    for key, reverse, parallel in (("bulk1_fwd", False, 1), ("bulk1_rev", True, 1)):
        with CpuMeter(pids) as cpu:
            r = iperf(v.public.iperf, args.seconds, reverse=reverse, parallel=parallel)
        res[f"{key}_MBps"] = r["MBps"]
        res[f"{key}_detail"] = {
            **r,
            "cpu_s": {k: round(x, 3) for k, x in cpu.delta.items()},
            "cpu_s_per_GB": per_gb(cpu.delta, r["bytes"]),
            "cpu_user_sys_s": cpu.user_sys,
            "machine": cpu.machine,
        }
        if pids:
            res[f"{key}_cpu_s_per_GB"] = per_gb(cpu.delta, r["bytes"])["total"]
        log(
            f"  {v.name} {key}: {r['MBps']} MB/s {per_gb(cpu.delta, r['bytes']) if pids else ''} machine {cpu.machine}"
        )


def measure_gib(v: Variant, args, res: dict) -> None:
    """Exactly 1 GiB (--quick: 128 MiB) in one stream, client to target (iperf3 -n), timed by
    iperf3's receiver."""
    with CpuMeter(v.tunnel_pids()) as cpu:
        r = iperf(v.public.iperf, 0, nbytes=args.gib_bytes)
    res["gib_MBps"] = r["MBps"]
    res["gib_detail"] = {**r, "cpu_s": {k: round(x, 3) for k, x in cpu.delta.items()}}
    log(f"  {v.name} gib: {r['bytes']} bytes in {r['seconds']:.2f} s = {r['MBps']} MB/s")


def measure_bulk4(v: Variant, args, res: dict) -> None:
    pids = v.tunnel_pids()
    with CpuMeter(pids) as cpu:
        r = iperf(v.public.iperf, args.seconds, parallel=4)
    res["bulk4_MBps"] = r["MBps"]
    res["bulk4_detail"] = {
        **r,
        "cpu_s_per_GB": per_gb(cpu.delta, r["bytes"]),
        "machine": cpu.machine,
    }
    if pids:
        res["bulk4_cpu_s_per_GB"] = per_gb(cpu.delta, r["bytes"])["total"]
    log(f"  {v.name} bulk4: {r['MBps']} MB/s")


def measure_http(v: Variant, args, res: dict, close: bool) -> None:
    key = "newconn" if close else "keepalive"
    with CpuMeter(v.tunnel_pids()) as cpu:
        r = wrk(v.public.http, args.seconds, close)
    res[f"{key}_rps"] = r["rps"]
    res[f"{key}_p99_ms"] = r["p99_ms"]
    res[f"{key}_detail"] = {
        **r,
        "cpu_s": {k: round(x, 3) for k, x in cpu.delta.items()},
        "machine": cpu.machine,
    }
    bad = sum(r["socket_errors"].values()) + r["non_2xx"]
    log(
        f"  {v.name} {key}: {r['rps']} req/s p99 {r['p99_ms']} ms"
        + (f" ({bad} errors)" if bad else "")
    )


def measure_echo(v: Variant, args, res: dict) -> None:
    time.sleep(1.0)  # let connections of the previous workload finish closing
    idle = echo_pingpong(v.public.echo, min(args.seconds, 2.0))
    res["echo_idle_p50_ms"], res["echo_idle_p99_ms"] = idle["p50_ms"], idle["p99_ms"]
    bulk: dict = {}

    def load() -> None:
        try:
            bulk.update(iperf(v.public.iperf, args.seconds + 1.5))
        except Exception as e:  # reported below
            bulk["error"] = str(e)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.7)  # let the bulk stream reach full speed first
    try:
        loaded = echo_pingpong(v.public.echo, args.seconds)
    finally:
        t.join()
    if "error" in bulk:
        raise BenchError(f"bulk stream beside the echo: {bulk['error']}")
    res["echo_load_p50_ms"], res["echo_load_p99_ms"] = loaded["p50_ms"], loaded["p99_ms"]
    res["echo_load_bulk_MBps"] = bulk["MBps"]
    res["echo_detail"] = {"idle": idle, "load": loaded, "bulk": bulk}
    log(
        f"  {v.name} echo: idle p50/p99 {idle['p50_ms']}/{idle['p99_ms']} ms; under load {loaded['p50_ms']}/{loaded['p99_ms']} ms beside {bulk['MBps']} MB/s"
    )


def measure_memory(v: Variant, args, res: dict) -> None:
    pids = v.tunnel_pids()
    if not pids:
        return
    time.sleep(0.5)
    before = {role: sum(map(pss_kib, p)) for role, p in pids.items()}
    socks = open_idle_streams(v.public.echo, args.streams)
    try:
        time.sleep(1.0)
        pids = v.tunnel_pids()  # same processes; sshd's tree is re-read in case it forked
        during = {role: sum(map(pss_kib, p)) for role, p in pids.items()}
    finally:
        for s in socks:
            s.close()
    total = sum(during.values()) - sum(before.values())
    res["mem_kib_per_stream"] = round(total / args.streams, 2)
    res["memory_detail"] = {
        "streams": args.streams,
        "pss_kib_before": before,
        "pss_kib_with_streams": during,
        "kib_per_stream_by_role": {
            r: round((during[r] - before[r]) / args.streams, 2) for r in before
        },
    }
    log(
        f"  {v.name} memory: {res['mem_kib_per_stream']} KiB/stream ({args.streams} streams; PSS {before} -> {during})"
    )
    time.sleep(1.0)  # let the streams close before the next workload


def measure_rtt(v: Variant, args, res: dict) -> None:
    delay_port, public_port = free_ports(2)
    port = v.start_slow_path(delay_port, public_port, args)
    try:
        r = iperf(port, max(args.seconds, 3))
    finally:
        v.stop_slow_path()
    res["rtt40_MBps"] = r["MBps"]
    res["rtt40_detail"] = {**r, "rtt_ms": args.rtt_ms, "rate_cap_MBps": args.rtt_rate}
    log(
        f"  {v.name} rtt40: {r['MBps']} MB/s over {args.rtt_ms:.0f} ms RTT, cap {args.rtt_rate:.0f} MB/s"
    )


def run_workloads(v: Variant, args) -> dict:
    res: dict = {}
    steps = {
        "gib": lambda: measure_gib(v, args, res),
        "bulk1": lambda: measure_bulk(v, args, res),
        "bulk4": lambda: measure_bulk4(v, args, res),
        "keepalive": lambda: measure_http(v, args, res, close=False),
        "newconn": lambda: measure_http(v, args, res, close=True),
        "echo": lambda: measure_echo(v, args, res),
        "memory": lambda: measure_memory(v, args, res),
        "rtt40": lambda: measure_rtt(v, args, res),
    }
    if v.name == "ssh-chacha" and not args.rtt_all_ssh:
        steps.pop("rtt40")
    if v.name == "socat":  # a baseline for the data path only: no delay line, no idle streams
        steps.pop("rtt40")
        steps.pop("memory")
    if v.name == "relay2":
        steps = {k: f for k, f in steps.items() if k in RELAY2_WORKLOADS}
    for name in [w for w in WORKLOADS if w in args.workloads]:
        if name not in steps:
            continue
        try:
            steps[name]()
        except (BenchError, subprocess.TimeoutExpired, OSError) as e:
            res.setdefault("errors", {})[name] = str(e)
            log(f"  {v.name} {name}: FAILED: {e}")
        time.sleep(0.3)
    return res


# ---------------------------------------------------------------- profile (py-spy)


def profile_relay(v: Relay, args, outdir: Path) -> dict:
    """py-spy record on the relay and the agent while (1) one iperf3 stream, (2) four (only
    with the bulk4 workload) and (3) wrk with a new connection per request run through them."""
    pyspy = shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if not pyspy:
        raise BenchError("py-spy is not installed (.venv/bin/pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)
    seconds = max(args.seconds, 5)
    out: dict = {"native": args.profile_native, "rate_hz": 250}
    loads = {
        "bulk1": lambda: iperf(v.public.iperf, seconds - 1),
        "bulk4": lambda: iperf(v.public.iperf, seconds - 1, parallel=4),
        "newconn": lambda: wrk(v.public.http, seconds - 1, close=True),
    }
    for load, runner in loads.items():
        if load == "bulk4" and "bulk4" not in args.workloads:
            continue  # profiled only when asked for
        if (
            load == "newconn"
            and "newconn" not in args.workloads
            and "keepalive" not in args.workloads
        ):
            continue  # nginx was not started
        spies = {}
        for role, pid in (("relay", v.server.pid), ("agent", v.agent.pid)):
            raw = outdir / f"profile-{load}-{role}{'-native' if args.profile_native else ''}.txt"
            raw.unlink(missing_ok=True)
            argv = [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds) + 1),
                "--rate",
                "250",
            ]
            argv += ["--format", "raw", "--function", "--idle", "-o", str(raw)]
            # --native unwinds C frames (OpenSSL, the socket calls) but must stop the process per sample
            argv.append("--native" if args.profile_native else "--nonblocking")
            spies[role] = (v.procs.start(f"py-spy-{load}-{role}", argv), raw)
        time.sleep(0.5)
        try:
            with CpuMeter(v.tunnel_pids()) as cpu:
                r = runner()
        finally:
            for proc, _ in spies.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    v.procs.stop(proc)
        prof: dict = {"result": r, "cpu_s": {k: round(x, 3) for k, x in cpu.delta.items()}}
        if "bytes" in r:
            prof["cpu_s_per_GB"] = per_gb(cpu.delta, r["bytes"])
        for role, (_, raw) in spies.items():
            if raw.exists():
                prof[role] = summarize_pyspy(raw)
                prof[role]["raw"] = str(raw)
            else:
                prof[role] = {
                    "error": f"py-spy wrote nothing; see {v.procs.logfile(f'py-spy-{load}-{role}')}"
                }
        out[load] = prof
        time.sleep(0.5)
    return out


# A main-thread sample whose innermost Python frame is the reactor's poll is the reactor waiting.
_IDLE_LEAF = re.compile(
    r"^(EPollReactor\.doPoll|epoll_wait|__GI_epoll_wait|_PollLikeMixin\.doPoll)\b"
)


def summarize_pyspy(raw: Path, top: int = 15) -> dict:
    """Self and inclusive time per function of the reactor (main) thread, from py-spy's
    collapsed stacks; other threads (Twisted's resolver pool) are idle and left out."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any(f.startswith("ReactorBase.run ") for f in frames):
            continue  # not the reactor thread
        n = int(count)
        total += n
        leaf = frames[-1]
        if _IDLE_LEAF.match(leaf) or (leaf.startswith("EPollReactor.doPoll") and len(frames) > 0):
            # with --native the leaf may be the C epoll_wait below doPoll
            idle += n
            continue
        if any(_IDLE_LEAF.match(f) for f in frames[-3:]) and not any(
            "doRead" in f or "doWrite" in f for f in frames
        ):
            idle += n
            continue
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    busy = total - idle

    def pct(x: int, d: int) -> float:
        return round(100.0 * x / d, 1) if d else 0.0

    ranked_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:top]
    ranked_incl = sorted(incl.items(), key=lambda kv: -kv[1])
    ranked_incl = [(f, n) for f, n in ranked_incl if n < 0.97 * busy][
        : top + 10
    ]  # drop the reactor scaffolding
    return {
        "samples": total,
        "busy_pct_of_wall": pct(busy, total),
        "self_pct_of_busy": [(f, pct(n, busy)) for f, n in ranked_self],
        "inclusive_pct_of_busy": [(f, pct(n, busy)) for f, n in ranked_incl],
    }


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    info: dict = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["mem_total"] = (
            Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
        )
    with contextlib.suppress(ImportError):
        import twisted

        info["twisted"] = twisted.__version__
    with contextlib.suppress(ImportError):
        import OpenSSL
        from OpenSSL import SSL

        info["pyopenssl"] = OpenSSL.__version__
        info["openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    for name, argv in {
        "openssh": ["ssh", "-V"],
        "iperf3": ["iperf3", "--version"],
        "wrk": ["wrk", "-v"],
        "nginx": [tool("nginx") or "nginx", "-v"],
    }.items():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            info[name] = (
                (r.stdout + r.stderr).strip().splitlines()[0]
                if (r.stdout + r.stderr).strip()
                else ""
            )
    return info


def median_of_rounds(rounds: list[dict]) -> dict:
    """One variant's results over several rounds: each figure of METRICS is the median of
    the rounds that produced it; the details are the last round's; errors of every round
    are kept, by round; `rounds` lists every round's figures, so the spread is on record."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[-1])
    for key, *_ in METRICS:
        values = sorted(r[key] for r in rounds if isinstance(r.get(key), (int, float)))
        if values:
            mid = len(values) // 2
            out[key] = values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 3)
        else:
            out.pop(key, None)
    errors = {f"round {i + 1}: {w}": e for i, r in enumerate(rounds) for w, e in r.get("errors", {}).items()}
    if errors:
        out["errors"] = errors
    else:
        out.pop("errors", None)
    out["rounds"] = [{k: r.get(k) for k, *_ in METRICS if k in r} for r in rounds]
    return out


def ratio(a, b, higher_is_better: bool) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a <= 0 or b <= 0:
        return None
    return a / b


def compute_targets(results: dict) -> list[dict]:
    relay = results.get("relay", {})
    ssh = results.get("ssh-aes", {})
    direct = results.get("direct", {})
    targets = []

    def add(name, value, ok, detail):
        targets.append({"target": name, "value": value, "met": ok, "detail": detail})

    for key, label in (
        ("bulk1_fwd_MBps", "one stream client->target"),
        ("bulk1_rev_MBps", "one stream target->client"),
        ("bulk4_MBps", "4 streams"),
    ):
        r = ratio(relay.get(key), ssh.get(key), True)
        add(
            f"{label} >= 1.0x ssh -R aes128-gcm",
            r,
            None if r is None else r >= 1.0,
            f"{relay.get(key)} vs {ssh.get(key)} MB/s",
        )
    for kind, label in (("keepalive", "keep-alive req/s"), ("newconn", "new conn/s")):
        r = ratio(relay.get(f"{kind}_rps"), ssh.get(f"{kind}_rps"), True)
        p = ratio(relay.get(f"{kind}_p99_ms"), ssh.get(f"{kind}_p99_ms"), False)
        ok = None if r is None or p is None else (r >= 1.0 and p <= 1.0)
        add(
            f"{label} >= 1.0x ssh -R with p99 no worse",
            r,
            ok,
            f"{relay.get(f'{kind}_rps')} vs {ssh.get(f'{kind}_rps')}/s; p99 {relay.get(f'{kind}_p99_ms')} vs {ssh.get(f'{kind}_p99_ms')} ms",
        )
    r = ratio(relay.get("echo_load_p99_ms"), ssh.get("echo_load_p99_ms"), False)
    add(
        "echo p99 under load no worse than ssh -R",
        r,
        None if r is None else r <= 1.0,
        f"{relay.get('echo_load_p99_ms')} vs {ssh.get('echo_load_p99_ms')} ms (ratio relay/ssh, lower is better)",
    )
    m = relay.get("mem_kib_per_stream")
    add(
        "<= 8 KiB PSS per idle stream (relay+agent)",
        m,
        None if m is None else m <= 8.0,
        f"{m} KiB/stream at {results.get('_streams')} streams",
    )
    r = ratio(relay.get("rtt40_MBps"), direct.get("rtt40_MBps"), True)
    add(
        "40 ms RTT one stream >= 80% of direct",
        r,
        None if r is None else r >= 0.8,
        f"{relay.get('rtt40_MBps')} vs {direct.get('rtt40_MBps')} MB/s",
    )
    return targets


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x >= 1000:
            return f"{x:,.0f}"
        if x >= 100:
            return f"{x:.0f}"
        if x >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    return str(x)


def table(results: dict, variants: list[str]) -> str:
    cols = [v for v in VARIANTS if v in variants]
    ratio_cols = []
    if "relay" in cols and "ssh-aes" in cols:
        ratio_cols.append(("relay/ssh-aes", "relay", "ssh-aes"))
    if "relay" in cols and "ssh-chacha" in cols:
        ratio_cols.append(("relay/ssh-chacha", "relay", "ssh-chacha"))
    if "relay" in cols and "socat" in cols:
        ratio_cols.append(("relay/socat", "relay", "socat"))
    if "relay" in cols and "direct" in cols:
        ratio_cols.append(("relay/direct", "relay", "direct"))
    if "relay2" in cols and "ssh-aes" in cols:
        ratio_cols.append(("relay2/ssh-aes", "relay2", "ssh-aes"))
    if "relay2" in cols and "relay" in cols:
        ratio_cols.append(("relay2/relay", "relay2", "relay"))
    header = ["workload", "unit", *cols, *(c[0] for c in ratio_cols)]
    rows = [header]
    for key, label, unit, hib, _ in METRICS:
        vals = [results.get(v, {}).get(key) for v in cols]
        if all(x is None for x in vals):
            continue
        row = [label, unit + (" ↑" if hib else " ↓"), *map(fmt, vals)]
        for _, a, b in ratio_cols:
            r = ratio(results.get(a, {}).get(key), results.get(b, {}).get(key), hib)
            row.append(f"{r:.2f}x" if r is not None else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
            )
            + " |"
        )
        if n == 0:
            lines.append(
                "|"
                + "|".join(
                    "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
                )
                + "|"
            )
    return "\n".join(lines)


def plot(results: dict, variants: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (.venv/bin/pip install matplotlib)")
        return False
    base = "ssh-aes"
    shown = [v for v in ("relay", "relay2", "ssh-chacha", "socat", "direct") if v in variants and v != base]
    if base not in variants or not shown:
        log("plot needs ssh-aes and another variant: no plot")
        return False
    keys = [
        (k, short, hib)
        for k, _, _, hib, short in METRICS
        if results.get(base, {}).get(k) is not None
        and any(results.get(v, {}).get(k) is not None for v in shown)
    ]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=80)
    width = 0.8 / len(shown)
    colors = {"relay": "#1f77b4", "relay2": "#9ecae1", "ssh-chacha": "#ff7f0e", "socat": "#2ca02c", "direct": "#9a9a9a"}
    for i, v in enumerate(shown):
        xs, ys = [], []
        for j, (k, _, hib) in enumerate(keys):
            a, b = results.get(v, {}).get(k), results[base][k]
            r = ratio(a, b, hib)
            if r is not None:
                xs.append(j + (i - (len(shown) - 1) / 2) * width)
                ys.append(r if hib else 1 / r)
        ax.bar(xs, ys, width, label=LABELS[v], color=colors[v])
        if v == "relay":
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{y:.2f}",
                    (x, y),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([lbl for _, lbl, _ in keys], rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("better than ssh -R aes128-gcm  (x, log scale; >1 = better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def missing_tools(variants: list[str], workloads: list[str]) -> list[str]:
    need = {"iperf3"}
    if {"keepalive", "newconn"} & set(workloads):
        need.add("wrk")
        need.add("nginx")
    if any(v.startswith("ssh") for v in variants):
        need |= {"sshd", "ssh", "ssh-keygen"}
    if "socat" in variants:
        need.add("socat")
    found = {t for t in need if tool(t)}
    return sorted(need - found)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run", description="relay vs ssh -R vs direct TCP on loopback"
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="seconds per workload (default 4; --quick: 1)"
    )
    p.add_argument("--quick", action="store_true", help="1 s per workload, 200 idle streams")
    p.add_argument(
        "--only", default=",".join(VARIANTS), help=f"comma list of variants ({','.join(VARIANTS)})"
    )
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma list ({','.join(WORKLOADS)})"
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        help="idle streams for the memory workload (default 2000)",
    )
    p.add_argument(
        "--rtt-ms", type=float, default=40.0, help="round trip of the delay line (default 40)"
    )
    p.add_argument(
        "--rtt-rate",
        type=float,
        default=50.0,
        help="rate cap of the delay line, MB/s per direction (default 50)",
    )
    p.add_argument(
        "--rtt-all-ssh",
        action="store_true",
        help="also run the delay-line workload for ssh -R chacha20",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write results here (default bench/results/<date>.json)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the ratio plot here (default next to the JSON)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, alternating their order, and report the "
        "median of each figure (the machine's speed drifts; default 1)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy the relay and agent under one iperf3 stream",
    )
    p.add_argument(
        "--profile-native", action="store_true", help="with --profile: include native (C) frames"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the work dir (configs, logs) for inspection"
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    args.variants = [v for v in (x.strip() for x in args.only.split(",")) if v]
    args.workloads = [w for w in (x.strip() for x in args.workloads.split(",")) if w]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--only: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"--workloads: unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 4.0
    if args.streams is None:
        args.streams = 200 if args.quick else 2000
    args.gib_bytes = 2**27 if args.quick else 2**30
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_tools(args.variants, args.workloads)
    if missing:
        pkgs = sorted({TOOLS.get(t, "openssh-client") for t in missing})
        print(
            f"bench: error: missing {', '.join(missing)}; install them: apt-get install -y {' '.join(pkgs)} (bench/run does)",
            file=sys.stderr,
        )
        return 2
    raise_nofile()
    # A kill (SIGTERM, a closed terminal) must stop what the run started, as Ctrl-C does:
    # the finally below only runs if the signal becomes an exception.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    stamp = dt.datetime.now()
    json_path = args.json or BENCH / "results" / f"{stamp:%Y-%m-%dT%H%M%S}.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    procs = Procs(work)
    results: dict = {"_streams": args.streams}
    profile = None
    t0 = time.monotonic()
    with CpuMeter({}) as idle_check:
        time.sleep(1.0)
    background = {**idle_check.machine, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    log(f"work dir {work}; variants {','.join(args.variants)}; {args.seconds:g} s per workload")
    log(
        f"machine before start: {background['busy_cpus']} CPUs busy, load average {' '.join(background['loadavg'])}"
    )
    try:
        targets = Targets(procs, work, args.variants)
        targets.start(need_http=bool({"keepalive", "newconn"} & set(args.workloads)))
        sshd = None
        if any(v.startswith("ssh") for v in args.variants):
            sshd = SshD(procs, work, free_ports(1)[0])
            sshd.start()
            Ssh.sshd = sshd
        per_round: dict[str, list[dict]] = {}
        order = [name for name in VARIANTS if name in args.variants]
        for round_no in range(args.rounds):
            if args.rounds > 1:
                log(f"round {round_no + 1} of {args.rounds}")
            for name in order if round_no % 2 == 0 else order[::-1]:
                results[name] = {}
                run_variant(name, args, targets, procs, work, json_path, results, profile=round_no == 0)
                per_round.setdefault(name, []).append(results.pop(name))
                profile = results.pop("_profile", profile)
        for name, rounds in per_round.items():
            results[name] = median_of_rounds(rounds)
        if sshd is not None:
            sshd.stop()
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    _report(args, results, profile, stamp, t0, background, json_path, plot_path)
    return 1 if any(r.get("errors") for r in results.values() if isinstance(r, dict)) else 0


def _exit_on_signal(signum, frame) -> None:
    # Once: a second kill during the clean-up would abort it half way.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def run_variant(name: str, args, targets, procs, work, json_path, results: dict, profile: bool) -> None:
    """Start one variant, run the workloads on it into results[name], stop it. With
    --profile (and profile: the first round), the relay's py-spy profile goes to
    results["_profile"]."""
    cls = {
        "direct": Direct,
        "socat": Socat,
        "ssh-aes": Ssh,
        "ssh-chacha": Ssh,
        "relay": Relay,
        "relay2": RelayPair,
    }[name]
    v = cls(name=name, targets=targets.ports[name], procs=procs, work=work)
    log(f"{LABELS[name]}: starting")
    try:
        v.start()
        results[name] = run_workloads(v, args)
        if args.profile and profile and name == "relay":
            log("relay: profiling relay and agent (py-spy) under iperf3 and wrk")
            results["_profile"] = profile_relay(v, args, json_path.parent)
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        results.setdefault(name, {}).setdefault("errors", {})["setup"] = str(e)
        log(f"{LABELS[name]}: FAILED: {e}")
    finally:
        v.stop()


def _report(args, results, profile, stamp, t0, background, json_path, plot_path) -> None:
    elapsed = time.monotonic() - t0
    streams = results.pop("_streams")
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": {**machine_info(), "background_before_start": background},
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "variants": args.variants,
            "workloads": args.workloads,
            "idle_streams": streams,
            "rtt_ms": args.rtt_ms,
            "rtt_rate_MBps": args.rtt_rate,
            "wrk": "-c 32 -t 2 --latency, 1 KiB file from nginx",
            "echo": "64 B ping-pong every 5 ms on one stream",
        },
        "metrics": [
            {"key": k, "label": lbl.strip(), "unit": u, "higher_is_better": h}
            for k, lbl, u, h, _ in METRICS
        ],
        "results": results,
        "targets": compute_targets({**results, "_streams": streams}),
    }
    if args.rounds > 1:
        by_round = [
            compute_targets(
                {
                    **{name: r["rounds"][i] for name, r in results.items() if len(r.get("rounds", [])) > i},
                    "_streams": streams,
                }
            )
            for i in range(args.rounds)
        ]
        for n, target in enumerate(report["targets"]):
            target["by_round"] = [round_targets[n]["value"] for round_targets in by_round]
    if profile is not None:
        report["profile"] = profile
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    rounds = f"; median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(
        f"relay benchmark {report['date']} ({report['machine'].get('nproc')} CPUs, {report['machine'].get('cpu', '?')}); {args.seconds:g} s per workload{rounds}; ↑ higher is better, ↓ lower is better"
    )
    print(table(results, args.variants))
    print()
    for t in report["targets"]:
        if t["value"] is None:
            continue
        mark = {True: "MET    ", False: "NOT MET", None: "?      "}[t["met"]]
        print(f"  {mark} {t['target']}: {t['value']:.2f} ({t['detail']})")
        if t.get("by_round"):
            print(f"          by round: {', '.join('-' if x is None else f'{x:.2f}' for x in t['by_round'])}")
    for name, r in results.items():
        for w, e in r.get("errors", {}).items():
            print(f"  ERROR {name} {w}: {e.splitlines()[0] if e else e}")
    if profile is not None:
        for load in ("bulk1", "bulk4", "newconn"):
            for role in ("relay", "agent"):
                prof = profile.get(load, {}).get(role)
                if not prof:
                    continue
                print(
                    f"\n  py-spy {load} {role}: busy {prof.get('busy_pct_of_wall')}% of wall; top self time (% of busy):"
                )
                for f, pct in prof.get("self_pct_of_busy", [])[:10]:
                    print(f"    {pct:5.1f}%  {f}")
    if not args.no_plot:
        title = f"relay vs ssh -R aes128-gcm, loopback, {report['machine'].get('nproc')} CPUs, {report['date'][:10]}"
        if plot(results, args.variants, plot_path, title):
            print(f"\nplot: {plot_path}")
    print(f"results: {json_path}  ({elapsed:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
