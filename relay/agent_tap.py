"""`twistd relay-agent`: options, trust, the way out (direct or via a proxy), and the agent service."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python import usage

from . import defaults
from .agent import AgentService, AgentSettings, Target
from .config import ConfigError, Option, merge, split_host_port
from .heap import freeze_startup_objects, keep_buffers_on_the_heap
from .proxy import ProxyClientEndpoint, parse_proxy_url, proxy_from_environment
from .tls import (
    PinnedClientOptions,
    TLSConfigError,
    client_options_for_ca,
    client_options_for_system_trust,
    load_client_certificate,
    parse_pin,
)
from .tlswire import TunnelTLSClientEndpoint
from .tunnel import TunnelSettings

log = Logger()

OPTIONS = {
    o.name: o
    for o in [
        Option("relay", str, "HOST:PORT of the relay ([v6]:PORT)"),
        Option("token", str, "agent token (visible to local users in argv: prefer --token-file or $RELAY_TOKEN)"),
        Option("token-file", str, "file holding the agent token"),
        Option("cert", str, "PEM file with this agent's key and client certificate (from `relay agent-cert`), instead of a token"),
        Option("ca", str, "trust this CA certificate and check the relay's hostname"),
        Option("pin", str, "accept the relay whose certificate or CA has this sha256:HEX"),
        Option("proxy", str, "socks5://, socks4a://, socks4:// or http:// proxy to reach the relay"),
        Option("no-proxy", bool, "ignore ALL_PROXY / HTTPS_PROXY in the environment", False),
        Option("expose", list, "PUBLIC=HOST:PORT: relay port PUBLIC goes to HOST:PORT (repeatable)", []),
        Option("config", str, "TOML file whose keys are these long options"),
        Option("heartbeat-interval", float, "seconds between PINGs", defaults.HEARTBEAT_INTERVAL),
        Option("dead-after", int, "heartbeat intervals of silence before the tunnel is dead", defaults.HEARTBEAT_DEAD_AFTER),
        Option("reconnect-max", float, "longest wait between reconnection attempts, seconds", defaults.RECONNECT_MAX),
        Option("connect-timeout", float, "seconds to reach the relay or a target", 10.0),
    ]
}


class Options(usage.Options):
    synopsis = "--relay HOST:PORT (--token-file F | $RELAY_TOKEN | --token T | --cert F) --expose PUBLIC=HOST:PORT [options]"
    longdesc = "Inside agent: dials out to a relay over one TLS connection and serves the ports it exposes."
    optFlags = [["no-proxy", None, OPTIONS["no-proxy"].help]]
    optParameters = [
        [o.name, None, None, f"{o.help}" + (f" (default: {o.default!r})" if o.default not in (None, []) else "")]
        for o in OPTIONS.values()
        if o.kind is not bool and o.name != "expose"
    ]

    def __init__(self) -> None:
        super().__init__()
        self["expose"] = []

    def opt_expose(self, value: str) -> None:
        """PUBLIC=HOST:PORT: relay port PUBLIC goes to HOST:PORT on this side (repeatable)."""
        self["expose"].append(value)

    def postOptions(self) -> None:
        # What came on the command line itself, before the --config file fills in: secrets
        # there are visible to every local user (ps, /proc/PID/cmdline).
        on_argv = {name: self.get(name) for name in ("token", "proxy")}
        try:
            self.update(merge(self, OPTIONS))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if not self["relay"]:
            raise usage.UsageError("--relay HOST:PORT is required (the relay's address, e.g. relay.example.com:7835)")
        if not self["expose"]:
            raise usage.UsageError("give at least one --expose PUBLIC=HOST:PORT, e.g. --expose 8080=127.0.0.1:80")
        if self["ca"] and self["pin"]:
            raise usage.UsageError("give --ca or --pin, not both")
        try:
            self["relay-address"] = split_host_port(self["relay"], "--relay")
            self["targets"] = parse_exposes(self["expose"])
            if self["pin"]:
                parse_pin(self["pin"])
            self["proxy-url"] = parse_proxy_url(self["proxy"]) if self["proxy"] else None
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["env-proxy-url"] = None
        if self["proxy-url"] is None and not self["no-proxy"]:
            # Read here, not in makeService: twistd prints a usage error as one line, and
            # one raised while it builds the service as a traceback.
            try:
                self["env-proxy-url"] = proxy_from_environment(*self["relay-address"])
            except ValueError as e:
                raise usage.UsageError(f"{e} (or run with --no-proxy)") from None
        if on_argv["proxy"] and self["proxy-url"].password:
            log.warn(
                "the proxy password was given on the command line, where other local users can "
                "see it; put proxy = \"...\" in the --config file (mode 0600) or set HTTPS_PROXY"
            )
        self["client-certificate"] = None
        if self["cert"]:
            # The relay authenticates by the certificate when one is presented, so a token
            # would only be one more secret to leak.
            if self["token"] or self["token-file"]:
                raise usage.UsageError("give --cert or a token (--token-file, --token), not both")
            if os.environ.get("RELAY_TOKEN"):
                log.info("--cert is given: ignoring $RELAY_TOKEN")
            self["client-certificate"] = read_client_certificate(self["cert"])
            self["token-value"] = None
        else:
            self["token-value"] = read_token(self["token"], self["token-file"], os.environ, bool(on_argv["token"]))


def parse_exposes(specs: list[str]) -> dict[int, Target]:
    targets: dict[int, Target] = {}
    for spec in specs:
        public, sep, target = spec.partition("=")
        if not sep or not public.isdigit() or not 1 <= int(public) <= 65535:
            raise ValueError(f"--expose {spec!r} must be PUBLIC=HOST:PORT with PUBLIC a port number")
        if int(public) in targets:
            raise ValueError(f"--expose: public port {public} is given twice")
        host, port = split_host_port(target, f"--expose {public}=")
        targets[int(public)] = Target(host, port)
    return targets


def read_client_certificate(cert_file: str):
    """The key and certificate of --cert FILE, checked now so that a bad file stops startup."""
    try:
        certificate = load_client_certificate(Path(cert_file))
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None
    if Path(cert_file).stat().st_mode & 0o077:
        log.warn("certificate file {file} (it holds the private key) is readable by other users; chmod 600 it", file=cert_file)
    return certificate


def read_token(token: str | None, token_file: str | None, env, on_argv: bool = True) -> str:
    """The token from --token-file, --token or $RELAY_TOKEN (in that order); UsageError if none.

    Not called with --cert: a certificate agent needs no token."""
    if token_file:
        path = Path(token_file)
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise usage.UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise usage.UsageError(
                f"--token-file {token_file} is not text; it should hold the one line `relay agent-token` printed"
            ) from None
        if not value:
            raise usage.UsageError(f"--token-file {token_file} is empty; put the line `relay agent-token` printed in it")
        if path.stat().st_mode & 0o077:
            log.warn("token file {file} is readable by other users; chmod 600 it", file=token_file)
    elif token:
        value = token
        if on_argv:
            log.warn("the token was given on the command line, where other local users can see it; prefer --token-file")
    else:
        value = env.get("RELAY_TOKEN", "")
    if not value:
        raise usage.UsageError("no credential: give --token-file FILE, set $RELAY_TOKEN, --token, or --cert FILE")
    return value


def makeService(config: Options):  # noqa: N802 (twistd's name)
    from twisted.internet import reactor

    keep_buffers_on_the_heap()
    host, port = config["relay-address"]
    client_certificate = config["client-certificate"]
    try:
        if config["pin"]:
            creator = PinnedClientOptions(host, config["pin"], client_certificate)
        elif config["ca"]:
            creator = client_options_for_ca(host, Path(config["ca"]), client_certificate)
        else:
            creator = client_options_for_system_trust(host, client_certificate)
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None
    proxy = config["proxy-url"] or config["env-proxy-url"]
    timeout = config["connect-timeout"]
    if proxy is not None:
        log.info("reaching the relay through the proxy {proxy}", proxy=str(proxy))
        inner = ProxyClientEndpoint(reactor, proxy, host, port, timeout=timeout)
    else:
        inner = HostnameEndpoint(reactor, host, port, timeout=timeout)
    settings = AgentSettings(
        token=config["token-value"],
        expose=config["targets"],
        connect_timeout=timeout,
        reconnect_max=config["reconnect-max"],
        tunnel=TunnelSettings(heartbeat_interval=config["heartbeat-interval"], dead_after=config["dead-after"]),
    )
    reactor.callWhenRunning(freeze_startup_objects)
    return AgentService(reactor, TunnelTLSClientEndpoint(creator, inner), settings, relay_name=config["relay"])
