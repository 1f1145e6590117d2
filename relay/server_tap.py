"""`twistd relay-server`: options, first-run set-up, and the service tree of the relay."""

from __future__ import annotations

import ipaddress
import os
import re
import resource
import signal
import socket
from pathlib import Path

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from . import defaults
from .access import parse_policies
from .config import ConfigError, Option, merge
from .heap import freeze_startup_objects, keep_buffers_on_the_heap
from .server import Relay, RelaySettings
from .state import State, StateError, init_state
from .tls import server_options
from .tlswire import TunnelTLSFactory
from .tunnel import TunnelSettings

log = Logger()
FIRST_AGENT = "first-agent"

OPTIONS = {
    o.name: o
    for o in [
        Option("state", str, "state directory: CA, certificate, agent credentials", defaults.STATE_DIR),
        Option("tunnel", str, "Twisted server endpoint for agent tunnels (TLS is added)", defaults.TUNNEL_ENDPOINT),
        Option("config", str, "TOML file whose keys are these long options"),
        Option("public-interface", str, "address the public ports listen on ('' = all IPv4, '::' = all)", ""),
        Option(
            "reuse-port",
            bool,
            "share public ports with other relay processes on this host (SO_REUSEPORT); "
            "each port must be allowed to one agent only",
            False,
        ),
        Option("heartbeat-interval", float, "seconds between PINGs", defaults.HEARTBEAT_INTERVAL),
        Option("dead-after", int, "heartbeat intervals of silence before a tunnel is dead", defaults.HEARTBEAT_DEAD_AFTER),
        Option("handshake-timeout", float, "seconds a new tunnel has for TLS and hello", defaults.HANDSHAKE_TIMEOUT),
        Option("max-unauthenticated", int, "tunnels handshaking at once", defaults.MAX_UNAUTHENTICATED),
        Option("max-unauthenticated-per-ip", int, "tunnels handshaking at once from one address", defaults.MAX_UNAUTHENTICATED_PER_IP),
        Option("max-agents", int, "agents connected at once", defaults.MAX_AGENTS),
        Option("max-ports-per-agent", int, "public ports one agent may hold", defaults.MAX_PORTS_PER_AGENT),
        Option("max-streams", int, "concurrent streams per tunnel", defaults.MAX_STREAMS),
        Option("window-budget", int, "bytes per tunnel that stream windows may grow by", defaults.WINDOW_BUDGET),
        Option("open-timeout", float, "seconds the agent has to answer a new stream before its client is reset", defaults.OPEN_TIMEOUT),
        Option("drain-timeout", float, "seconds open streams may drain on SIGTERM", defaults.DRAIN_TIMEOUT),
        Option("ports", dict, "config file only: [ports.N] / [ports.default] access control tables", {}),
    ]
}


class Options(usage.Options):
    synopsis = "[--state DIR] [--tunnel ENDPOINT] [--config FILE] [options]"
    longdesc = (
        "Public relay: agents dial in over TLS (ALPN relay/1) and the relay listens on public "
        "ports for them. With no options: state in ./relay-state (created on first run), tunnel on tcp:7835."
    )
    optFlags = [[o.name, None, o.help] for o in OPTIONS.values() if o.kind is bool]
    optParameters = [
        [o.name, None, None, f"{o.help} (default: {o.default!r})"]
        for o in OPTIONS.values()
        if o.kind not in (dict, bool)
    ]

    def postOptions(self) -> None:
        given = {name: self.get(name) for name in OPTIONS}  # the command line's own values

        def where(name: str) -> str:
            if given[name] not in (None, [], False):
                return f"option --{name}"
            return f"config file {self['config']}: key '{name}'"

        try:
            self.update(merge(self, OPTIONS))
            self["port-policies"] = parse_policies(self["ports"], f"config file {self['config']}")
            # Checked here, before the state dir is made: twistd prints a usage error as one
            # line, and one raised in makeService as a traceback.
            _check_tunnel(self["tunnel"], where("tunnel"))
            _check_public_interface(self["public-interface"], where("public-interface"))
        except (ConfigError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


class RelayService(service.MultiService):
    """Stops in order: the tunnel listener first, then the relay drains its streams."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: self.relay.drain())
        return d


def makeService(config: Options) -> service.IService:  # noqa: N802 (twistd's name)
    from twisted.internet import reactor

    keep_buffers_on_the_heap()
    _raise_fd_limit()
    state = _open_state(Path(config["state"]))
    settings = RelaySettings(
        tunnel_port=_tunnel_port(config["tunnel"]),
        public_interface=config["public-interface"],
        reuse_port=config["reuse-port"],
        handshake_timeout=config["handshake-timeout"],
        max_unauthenticated=config["max-unauthenticated"],
        max_unauthenticated_per_ip=config["max-unauthenticated-per-ip"],
        max_agents=config["max-agents"],
        max_ports_per_agent=config["max-ports-per-agent"],
        drain_timeout=config["drain-timeout"],
        open_timeout=config["open-timeout"],
        port_policies=config["port-policies"],
        tunnel=TunnelSettings(
            heartbeat_interval=config["heartbeat-interval"],
            dead_after=config["dead-after"],
            max_streams=config["max-streams"],
            window_budget=config["window-budget"],
        ),
    )
    relay = Relay(reactor, state, settings)
    tls = server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path)
    endpoint = endpoints.serverFromString(reactor, config["tunnel"])  # checked in postOptions
    top = RelayService(relay)
    relay.setServiceParent(top)  # its start/stop runs the agents.json watcher (revocation)
    _reload_on_sighup(reactor, relay)
    listener = StreamServerEndpointService(endpoint, TunnelTLSFactory(tls, False, relay.tunnel_factory()))
    listener._raiseSynchronously = True  # a taken tunnel port must stop startup, not just log
    listener.setServiceParent(top)
    _first_run_hint(state, config["tunnel"])
    reactor.callWhenRunning(freeze_startup_objects)
    return top


def _reload_on_sighup(reactor, relay: Relay) -> None:
    """`kill -HUP`: re-read agents.json now and close tunnels whose credential was revoked
    (the relay also notices within its 2 s poll; this is for scripts that want it at once).

    A burst of signals is one re-read: the handler only asks the reactor for a check when
    none is waiting. Each call used to queue one, and a storm (thousands a second, while
    streams flowed) nested the handlers until RecursionError ended the main loop."""
    waiting = False

    def check() -> None:
        nonlocal waiting
        waiting = False  # a signal from now on may follow a change this check misses
        relay.check_credentials(force=True)

    def on_sighup(signum, frame) -> None:
        nonlocal waiting
        if waiting:
            return
        waiting = True
        reactor.callFromThread(check)

    try:
        signal.signal(signal.SIGHUP, on_sighup)
    except (ValueError, AttributeError):  # not the main thread (some tests), or no SIGHUP here
        return
    reactor.callWhenRunning(_drop_signals_a_full_wakeup_pipe_holds)


def _drop_signals_a_full_wakeup_pipe_holds() -> None:
    """Once the reactor has installed its signal wake-up pipe: when a storm of signals has
    filled it, the reactor will wake anyway, so the extra bytes are not needed. By default
    CPython then reports the full pipe from inside its C signal handler, which takes a lock
    the interrupted main thread may hold: under a SIGHUP storm the relay hung for good,
    serving nothing and deaf to SIGTERM."""
    try:
        fd = signal.set_wakeup_fd(-1)
        if fd != -1:
            signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or no wake-up pipe here
        pass


def _open_state(path: Path) -> State:
    try:
        return State(path)
    except StateError:
        pass
    if path.exists() and any(path.iterdir()) and not (path / "ca.pem").exists():
        raise usage.UsageError(f"{path} exists but is not a relay state dir; use --state with another directory")
    pin = init_state(path)
    log.info("created the relay state dir {path} (CA pin {pin})", path=str(path), pin=pin)
    return State(path)


def _first_run_hint(state: State, tunnel: str) -> None:
    """On a relay with no agents, make one and say how to run it (token by file, never in the log)."""
    if state.agents():
        return
    token = state.issue_token(FIRST_AGENT)
    token_file = state.path / "first-agent.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    port = _tunnel_port(tunnel) or defaults.TUNNEL_PORT
    log.info(
        "no agents yet: created agent {name}; its token is in {file}. On the inside host, copy that "
        "file and run:\n  twistd -n relay-agent --relay {host}:{port} --token-file first-agent.token "
        "--pin {pin} --expose 8080=127.0.0.1:80",
        name=FIRST_AGENT,
        file=str(token_file),
        host=socket.getfqdn(),
        port=port,
        pin=state.ca_pin(),
    )


def _check_tunnel(description: str, where: str) -> None:
    from twisted.internet import reactor

    try:
        endpoints.serverFromString(reactor, description)  # parses; listens only when started
    except Exception as e:  # noqa: BLE001 (an endpoint plugin may raise anything on bad input)
        raise ConfigError(f"{where}: {description!r} is not a Twisted server endpoint ({e}); try tcp:7835") from None


def _check_public_interface(interface: str, where: str) -> None:
    try:
        if interface:
            ipaddress.ip_address(interface.split("%", 1)[0])  # fe80::1%eth0 keeps its scope
    except ValueError:
        raise ConfigError(
            f"{where}: {interface!r} is not an IP address; give one of this host's addresses, "
            "'::' for all of them (IPv6 and IPv4), or leave it out for all IPv4 ones"
        ) from None


def _tunnel_port(endpoint: str) -> int | None:
    """The TCP port of a tcp:, tcp6: or ssl: endpoint string, given as its first argument
    (tcp:7835) or by name (tcp:port=7835:interface=...); None for other kinds (unix:)."""
    kind, *fields = re.split(r"(?<!\\):", endpoint)
    if kind.isdigit() and not fields:
        return int(kind)  # a bare port, which serverFromString reads as tcp
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [f for f in fields if "=" not in f]
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    text = named.get("port", positional[0] if positional else "")
    return int(text) if text.isdigit() else None


def _raise_fd_limit() -> None:
    """Every stream is a socket: let the relay use all the descriptors the system allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
