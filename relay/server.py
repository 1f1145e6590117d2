"""The relay: authenticates agent tunnels, listens on public ports on their behalf, and turns
every public connection into a stream on the tunnel of the agent that owns the port."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer, error, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger, formatEvent

from . import defaults
from .access import OPEN, Gate, PortPolicy
from .listening import listen_public, quiet_accept_errors
from .logs import ThrottledLog
from .protocol import ErrorCode, Role, StreamLimitError
from .state import CERTIFICATE, Agent, Credential, State, StateError
from .tunnel import OpenStreams, Stream, Tunnel, TunnelSettings

# How often the relay looks at agents.json for revoked or rotated credentials (SIGHUP: at once).
CREDENTIAL_POLL_INTERVAL = 2.0


@dataclass(frozen=True)
class RelaySettings:
    tunnel_port: int | None = defaults.TUNNEL_PORT  # never handed out as a public port
    public_interface: str = ""
    reuse_port: bool = False  # share public ports with other relay processes (SO_REUSEPORT)
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    max_unauthenticated: int = defaults.MAX_UNAUTHENTICATED
    max_unauthenticated_per_ip: int = defaults.MAX_UNAUTHENTICATED_PER_IP
    max_agents: int = defaults.MAX_AGENTS
    max_ports_per_agent: int = defaults.MAX_PORTS_PER_AGENT
    drain_timeout: float = defaults.DRAIN_TIMEOUT
    open_timeout: float = defaults.OPEN_TIMEOUT
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)
    port_policies: dict[int | None, PortPolicy] = field(default_factory=dict)  # None: every other port

    def policy_for(self, port: int) -> PortPolicy:
        return self.port_policies.get(port, self.port_policies.get(None, OPEN))


class PublicStream(Stream):
    """A client of a public port; its stream is opened as soon as it connects."""

    def __init__(self, tunnel: RelayTunnel, port: int, gate: Gate, host: str) -> None:
        super().__init__(tunnel, 0)
        self.public_port = port
        self.gate = gate
        self.host = host

    def connectionLost(self, reason=None) -> None:
        self.gate.release(self.host)
        super().connectionLost(reason)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = peer.host.removeprefix("::ffff:")
        try:
            self.stream_id = self.tunnel.session.open_stream(self.public_port, host, peer.port)
        except StreamLimitError as e:
            self.tunnel.relay.throttled.warn(
                f"streams:{self.public_port}",
                "agent {agent}: refusing a client of port {port}: {why}",
                agent=self.tunnel.agent_name,
                port=self.public_port,
                why=str(e),
            )
            self.closing = True
            self.transport.abortConnection()
            return
        self.tunnel.streams[self.stream_id] = self
        self.tunnel.flush()
        super().connectionMade()
        self.read_at_once()


class PublicFactory(Factory):
    """Builds streams for one public port; the port's owner can change (takeover) without a re-listen."""

    noisy = False  # our own log lines say when a port opens and closes

    def __init__(self, port: int, tunnel: RelayTunnel, gate: Gate) -> None:
        self.port = port
        self.tunnel = tunnel
        self.gate = gate
        self.listening = None

    def buildProtocol(self, addr):
        tunnel = self.tunnel
        if tunnel is None or not tunnel.connected_tunnel or tunnel.session.going_away:
            return None  # Twisted closes the connection at once
        host = getattr(addr, "host", "")
        why = self.gate.admit(host)
        if why is not None:
            tunnel.relay.throttled.warn(f"gate:{self.port}", "public port {port}: refused a client: {why}", port=self.port, why=why)
            return None
        return PublicStream(tunnel, self.port, self.gate, host)


class RelayTunnel(Tunnel):
    role = Role.RELAY
    log = Logger()

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay.reactor, relay.settings.tunnel, relay.open_streams)
        self.relay = relay
        self.agent: Agent | None = None
        self.credential: Credential | None = None  # what it authenticated with, for revocation
        self._handshake_timer = None
        self._counted = False
        self._source = "?"  # the peer's address, once connected

    @property
    def agent_name(self) -> str:
        return self.agent.name if self.agent else "?"

    def connectionMade(self) -> None:
        super().connectionMade()
        self._source = getattr(self.transport.getPeer(), "host", "?")
        if self.relay.unauthenticated >= self.relay.settings.max_unauthenticated:
            self.relay.throttled.warn(
                "unauthenticated",
                "tunnel {peer}: refused, {n} connections are already handshaking",
                peer=self.peer,
                n=self.relay.unauthenticated,
            )
            self.transport.abortConnection()
            return
        held = self.relay.unauthenticated_by_source.get(self._source, 0)
        if held >= self.relay.settings.max_unauthenticated_per_ip:
            self.relay.throttled.warn(
                "unauthenticated-per-ip",
                "tunnel {peer}: refused, {n} connections from {source} are already handshaking",
                peer=self.peer,
                n=held,
                source=self._source,
            )
            self.transport.abortConnection()
            return
        self.relay.unauthenticated += 1
        self.relay.unauthenticated_by_source[self._source] = held + 1
        self._counted = True
        self._handshake_timer = self.reactor.callLater(self.relay.settings.handshake_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._handshake_timer = None
        # Limited like the other failures before hello: the handshake slots alone let
        # strangers with many addresses write one line per slot per timeout (25 a second
        # at the defaults).
        self._stranger_log(
            self.relay.throttled.warn,
            "slow",
            "tunnel {peer}: no TLS handshake and hello within {t:.0f} s; closing",
            peer=self.peer,
            t=self.relay.settings.handshake_timeout,
        )
        self.transport.abortConnection()

    def _authenticated(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._counted:
            self._counted = False
            self.relay.unauthenticated -= 1
            by_source = self.relay.unauthenticated_by_source
            by_source[self._source] -= 1
            if not by_source[self._source]:
                del by_source[self._source]

    def connectionLost(self, reason=None) -> None:
        self._authenticated()  # stop the timer and the count either way
        super().connectionLost(reason)
        if self.agent is not None:
            self.relay.detach(self)
        elif reason is not None and not reason.check(error.ConnectionDone, error.ConnectionLost):
            self._stranger_log(
                self.relay.throttled.info,
                "tls",
                "tunnel {peer}: closed before authenticating: {why}",
                peer=self.peer,
                why=reason.getErrorMessage(),
            )

    def peer_warning(self, kind: str, format: str, **fields) -> None:
        if self.agent is not None:
            super().peer_warning(kind, format, **fields)
        else:
            self._stranger_log(self.relay.throttled.warn, kind, format, **fields)

    def _stranger_log(self, emit, kind: str, format: str, **fields) -> None:
        # A stranger can fail a handshake, skip ALPN or send a bad frame before its hello as
        # fast as it connects, from as many addresses as it has: one line per address and
        # kind per 10 s, and GROUP_LINES lines of a kind in all (ThrottledLog).
        emit(f"{kind}:{self._source}", format, group=kind, **fields)

    def control_received(self, message: dict) -> None:
        kind = message.get("type")
        if self.agent is None:
            if kind != "hello":
                self.close(ErrorCode.PROTOCOL_ERROR, "the first message must be hello")
                return
            self._hello(message)
        elif kind == "listen":
            self._listen(message.get("ports"))
        else:
            self.throttled.info("control", "agent {agent}: ignoring control message {kind!r}", agent=self.agent_name, kind=kind)

    def _hello(self, message: dict) -> None:
        try:
            found, failure = self._authenticate(message)
        except StateError as e:
            # Before hello: a stranger can make this line, as often as it connects.
            self._stranger_log(
                self.relay.throttled.warn, "credentials", "tunnel {peer}: cannot check its credential: {why}", peer=self.peer, why=str(e)
            )
            self.close(ErrorCode.INTERNAL_ERROR, "the relay cannot check credentials now; try again later")
            return
        if found is None:
            self.peer_warning("auth", "tunnel {peer}: authentication failed ({why})", peer=self.peer, why=failure)
            self.close(ErrorCode.AUTH_FAILED, f"authentication failed: {failure}")
            return
        agent, credential = found
        if message.get("version") != 1:
            self.close(ErrorCode.PROTOCOL_ERROR, f"unsupported hello version {message.get('version')!r}")
            return
        if not self.relay.attach(self, agent):
            return
        self.agent = agent
        self.credential = credential
        self._authenticated()
        self.log.info(
            "agent {agent} connected from {peer} (authenticated by {method})",
            agent=agent.name,
            peer=self.peer,
            method=credential.method,
        )
        self.session.send_control({"type": "welcome", "agent": agent.name})
        self._listen(message.get("ports"))

    def _authenticate(self, message: dict) -> tuple[tuple[Agent, Credential] | None, str]:
        """(agent, credential), or None and why not (never quoting the token).

        A client certificate, if the agent presented one (TLS already checked that it
        chains to our CA), decides alone: it must be the agent's current one, and a token
        in the same hello is ignored. Without one, the hello's token decides.
        """
        state = self.relay.state
        peer_certificate = getattr(self.transport, "getPeerCertificate", lambda: None)()
        if peer_certificate is not None:
            cert = peer_certificate.to_cryptography()
            found = state.verify_certificate(cert.public_bytes(serialization.Encoding.DER))
            if found is None:
                subject = cert.subject.rfc4514_string()
                return None, f"the client certificate ({subject}) is not an agent's current certificate on this relay (replaced or revoked?)"
            return found, ""
        token = message.get("token")
        if token is None:
            return None, "no client certificate and no token"
        found = state.verify_token(token) if isinstance(token, str) else None
        if found is None:
            return None, "the token is not valid on this relay"
        return found, ""

    def _listen(self, ports) -> None:
        if not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
            self.close(ErrorCode.PROTOCOL_ERROR, "ports must be a list of integers")
            return
        limit = self.relay.settings.max_ports_per_agent
        if len(ports) > limit:
            self.throttled.warn(
                "ports",
                "agent {agent}: asked for {n} ports at once; only the first {limit} are looked at",
                agent=self.agent_name,
                n=len(ports),
                limit=limit,
            )
            ports = ports[:limit]
        for port in ports:
            why = self.relay.listen(self, port)
            if why is None:
                self.session.send_control({"type": "listen_ok", "port": port})
            else:
                self.throttled.warn("listen", "agent {agent}: port {port} refused: {why}", agent=self.agent_name, port=port, why=why)
                self.session.send_control({"type": "listen_fail", "port": port, "reason": why})

    def heartbeat(self) -> None:
        # An agent that never answers OPEN would hold those clients (and stream slots) for
        # as long as the tunnel lives. Checked at each heartbeat, so a stream gets between
        # open_timeout and open_timeout + one interval.
        for stream_id in self.session.expire_opens(self.relay.settings.open_timeout):
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.abort()
            self.throttled.warn(
                "open-timeout",
                "agent {agent}: no answer to OPEN within {timeout:.0f} s; client of port {port} reset",
                agent=self.agent_name,
                timeout=self.relay.settings.open_timeout,
                port=getattr(stream, "public_port", "?"),
            )

    def stream_opened(self, event) -> None:  # pragma: no cover - the session forbids it
        raise AssertionError("agents cannot open streams")

    def stream_was_reset(self, stream: Stream, code: int, by_peer: bool) -> None:
        if by_peer and code not in (ErrorCode.RESET_BY_PEER, ErrorCode.NORMAL):
            # The code is the peer's to choose: keyed by it, made-up codes would each get a line.
            known = code in ErrorCode._value2member_map_
            self.throttled.info(
                f"reset:{code if known else 'other'}",
                "agent {agent}: stream for port {port} refused: {code}",
                agent=self.agent_name,
                port=getattr(stream, "public_port", "?"),
                code=ErrorCode.name_of(code),
            )

    def go_away_received(self, code: int, reason: str) -> None:
        self.log.info("agent {agent} is going away: {reason}", agent=self.agent_name, reason=reason or ErrorCode.name_of(code))
        self.relay.release_ports(self)


class Relay(service.Service):
    """The registry: which agent has which tunnel, and which tunnel owns which public port."""

    log = Logger()

    def __init__(self, reactor, state: State, settings: RelaySettings) -> None:
        self.reactor = reactor
        self.state = state
        self.settings = settings
        self.tunnels: dict[str, RelayTunnel] = {}
        self.open_streams = OpenStreams()
        self.public: dict[int, PublicFactory] = {}
        self.unauthenticated = 0
        self.unauthenticated_by_source: dict[str, int] = {}
        self.accepting = True
        self.throttled = ThrottledLog(self.log, reactor.seconds)
        self.gates: dict[int, Gate] = {}  # per port, kept across agents so caps survive a takeover
        self._credential_watch: task.LoopingCall | None = None  # see watch_credentials
        self._credentials_seen: int | None = None
        self._credentials_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self.watch_credentials()

    def stopService(self):
        if self._credential_watch is not None and self._credential_watch.running:
            self._credential_watch.stop()
        self._credential_watch = None
        return super().stopService()

    def tunnel_factory(self) -> Factory:
        factory = Factory.forProtocol(lambda: RelayTunnel(self))
        factory.noisy = False
        return factory

    # agents

    def attach(self, tunnel: RelayTunnel, agent: Agent) -> bool:
        """Register an authenticated tunnel; a newer tunnel of the same agent takes over at once."""
        if not self.accepting:
            tunnel.close(ErrorCode.SHUTDOWN, "the relay is shutting down")
            return False
        old = self.tunnels.get(agent.name)
        if old is None and len(self.tunnels) >= self.settings.max_agents:
            self.throttled.warn(
                "max-agents",
                "agent {agent}: refused, the relay serves its maximum of {n} agents",
                agent=agent.name,
                n=self.settings.max_agents,
            )
            tunnel.close(ErrorCode.REFUSED, f"the relay serves its maximum of {self.settings.max_agents} agents")
            return False
        self.tunnels[agent.name] = tunnel
        if old is not None:
            self.log.info("agent {agent}: a new tunnel from {peer} replaces the one from {old}", agent=agent.name, peer=tunnel.peer, old=old.peer)
            for factory in self.public.values():
                if factory.tunnel is old:
                    factory.tunnel = tunnel  # keep listening: no window where the port is closed or taken
            old.close(ErrorCode.REPLACED, "replaced by a newer tunnel of the same agent")
        return True

    def detach(self, tunnel: RelayTunnel) -> None:
        if self.tunnels.get(tunnel.agent_name) is tunnel:
            del self.tunnels[tunnel.agent_name]
            self.log.info("agent {agent} disconnected", agent=tunnel.agent_name)
        self.release_ports(tunnel)

    # revocation

    def watch_credentials(self, interval: float = CREDENTIAL_POLL_INTERVAL) -> None:
        """Check agents.json every INTERVAL seconds (a stat; it is re-read only when it changed)."""
        if self._credential_watch is not None:
            return
        self._credentials_seen = None  # the first poll checks every tunnel
        self._credential_watch = task.LoopingCall(self.check_credentials)
        self._credential_watch.clock = self.reactor
        self._credential_watch.start(interval, now=False)

    def check_credentials(self, force: bool = False) -> None:
        """Close the tunnel of every agent whose credential was rotated, replaced or revoked
        since it authenticated, and release its public ports. Tunnels whose credential is
        still valid carry on unchanged, ports included, even if agents.json now grants
        other ports: those apply from the agent's next hello (with --reuse-port, shared
        ports are checked again at once: _recheck_shared_ports). FORCE (SIGHUP) re-reads
        agents.json even if its stat looks unchanged, and checks every tunnel."""
        try:
            self._check_credentials(force)
        except StateError as e:
            if str(e) != self._credentials_error:  # once per problem, not every poll
                self.log.error("cannot re-read the agents' credentials, keeping the tunnels as they are: {why}", why=str(e))
            self._credentials_error = str(e)
        except Exception:  # an exception would stop the LoopingCall for good
            self.log.failure("checking the agents' credentials failed")

    def _check_credentials(self, force: bool) -> None:
        generation = self.state.refresh(force=force)
        self._credentials_error = None
        if generation == self._credentials_seen and not force:
            return
        for tunnel in list(self.tunnels.values()):
            credential = tunnel.credential
            if credential is None or self.state.still_valid(tunnel.agent_name, credential):
                continue
            what = "client certificate" if credential.method == CERTIFICATE else "token"
            self.log.warn(
                "agent {agent}: its {what} was revoked or replaced; closing its tunnel from {peer}",
                agent=tunnel.agent_name,
                what=what,
                peer=tunnel.peer,
            )
            if self.tunnels.get(tunnel.agent_name) is tunnel:
                del self.tunnels[tunnel.agent_name]
            self.release_ports(tunnel)
            tunnel.close(ErrorCode.AUTH_FAILED, "credential revoked")
        if self.settings.reuse_port:
            self._recheck_shared_ports()
        self._credentials_seen = generation

    def _recheck_shared_ports(self) -> None:
        """With --reuse-port, a port stays only while the credentials still give it to its
        agent alone. Unlike a lone relay, which lets a live tunnel keep its ports until its
        next hello, a shared port is also given out by the other processes, which go by
        agents.json as it is now: a port narrowed away from X and granted to Y would
        otherwise be served by both, and X would get a share of Y's clients."""
        agents = self.state.agents()
        for port, factory in list(self.public.items()):
            tunnel = factory.tunnel
            current = agents.get(tunnel.agent_name) if tunnel is not None else None
            if current is None:
                continue  # its tunnel is closing (credential revoked): released there
            why = self._held_alone(current, port)
            if why is None:
                continue
            self._unlisten(port, factory)
            self.log.warn(
                "agent {agent}: stopped listening on public port {port}: {why}",
                agent=tunnel.agent_name,
                port=port,
                why=why,
            )
            tunnel.session.send_control({"type": "listen_fail", "port": port, "reason": why})
            tunnel.flush()

    # public ports

    def listen(self, tunnel: RelayTunnel, port: int) -> str | None:
        """Listen on `port` for the tunnel's agent; None on success, else why not."""
        agent = tunnel.agent
        low, high = defaults.AGENT_PORT_RANGE
        if port == self.settings.tunnel_port:
            return f"port {port} is the relay's tunnel port"
        if agent.ports is not None:
            if port not in agent.ports:
                return f"port {port} is not allowed for agent {agent.name} (allowed: {agent.ports})"
        elif not low <= port <= high:
            return f"port {port} is outside {low}-{high}, the range agents may ask for"
        if self.settings.reuse_port:
            why = self._held_alone(agent, port)
            if why:
                return why
        factory = self.public.get(port)
        if factory is not None:
            owner = factory.tunnel.agent_name if factory.tunnel else "?"
            if owner != agent.name:
                return f"port {port} is served by another agent"
            factory.tunnel = tunnel
            return None
        owned = sum(1 for f in self.public.values() if f.tunnel is tunnel)
        if owned >= self.settings.max_ports_per_agent:
            return f"agent {agent.name} already has {owned} ports, the maximum"
        gate = self.gates.get(port)
        if gate is None:
            gate = self.gates[port] = Gate(self.settings.policy_for(port), self.reactor.seconds)
        factory = PublicFactory(port, tunnel, gate)
        try:
            factory.listening = listen_public(
                self.reactor, port, factory, self.settings.public_interface, self.settings.reuse_port
            )
            quiet_accept_errors(factory.listening, self._accept_log)
        except error.CannotListenError as e:
            return f"the relay cannot listen on port {port}: {e.socketError}"
        self.public[port] = factory
        self.log.info("agent {agent}: listening on public port {port}", agent=agent.name, port=port)
        return None

    def _accept_log(self, event: dict) -> None:
        """What Twisted's accept loop on a public port logs: out of descriptors (EMFILE), it
        closes each waiting client with three info lines, and anyone can connect."""
        self.throttled.warn(f"accept:{event.get('log_format')}", "public ports: {what}", what=formatEvent(event))

    def _held_alone(self, agent: Agent, port: int) -> str | None:
        """With --reuse-port, why `agent` may not have `port`, if it may not. The relay processes
        sharing a port cannot see each other's agents, so which agent owns a port must follow
        from the credentials alone: its own allowance names the port, and no other agent's
        allows it. Otherwise an agent on one process could share the clients of another
        agent's port on the next."""
        if agent.ports is None:
            return (
                f"with --reuse-port, agent {agent.name} needs an explicit port list "
                f"(relay agent-token --ports {port}) to be given port {port}"
            )
        if port not in agent.ports:
            return f"port {port} is not allowed for agent {agent.name} (allowed: {agent.ports})"
        low, high = defaults.AGENT_PORT_RANGE
        others = sorted(
            other.name
            for other in self.state.agents().values()
            if other.name != agent.name
            and (port in other.ports if other.ports is not None else low <= port <= high)
        )
        if others:
            return (
                f"with --reuse-port, port {port} must be allowed to one agent only; "
                f"it is also allowed to {', '.join(others)}"
            )
        return None

    def release_ports(self, tunnel: RelayTunnel) -> None:
        for port, factory in list(self.public.items()):
            if factory.tunnel is tunnel:
                self._unlisten(port, factory)
                self.log.info("agent {agent}: stopped listening on public port {port}", agent=tunnel.agent_name, port=port)

    def _unlisten(self, port: int, factory: PublicFactory) -> None:
        del self.public[port]
        factory.tunnel = None
        # The port keeps its factory (tcp.Port.factory) after it stops: kept here too, the
        # two were a reference cycle, every port an agent lets go of.
        listening, factory.listening = factory.listening, None
        listening.stopListening()

    # shutdown

    @defer.inlineCallbacks
    def drain(self):
        """SIGTERM: stop accepting, tell every agent, let streams finish for a bounded time."""
        self.accepting = False
        stops = [defer.maybeDeferred(f.listening.stopListening) for f in self.public.values()]
        for factory in self.public.values():
            factory.tunnel = None
            factory.listening = None  # as _unlisten
        self.public.clear()
        yield defer.DeferredList(stops)
        tunnels = list(self.tunnels.values())
        for tunnel in tunnels:
            tunnel.session.go_away(ErrorCode.SHUTDOWN, "the relay is shutting down")
            tunnel.flush()
        deadline = self.reactor.seconds() + self.settings.drain_timeout
        while any(t.streams for t in tunnels) and self.reactor.seconds() < deadline:
            yield _sleep(self.reactor, 0.1)
        for tunnel in tunnels:
            tunnel.close(ErrorCode.SHUTDOWN, "the relay is shutting down")
        while any(t.connected_tunnel for t in tunnels):
            yield _sleep(self.reactor, 0.1)  # close() aborts after its grace period


def _sleep(reactor, seconds: float):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
