"""The Twisted side of a tunnel: feeds TLS bytes to the sans-IO session, carries its frames back,
and wires each stream's socket to it with producer/consumer backpressure both ways.

Data path of one stream, socket to tunnel: Stream.dataReceived -> Tunnel.stream_data ->
Session.send_data -> Tunnel.flush -> TLS transport. Tunnel to socket: Tunnel.dataReceived ->
Session.receive_data -> Stream.deliver -> socket transport; credit goes back once the socket
is not pausing us (Stream.resumeProducing).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from twisted.internet import error, main, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import defaults
from .logs import ThrottledLog
from .protocol import (
    ControlReceived,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    PongReceived,
    ProtocolError,
    Role,
    SendWindowOpened,
    Session,
    StreamAccepted,
    StreamOpened,
    StreamReset,
)
from .protocol.frames import size_without_data
from .tlswire import send_now

# The tunnel socket's user-space send buffer before Twisted pauses us. The default 64 KiB
# makes every stream pause and resume every 64 KiB (research §2.2: 16 128 cycles/GiB).
# Twisted resumes only once it is empty, so on average half of it sits in front of any new
# frame: 4 MiB cost a small stream beside a bulk one milliseconds of queueing for no gain
# in throughput over 1 MiB (bench/, docs/performance.md).
TUNNEL_BUFFER_SIZE = 1 * defaults.MiB
# How much one read of a stream's socket takes (Twisted's default is 64 KiB): a bulk stream's
# reactor turn, TLS write and tunnel send each carry up to four 64 KiB frames instead of one.
STREAM_READ_SIZE = 256 * defaults.KiB
# A read this large is bulk data, sent at once rather than at the end of the reactor turn.
BULK_READ = 64 * defaults.KiB
CLOSE_GRACE = 5.0  # after GOAWAY and close, how long before we abort (TLS close_notify may never come)


class OpenStreams:
    """How many streams one end (the relay, or an agent) has open, over all its tunnels.

    Bulk work waits for the end of the reactor turn only while there is more than one:
    alone, a bulk stream has no one to make way for, and the wait cost it 5-10 % of its
    CPU per byte (bench/, A/B)."""

    count = 0


@dataclass(frozen=True)
class TunnelSettings:
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    dead_after: int = defaults.HEARTBEAT_DEAD_AFTER
    initial_window: int = defaults.INITIAL_WINDOW
    max_window: int = defaults.MAX_WINDOW
    window_budget: int = defaults.WINDOW_BUDGET
    max_streams: int = defaults.MAX_STREAMS

    @property
    def dead_timeout(self) -> float:
        return self.heartbeat_interval * self.dead_after


def tune_socket(transport, *, keepalive: bool = False, user_timeout: float | None = None) -> None:
    """TCP_NODELAY (small tunneled writes must not wait for delayed ACKs), and for the tunnel
    keepalive plus TCP_USER_TIMEOUT, so unacknowledged data cannot hang a dead path forever."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return
    try:
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, name):
                    handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except OSError:
        pass  # not a TCP socket (a test transport, a UNIX socket): nothing to tune


def close_write_now(transport) -> None:
    """transport.loseWriteConnection(), done at once when nothing waits to be written.

    Twisted half-closes from its next write event: it registers for writability, waits an
    epoll round, sends zero bytes, unregisters, and only then calls shutdown(SHUT_WR):
    four system calls and a reactor turn at both ends of every stream (bench/ newconn).
    A stream's deliveries go to the kernel at once (send_now), so its buffer is nearly
    always empty when the FIN comes; then the shutdown is done here, as Twisted's own
    doWrite would do it (the flags first, then _closeWriteConnection, which tells the
    protocol). Anything still queued, or a transport that is not plain TCP (a test's, or
    one wrapped by another protocol, which would pass these attributes through), is left
    to Twisted.
    """
    if (
        not isinstance(transport, tcp.Connection)
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport._writeDisconnected
        or transport.producer is not None
        or transport._tempDataBuffer
        or transport.offset != len(transport.dataBuffer)
    ):
        transport.loseWriteConnection()
        return
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()


# One Failure for every stream's orderly close, as Twisted's reactor keeps one for every EOF
# it reports (posixbase's faildict): loseConnection after a half-close builds a new one per
# connection, and tcp.Connection.connectionLost then works out its class names again
# (Failure.check, parents) for each: about 4 % of a connection's CPU on each end (py-spy,
# bench/ newconn). Nothing that receives it changes it.
_CLOSED_CLEANLY = Failure(main.CONNECTION_DONE)


def close_now(transport) -> None:
    """transport.loseConnection() once both directions have ended: what Twisted does for a
    transport whose write side is already shut down (stop watching it, then
    connectionLost), with the shared ConnectionDone. Anything else, and any transport
    that is not plain TCP, is left to Twisted."""
    if (
        not isinstance(transport, tcp.Connection)
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or not transport._writeDisconnected
    ):
        transport.loseConnection()
        return
    transport.stopReading()
    transport.stopWriting()
    transport.connectionLost(_CLOSED_CLEANLY)


@implementer(IHalfCloseableProtocol, IPushProducer)
class Stream(Protocol):
    """One TCP connection (a public client on the relay, a target on the agent) bound to a stream.

    It is the producer registered on its own socket, so the socket's pause/resume tells us
    when to stop crediting the peer; and it pauses its own reading when it has no credit.
    """

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.write_paused = False  # our socket's buffer is full: do not credit
        self.uncredited = 0
        self.no_credit = False  # the peer's window is used up: do not read
        self.read_eof = False
        self.write_closed = False
        self.closing = False  # reset or aborted: connectionLost must not reset again
        self._early: list[bytes] = []  # data that arrived before the socket was connected
        self._early_fin = False

    # socket -> tunnel

    def connectionMade(self) -> None:
        self.tunnel.open_streams.count += 1
        tune_socket(self.transport)
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = STREAM_READ_SIZE
        if hasattr(self.transport, "_shouldShutdown"):
            # Twisted calls shutdown(SHUT_RDWR) before close() on an orderly close, "not
            # really necessary" by its own comment (the descriptor is close-on-exec, so
            # close() is the last reference): after our half-close it only fails with
            # ENOTCONN, one system call per stream end.
            self.transport._shouldShutdown = False
        self.transport.registerProducer(self, True)
        if self._early or self._early_fin:
            early, self._early = self._early, []
            if early:
                self.deliver(early)
            if self._early_fin:
                self.deliver_fin()
        self.update_reading()

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.stream_data(self, data)

    def read_at_once(self) -> None:
        """Read what the socket already holds now, not at the reactor's next turn.

        A client that speaks first (an HTTP request, a TLS ClientHello) has usually sent
        it by the time its connection is accepted; read now, it leaves with the OPEN in
        the same tunnel write. Nothing there yet (a server-first protocol) costs one
        recv(). An EOF is left for the reactor to find, as it finds every other one.
        """
        sock = getattr(self.transport, "socket", None)
        if not isinstance(sock, socket.socket) or self.no_credit or self.tunnel.paused:
            return
        try:
            data = sock.recv(STREAM_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            # A reset consumed here would look like a clean EOF to the reactor later.
            self.transport.abortConnection()
            return
        if data:
            self.dataReceived(data)

    def readConnectionLost(self) -> None:
        self.read_eof = True
        self.tunnel.stream_eof(self)
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._maybe_close()

    def connectionLost(self, reason: Failure = None) -> None:
        self.tunnel.open_streams.count -= 1
        self.tunnel.stream_lost(self, clean=self.closing or (self.read_eof and self.write_closed))

    def update_reading(self) -> None:
        """Read our socket only while the peer gave credit and the tunnel is not backed up."""
        if self.transport is None or self.read_eof or self.closing:
            return
        if self.no_credit or self.tunnel.paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # tunnel -> socket

    def deliver(self, chunks: list[bytes]) -> None:
        """Write what the peer sent (the payloads of consecutive DATA frames) to our socket."""
        if self.transport is None:
            # Copied: a view would keep the whole TLS read it came from (up to 1 MiB)
            # alive for a few bytes while the target connects. Credited when connectionMade
            # delivers it, not twice.
            self._early += [bytes(c) for c in chunks]
            return
        send_now(self.transport, chunks)
        size = sum(map(len, chunks)) if len(chunks) > 1 else len(chunks[0])
        if self.write_paused:
            self.uncredited += size
        else:
            self.tunnel.session.consumed(self.stream_id, size + self.uncredited)
            self.uncredited = 0

    def deliver_fin(self) -> None:
        if self.transport is None:
            self._early_fin = True
        else:
            # Nothing more will be written, so our socket no longer needs to pause us. And
            # it must not: Twisted drops a pending half-close when its buffer drains while
            # a streaming producer is paused (it resumes the producer instead), so the FIN
            # was lost whenever the target or client had been slower than the tunnel.
            self.transport.unregisterProducer()
            close_write_now(self.transport)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _maybe_close(self) -> None:
        # write_closed means deliver_fin ran, which already unregistered us as producer.
        if self.read_eof and self.write_closed:
            close_now(self.transport)

    # IPushProducer, driven by our socket's send buffer

    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        if self.uncredited:
            count, self.uncredited = self.uncredited, 0
            self.tunnel.session.consumed(self.stream_id, count)
            self.tunnel.flush()

    def stopProducing(self) -> None:
        pass


def deliver_run(run: dict) -> None:
    """Hand each stream the payloads one tunnel read brought it, the stream with the fewest
    bytes first. Each stream's bytes keep their order; streams are independent, so their
    order among each other is ours to choose. A small stream's frame sits among a bulk
    stream's in the same read: in arrival order it waited for the bulk stream's sends of
    up to 1 MiB first (echo beside bulk, bench/). Shortest first is the order that makes
    the streams of a read wait least in all."""
    if len(run) == 1:
        for stream, chunks in run.items():
            stream.deliver(chunks)
        return
    for stream, chunks in sorted(run.items(), key=lambda item: sum(map(len, item[1]))):
        stream.deliver(chunks)


@implementer(IHandshakeListener, IPushProducer)
class Tunnel(Protocol):
    """One TLS connection carrying many streams. Subclasses add the relay's or the agent's rules."""

    role: Role
    log = Logger()

    def __init__(self, reactor, settings: TunnelSettings, open_streams: OpenStreams | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.open_streams = open_streams or OpenStreams()
        self.session = Session(
            self.role,
            clock=reactor.seconds,
            initial_window=settings.initial_window,
            max_window=settings.max_window,
            window_budget=settings.window_budget,
            max_streams=settings.max_streams,
        )
        self.streams: dict[int, Stream] = {}
        self.paused = False
        self.peer = "?"
        self.connected_tunnel = False
        self._last_received = reactor.seconds()
        self._heartbeat = None
        self._next_ping = 0.0
        self._close_timer = None
        self._backlog_while_paused = 0
        self._flush_call = None
        self._bulk: list[tuple[Stream, bytes]] = []  # bulk reads waiting for the end of the turn
        self._bulk_call = None
        self._broken = False  # a protocol error: nothing the peer sends is read any more
        # What a peer can repeat at will. The class's Logger, not self.log: Logger is a
        # descriptor, and the one it makes for an instance names the instance as its log
        # source; kept here, it made every tunnel a reference cycle (tunnel -> throttled ->
        # Logger -> tunnel), so that every connection to the tunnel port, a stranger's that
        # never gets past TCP too, was freed only by the garbage collector.
        self.throttled = ThrottledLog(type(self).log, reactor.seconds)

    # connection life

    def connectionMade(self) -> None:
        self.connected_tunnel = True
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        lower = getattr(self.transport, "transport", None)
        if lower is not None and hasattr(lower, "bufferSize"):
            lower.bufferSize = TUNNEL_BUFFER_SIZE
        tune_socket(lower, keepalive=True, user_timeout=self.settings.dead_timeout)
        self.transport.registerProducer(self, True)
        self._last_received = self.reactor.seconds()
        self._next_ping = self._last_received + self.settings.heartbeat_interval
        self._heartbeat = self.reactor.callLater(self.settings.heartbeat_interval, self._beat)

    def handshakeCompleted(self) -> None:
        if getattr(self.transport, "_aborted", False) or self.transport.disconnecting:
            return  # certificate verification failed after the handshake (Twisted calls us anyway)
        if self.transport.negotiatedProtocol != defaults.ALPN:
            self.peer_warning(
                "alpn",
                "tunnel {peer}: peer did not negotiate ALPN {alpn}; closing",
                peer=self.peer,
                alpn=defaults.ALPN.decode(),
            )
            self.close(ErrorCode.PROTOCOL_ERROR, f"peer did not negotiate ALPN {defaults.ALPN.decode()}")
            return
        self.session.send_ping()  # an early RTT sample for window auto-tuning
        self.tunnel_ready()
        self.flush()

    def tunnel_ready(self) -> None:
        """TLS is up and verified; subclasses start their hello here."""

    def peer_warning(self, kind: str, format: str, **fields) -> None:
        """A warning about what the peer did that closes this tunnel. The relay limits those
        a stranger can provoke before it authenticates (RelayTunnel)."""
        self.log.warn(format, **fields)

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected_tunnel = False
        # Dropped, not only cancelled: a timer that fired still holds its func. The
        # heartbeat that finds the tunnel dead aborts it and schedules no other, so
        # _heartbeat kept our own _beat: a reference cycle, every dead tunnel.
        timers = (self._heartbeat, self._close_timer, self._flush_call, self._bulk_call)
        self._heartbeat = self._close_timer = self._flush_call = self._bulk_call = None
        self._bulk = []
        for timer in timers:
            if timer is not None and timer.active():
                timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.abort()

    def close(self, code: int, reason: str) -> None:
        """Say GOAWAY with a reason, then close; abort if the peer does not finish closing."""
        if not self.connected_tunnel or self._close_timer is not None:
            return
        if not self.session.going_away:
            self.session.go_away(code, reason)
        self.flush_now()  # all queued frames and the GOAWAY go before TLS starts to close
        # TLS starts its shutdown only once no producer is registered (tls.py loseConnection).
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._close_timer = self.reactor.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _beat(self) -> None:
        now = self.reactor.seconds()
        silent = now - self._last_received
        if silent >= self.settings.dead_timeout:
            self.log.warn(
                "tunnel {peer}: nothing received for {silent:.0f} s; the tunnel is dead",
                peer=self.peer,
                silent=silent,
            )
            self.transport.abortConnection()
            return
        if now >= self._next_ping:
            self.heartbeat()
            self.session.send_ping()
            self.flush()
            self._next_ping = now + self.settings.heartbeat_interval
        # Wake for the next PING or the moment the silence would reach dead_timeout, whichever
        # is first: checked only at PINGs, a dead tunnel went unnoticed for up to one more
        # interval (60 s, not 45 s, at the defaults).
        wake = min(self._next_ping, self._last_received + self.settings.dead_timeout)
        self._heartbeat = self.reactor.callLater(max(wake - now, 0.01), self._beat)

    def heartbeat(self) -> None:
        """Every heartbeat interval, while the tunnel lives: periodic chores of either end."""

    # bytes in

    def dataReceived(self, data: bytes) -> None:
        if self._broken or self._close_timer is not None:
            # We are closing (GOAWAY sent), but TLS still hands us what the peer sends until
            # the close completes (up to CLOSE_GRACE): fed to a failed decoder it would pile
            # up, and more hellos would be more guesses and more log lines. None is read.
            return
        self._last_received = self.reactor.seconds()
        if self._flush_call is not None:
            # What this turn's other events queued (a small reply, say) leaves before we
            # work through a read that may hold 1 MiB of another stream's frames: it
            # used to wait behind all of them, and behind the next read too (echo beside
            # bulk, bench/).
            self.flush_now()
        refused = self.session.refused_opens
        try:
            events = self.session.receive_data(data)
        except ProtocolError as e:
            self._broken = True
            self.peer_warning("protocol", "tunnel {peer}: protocol error: {error}", peer=self.peer, error=str(e))
            self.close(ErrorCode.PROTOCOL_ERROR, str(e))
            return
        if self.session.refused_opens != refused:
            self.throttled.warn(
                "refused",
                "tunnel {peer}: refused {n} new stream(s): {max} streams already open, or going away",
                peer=self.peer,
                n=self.session.refused_opens - refused,
                max=self.settings.max_streams,
            )
        # The DATA of one read, up to the next other event, is gathered per stream: each
        # stream's frames go to its socket in one send, shortest first (deliver_run).
        run: dict[Stream, list] = {}
        for event in events:
            kind = type(event)
            if kind is DataReceived and event.data and not event.fin:
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    continue  # closed on our side; the session already forgot or will
                chunks = run.get(stream)
                if chunks is None:
                    run[stream] = [event.data]
                else:
                    chunks.append(event.data)
                continue
            if run:
                deliver_run(run)
                run = {}
            if kind is DataReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    if event.data:
                        stream.deliver([event.data])
                    if event.fin:
                        stream.deliver_fin()
            elif kind is SendWindowOpened:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.no_credit = False
                    stream.update_reading()
            elif kind is StreamReset:
                stream = self.streams.pop(event.stream_id, None)
                if not event.by_peer and event.code == ErrorCode.FLOW_CONTROL:
                    self.throttled.warn(
                        "flow",
                        "tunnel {peer}: stream {id}: the peer sent beyond its window; stream reset",
                        peer=self.peer,
                        id=event.stream_id,
                    )
                if stream is not None:
                    self.stream_was_reset(stream, event.code, event.by_peer)
                    stream.abort()
            elif kind is StreamOpened:
                self.stream_opened(event)
            elif kind is StreamAccepted:
                self.stream_accepted(event.stream_id)
            elif kind is ControlReceived:
                self.control_received(event.message)
                if not self.connected_tunnel or self._close_timer is not None:
                    return
            elif kind is GoAwayReceived:
                self.go_away_received(event.code, event.reason)
            elif kind is PongReceived:
                pass  # the session keeps the RTT; arrival already counted as liveness
        if run:
            deliver_run(run)
        self.flush()

    # hooks for the two ends

    def stream_opened(self, event: StreamOpened) -> None:
        raise NotImplementedError

    def stream_accepted(self, stream_id: int) -> None:
        pass

    def stream_was_reset(self, stream: Stream, code: int, by_peer: bool) -> None:
        pass

    def control_received(self, message: dict) -> None:
        raise NotImplementedError

    def go_away_received(self, code: int, reason: str) -> None:
        pass

    # bytes out

    def flush(self) -> None:
        """Send what the session queued, once this reactor turn's events are all handled.

        Under load one epoll wake-up brings many events (accepts, reads, closes of many
        streams); each used to send its frames at once, in a TLS record and a send() of
        its own. Gathered, they leave in one record sequence and one send() per turn
        (bench/: 5 sends per new connection on each end before, docs/performance.md). An
        idle tunnel's message waits for nothing but the end of its own event.
        """
        if self._flush_call is None and self.connected_tunnel:
            self._flush_call = self.reactor.callLater(0, self.flush_now)

    def flush_now(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        out = self.session.data_to_send()
        if not out or not self.connected_tunnel:
            return
        if self.paused:
            # The peer is not reading (or slowly). What it makes us say (PONGs, resets,
            # WINDOWs) is bounded by nothing but this: a peer that floods and never reads
            # is dropped. DATA is not counted: what its WINDOWs release now was read
            # before the pause (a stream does not read while we are paused), one read per
            # stream at most, in memory either way; counted, it cut off healthy slow
            # tunnels carrying more than a few busy streams.
            self._backlog_while_paused += size_without_data(out)
            if self._backlog_while_paused > defaults.MAX_PENDING_CONTROL + 2 * self.settings.max_window:
                self.log.warn("tunnel {peer}: peer stopped reading; closing", peer=self.peer)
                self.transport.abortConnection()
                return
        self.transport.writeSequence(out)

    # streams call these

    def stream_data(self, stream: Stream, data: bytes) -> None:
        if (len(data) >= BULK_READ and self.connected_tunnel and self.bulk_waits()) or (
            self._bulk and any(waiting is stream for waiting, _ in self._bulk)
        ):
            # A bulk read is framed, encrypted and sent at the end of the reactor turn, after
            # the other sockets ready in it (a small stream's request, the tunnel's reply):
            # they waited behind each 256 KiB read (bench/ echo beside bulk). What the same
            # stream reads meanwhile waits behind it.
            if self._bulk_call is None:
                self._bulk_call = self.reactor.callLater(0, self._send_bulk)
            self._bulk.append((stream, data))
            return
        self._stream_data(stream, data)

    def bulk_waits(self) -> bool:
        """Whether a bulk read waits for the end of the reactor turn: only while another
        stream of this process could be waiting behind it."""
        return self.open_streams.count > 1

    def _send_bulk(self) -> None:
        call, self._bulk_call = self._bulk_call, None
        if call is not None and call.active():
            call.cancel()  # sent early (a FIN behind it)
        bulk, self._bulk = self._bulk, []
        for stream, data in bulk:
            if self.connected_tunnel:
                self._stream_data(stream, data)

    def _stream_data(self, stream: Stream, data: bytes) -> None:
        if not self.session.has_stream(stream.stream_id):
            return
        if not self.session.send_data(stream.stream_id, data):
            stream.no_credit = True
            stream.update_reading()
        if len(data) >= BULK_READ:
            # Bulk goes at once: gathered over a turn of several bulk streams it made
            # writes larger than the socket takes, and Twisted's buffer then paused and
            # resumed every stream (4 streams: 560 -> 330 MB/s, bench/).
            self.flush_now()
        else:
            self.flush()

    def stream_eof(self, stream: Stream) -> None:
        if self._bulk:
            self._send_bulk()  # the FIN goes after the data read before it
        if self.session.has_stream(stream.stream_id):
            self.session.send_data(stream.stream_id, b"", fin=True)
            self.flush()

    def stream_lost(self, stream: Stream, clean: bool) -> None:
        if self._bulk:
            self._send_bulk()  # what was read before a reset still goes, as it did at once
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if not clean and self.session.has_stream(stream.stream_id):
                self.session.reset_stream(stream.stream_id, ErrorCode.RESET_BY_PEER)
                self.flush()

    # IPushProducer: the TLS transport's buffer

    def pauseProducing(self) -> None:
        self.paused = True
        for stream in self.streams.values():
            stream.update_reading()

    def resumeProducing(self) -> None:
        self.paused = False
        self._backlog_while_paused = 0
        for stream in list(self.streams.values()):
            stream.update_reading()

    def stopProducing(self) -> None:
        pass


def is_clean_close(reason: Failure | None) -> bool:
    return reason is None or reason.check(error.ConnectionDone) is not None
