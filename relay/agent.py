"""The agent: dials out to the relay (reconnecting with backoff), asks for its public ports, and
connects each stream the relay opens to the one target exposed on that port, and nothing else."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from . import defaults
from .dial import AddressEndpoint, NameEndpoint
from .protocol import ErrorCode, Role, StreamOpened
from .tunnel import OpenStreams, Stream, Tunnel, TunnelSettings


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AgentSettings:
    token: str = field(repr=False)
    expose: dict[int, Target]  # public port -> inside target
    connect_timeout: float = 10.0
    reconnect_initial: float = defaults.RECONNECT_INITIAL
    reconnect_max: float = defaults.RECONNECT_MAX
    reconnect_factor: float = defaults.RECONNECT_FACTOR
    listen_retry_initial: float = defaults.LISTEN_RETRY_INITIAL
    listen_retry_max: float = defaults.LISTEN_RETRY_MAX
    tunnel: TunnelSettings = field(default_factory=TunnelSettings)


def backoff(attempt: int, initial: float, maximum: float, factor: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: somewhere in the upper half of the capped delay, so a
    fleet of agents cut off together does not come back in one wave."""
    ceiling = min(maximum, initial * factor**attempt)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class TargetStream(Stream):
    """The inside connection of one stream; created before the connect so early data can wait here."""

    def __init__(self, tunnel: AgentTunnel, stream_id: int, target: Target) -> None:
        super().__init__(tunnel, stream_id)
        self.target = target
        self.connecting = None


class AgentTunnel(Tunnel):
    role = Role.AGENT
    log = Logger()

    def __init__(self, agent: AgentService) -> None:
        super().__init__(agent.reactor, agent.settings.tunnel, agent.open_streams)
        self.agent = agent
        self.welcomed = False
        self._retry_timers: dict[int, object] = {}
        self._retry_attempts: dict[int, int] = {}
        self.lost = defer.Deferred()
        self._welcome_timer = None
        self.timed_out = False  # we gave up waiting for the TLS handshake and the welcome

    def connectionMade(self) -> None:
        super().connectionMade()
        # --connect-timeout covers the whole way to a working tunnel: a relay (or something
        # posing as one) that accepts the connection and never answers was otherwise left
        # to the dead-tunnel check, 45 s per attempt at the defaults.
        self._welcome_timer = self.reactor.callLater(self.agent.settings.connect_timeout, self._not_welcomed)

    def _stop_waiting_for_welcome(self) -> None:
        if self._welcome_timer is not None and self._welcome_timer.active():
            self._welcome_timer.cancel()
        self._welcome_timer = None

    def _not_welcomed(self) -> None:
        self._welcome_timer = None
        self.timed_out = True
        self.log.warn(
            "the relay {relay} did not complete the TLS handshake and accept this agent within {t:.0f} s; closing",
            relay=self.agent.relay_name,
            t=self.agent.settings.connect_timeout,
        )
        self.transport.abortConnection()

    def tunnel_ready(self) -> None:
        ports = sorted(self.agent.settings.expose)
        self.session.send_control({"type": "hello", "version": 1, "token": self.agent.settings.token, "ports": ports})

    def control_received(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "welcome":
            self.welcomed = True
            self._stop_waiting_for_welcome()
            self.log.info("tunnel to the relay is up (agent {agent})", agent=message.get("agent"))
            self.agent.tunnel_up(self)
        elif kind in ("listen_ok", "listen_fail") and type(message.get("port")) is not int:
            self.throttled.warn("bad-port", "ignoring {kind} from the relay: port {port!r} is not a number", kind=kind, port=message.get("port"))
        elif kind == "listen_ok":
            port = message.get("port")
            self._retry_attempts.pop(port, None)
            target = self.agent.settings.expose.get(port)
            self.log.info("relay listens on public port {port} for {target}", port=port, target=str(target))
        elif kind == "listen_fail":
            self._listen_failed(message.get("port"), str(message.get("reason", "")))
        else:
            self.throttled.info("control", "ignoring control message {kind!r} from the relay", kind=kind)

    def _listen_failed(self, port, reason: str) -> None:
        if port not in self.agent.settings.expose:
            return
        pending = self._retry_timers.get(port)
        if pending is not None and pending.active():
            return  # one retry per port is already due; a relay repeating itself adds nothing
        attempt = self._retry_attempts.get(port, 0)
        self._retry_attempts[port] = attempt + 1
        s = self.agent.settings
        delay = backoff(attempt, s.listen_retry_initial, s.listen_retry_max, 2.0, self.agent.rng)
        self.log.warn(
            "relay refused public port {port}: {reason}; asking again in {delay:.0f} s",
            port=port,
            reason=reason,
            delay=delay,
        )
        self._retry_timers[port] = self.reactor.callLater(delay, self._ask_again, port)

    def _ask_again(self, port: int) -> None:
        self._retry_timers.pop(port, None)
        if self.connected_tunnel:
            self.session.send_control({"type": "listen", "ports": [port]})
            self.flush()

    def stream_opened(self, event: StreamOpened) -> None:
        target = self.agent.settings.expose.get(event.port)
        if target is None:
            # Port translation, not address forwarding: the relay names a port, we alone
            # decide where it goes, and an unknown port goes nowhere.
            self.throttled.warn("not-exposed", "relay asked for port {port}, which this agent does not expose; refused", port=event.port)
            self.session.reset_stream(event.stream_id, ErrorCode.NOT_ALLOWED)
            return
        stream = TargetStream(self, event.stream_id, target)
        self.streams[event.stream_id] = stream
        stream.connecting = self.agent.target_endpoint(target).connect(_Once(stream))
        stream.connecting.addCallbacks(self._connected, self._connect_failed, errbackArgs=(stream, event))

    def _connected(self, stream: TargetStream) -> None:
        stream.connecting = None
        if self.session.has_stream(stream.stream_id) and self.streams.get(stream.stream_id) is stream:
            self.session.accept_stream(stream.stream_id)
            self.flush()

    def _connect_failed(self, failure, stream: TargetStream, event: StreamOpened) -> None:
        stream.connecting = None
        if failure.check(defer.CancelledError):
            return
        self.throttled.warn(
            f"connect:{event.port}",
            "cannot reach {target} for a client {client} of port {port}: {why}",
            target=str(stream.target),
            client=event.client_host,
            port=event.port,
            why=failure.getErrorMessage(),
        )
        if self.streams.pop(stream.stream_id, None) is stream:
            self.session.reset_stream(stream.stream_id, ErrorCode.CONNECT_FAILED)
            self.flush()

    def stream_was_reset(self, stream: Stream, code: int, by_peer: bool) -> None:
        connecting = getattr(stream, "connecting", None)
        if connecting is not None:
            connecting.cancel()

    def go_away_received(self, code: int, reason: str) -> None:
        self._stop_waiting_for_welcome()  # the relay answered: its GOAWAY says why, and it closes
        self.agent.go_away_received(code, reason)

    def connectionLost(self, reason=None) -> None:
        self._stop_waiting_for_welcome()
        for stream in list(self.streams.values()):
            self.stream_was_reset(stream, ErrorCode.NORMAL, False)
        for timer in self._retry_timers.values():
            if timer.active():
                timer.cancel()
        super().connectionLost(reason)
        self.lost_reason = reason
        self.lost.callback(self)


class _Once(Factory):
    """Hands the endpoint the one TargetStream it connects."""

    noisy = False

    def __init__(self, stream: TargetStream) -> None:
        self.stream = stream

    def buildProtocol(self, addr):
        return self.stream


class AgentService(service.Service):
    """Keeps one tunnel to the relay up: connect, and on any loss reconnect with backoff."""

    log = Logger()

    def __init__(self, reactor, endpoint, settings: AgentSettings, relay_name: str, rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.settings = settings
        self.relay_name = relay_name
        self.rng = rng or random.Random()
        self.tunnel: AgentTunnel | None = None
        self.open_streams = OpenStreams()  # over every tunnel, the next one's too
        self.attempt = 0
        self._connecting = None
        self._retry = None
        self._next_delay: float | None = None
        self.connected_count = 0
        self._endpoints: dict[Target, object] = {}  # settings never change: one per target

    def startService(self) -> None:
        super().startService()
        self._connect()

    def target_endpoint(self, target: Target):
        endpoint = self._endpoints.get(target)
        if endpoint is None:
            # Made once, not per stream: telling an address from a name (isIPAddress) and
            # building the endpoint cost about 2 % of the agent's CPU per new connection.
            endpoint = self._endpoints[target] = self._new_target_endpoint(target)
        return endpoint

    def _new_target_endpoint(self, target: Target):
        timeout = self.settings.connect_timeout
        # An address needs no resolving: a name goes through getaddrinfo on the thread pool
        # (10 threads) for every stream, which capped new connections per second.
        if isIPAddress(target.host):
            return AddressEndpoint(self.reactor, target.host, target.port, timeout, socket.AF_INET)
        if isIPv6Address(target.host):
            return AddressEndpoint(self.reactor, target.host, target.port, timeout, socket.AF_INET6)
        return NameEndpoint(self.reactor, target.host, target.port, timeout)

    def _connect(self) -> None:
        self._retry = None
        self.log.info("connecting to the relay {relay}", relay=self.relay_name)
        factory = Factory.forProtocol(lambda: AgentTunnel(self))
        factory.noisy = False
        self._connecting = self.endpoint.connect(factory)
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, tunnel: AgentTunnel) -> None:
        self._connecting = None
        self.tunnel = tunnel
        tunnel.lost.addCallback(self._lost)

    def _failed(self, failure) -> None:
        self._connecting = None
        if failure.check(defer.CancelledError):
            return
        self.log.warn("cannot connect to the relay {relay}: {why}", relay=self.relay_name, why=describe_failure(failure))
        self._schedule()

    def tunnel_up(self, tunnel: AgentTunnel) -> None:
        self.attempt = 0
        self._next_delay = None
        self.connected_count += 1

    def go_away_received(self, code: int, reason: str) -> None:
        if code == ErrorCode.AUTH_FAILED:
            self.log.error("the relay rejected this agent's token: {reason}", reason=reason)
        elif code == ErrorCode.REPLACED:
            # Another process with our credential took over; coming straight back would
            # make the two fight over the tunnel, so wait the longest delay.
            self.log.warn("the relay says: {reason}; is a second agent running with this token?", reason=reason)
            self._next_delay = self.settings.reconnect_max
        else:
            self.log.info("the relay is going away: {reason}", reason=reason or ErrorCode.name_of(code))

    def _lost(self, tunnel: AgentTunnel) -> None:
        reason = tunnel.lost_reason
        if self.tunnel is tunnel:
            self.tunnel = None
        if tunnel.welcomed:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.log.warn("tunnel to the relay lost: {why}", why=why)
        elif tunnel.timed_out:
            pass  # said when it gave up (_not_welcomed)
        elif reason is not None and reason.check(*_tls_refusals()):
            # Our own TLS verification ended it: the relay was never trusted, nothing was sent.
            self.log.warn("cannot connect to the relay {relay}: {why}", relay=self.relay_name, why=describe_failure(reason))
        else:
            self.log.warn("the relay closed the tunnel before accepting it: {why}", why=describe_failure(reason))
        if self.running:
            self._schedule()

    def _schedule(self) -> None:
        if not self.running:
            return
        s = self.settings
        delay = self._next_delay
        if delay is None:
            delay = backoff(self.attempt, s.reconnect_initial, s.reconnect_max, s.reconnect_factor, self.rng)
        self._next_delay = None
        self.attempt += 1
        self.log.info("reconnecting in {delay:.1f} s", delay=delay)
        self._retry = self.reactor.callLater(delay, self._connect)

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        tunnel = self.tunnel
        if tunnel is None or not tunnel.connected_tunnel:
            return None
        if not tunnel.welcomed:
            # No session to say GOAWAY on (TLS may not even be up): waiting CLOSE_GRACE for
            # a close that cannot come only delayed the exit by 5 s.
            tunnel.transport.abortConnection()
            return None
        done = defer.Deferred()
        tunnel.lost.addBoth(lambda _: done.callback(None))
        tunnel.close(ErrorCode.NORMAL, "the agent is shutting down")
        return done


def _tls_refusals() -> tuple[type, ...]:
    from OpenSSL.SSL import Error as SSLError
    from service_identity import VerificationError

    return (SSLError, VerificationError)


def describe_failure(failure) -> str:
    """A log line for why a connection attempt failed, naming TLS verification problems plainly."""
    if failure is None:
        return "closed"
    from OpenSSL.SSL import Error as SSLError

    if failure.check(SSLError):
        text = str(failure.value)
        if "certificate verify failed" in text:
            return "the relay's certificate is not trusted (wrong --ca or --pin?): " + text
        return "TLS failed: " + text
    try:
        from service_identity import VerificationError

        if failure.check(VerificationError):
            return f"the relay's certificate does not match its name: {failure.value}"
    except ImportError:  # pragma: no cover - service_identity is a hard dependency
        pass
    if failure.check(error.ConnectionDone):
        return "the relay closed the connection"
    return failure.getErrorMessage()
