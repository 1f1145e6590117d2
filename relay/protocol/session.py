"""The sans-IO tunnel session: stream state and per-stream credit flow control over relay/1 frames.

Bytes from the tunnel go in with receive_data() and come back as events; what the
application does (open, accept, send, consume, reset) queues frames that
data_to_send() hands out. No sockets, no reactor: the clock is a plain callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .. import defaults
from .frames import (
    MAX_STREAM_ID,
    Control,
    Data,
    ErrorCode,
    FrameDecoder,
    GoAway,
    Open,
    OpenOk,
    Ping,
    ProtocolError,
    Reset,
    Window,
    data_header,
    encode,
    encode_data,
)


class Role(Enum):
    RELAY = "relay"  # opens streams (one per public connection)
    AGENT = "agent"  # accepts or refuses them; never opens any


class StreamLimitError(Exception):
    """No new stream can be opened now (limit reached, or the session is going away)."""


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """AGENT: the relay opened a stream for a client of public `port`."""

    stream_id: int
    port: int
    client_host: str
    client_port: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """RELAY: the agent reached the target; the stream is up."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: the peer reset it, or we did because the peer broke its window."""

    stream_id: int
    code: int
    by_peer: bool = True


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """The peer gave credit and everything queued went out: the stream may read its socket again."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    code: int
    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ControlReceived:
    message: dict


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamReset
    | SendWindowOpened
    | PongReceived
    | GoAwayReceived
    | ControlReceived
)


class _Stream:
    __slots__ = (
        "id",
        "accepted",
        "send_credit",
        "pending",
        "pending_fin",
        "fin_sent",
        "fin_received",
        "recv_window",
        "recv_allowed",
        "unacked",
        "last_update",
        "opened_at",
    )

    def __init__(self, stream_id: int, window: int, now: float) -> None:
        self.id = stream_id
        self.opened_at = now
        self.accepted = False
        self.send_credit = window
        self.pending: list[bytes] = []  # sent by the app beyond our credit
        self.pending_fin = False
        self.fin_sent = False
        self.fin_received = False
        self.recv_window = window  # how much the peer may have in flight
        self.recv_allowed = window  # how much more it may send before our next WINDOW
        self.unacked = 0  # consumed by the app, not yet credited back
        self.last_update = now


class Session:
    """One tunnel's multiplexing state, for either end."""

    def __init__(
        self,
        role: Role,
        *,
        clock: Callable[[], float],
        initial_window: int = defaults.INITIAL_WINDOW,
        max_window: int = defaults.MAX_WINDOW,
        window_budget: int = defaults.WINDOW_BUDGET,
        max_streams: int = defaults.MAX_STREAMS,
        max_frame: int = defaults.MAX_DATA_PAYLOAD,
    ) -> None:
        self.role = role
        self._clock = clock
        self._initial_window = initial_window
        self._max_window = max_window
        self._window_budget = window_budget
        self._window_grown = 0  # sum over streams of recv_window - initial_window
        self._max_streams = max_streams
        self._max_frame = max_frame
        self._decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0  # highest id opened (by us as relay, by the peer as agent)
        self._out: list[bytes] = []
        self._pings: dict[int, float] = {}
        self._ping_counter = 0
        self.rtt: float | None = None  # the latest PING round trip
        # The smallest round trip seen: the path's own, without the queues in front of it.
        # Window growth is judged against it; judged against the latest, a loaded tunnel's
        # queueing delay grew the windows, which grew the queues (bufferbloat).
        self.min_rtt: float | None = None
        self.going_away = False  # we sent GOAWAY: no new streams
        self.peer_going_away = False
        self.refused_opens = 0  # AGENT: OPENs answered RESET(REFUSED) (stream limit, or going away)

    # --- introspection ------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_credit(self, stream_id: int) -> int:
        stream = self._streams[stream_id]
        return stream.send_credit - sum(map(len, stream.pending))

    def recv_window(self, stream_id: int) -> int:
        return self._streams[stream_id].recv_window

    @property
    def window_cap(self) -> int:
        """How far one stream's window may grow on this path.

        A window only needs to cover what one stream can have in flight: its rate times the
        path's round trip. On a short path (a LAN, loopback) a quarter window is used up
        within two round trips whenever a scheduler gap lets the reader's socket fill, and
        the window doubled to max_window: 16 MiB of one bulk stream queued in front of every
        other stream's frames (echo p99 beside bulk 12-20 ms, bench/). So growth past
        SHORT_PATH_WINDOW is allowed only as far as STREAM_RATE_CEILING * min_rtt.
        """
        earned = int(self.min_rtt * defaults.STREAM_RATE_CEILING) if self.min_rtt is not None else 0
        return min(self._max_window, max(defaults.SHORT_PATH_WINDOW, earned))

    @property
    def window_grown(self) -> int:
        return self._window_grown

    @property
    def receive_buffered(self) -> int:
        """Bytes received and not yet a whole frame."""
        return self._decoder.buffered

    @property
    def queued_bytes(self) -> int:
        """Stream data held for want of the peer's credit, over all streams."""
        return sum(len(chunk) for stream in self._streams.values() for chunk in stream.pending)

    @property
    def last_stream_id(self) -> int:
        return self._last_stream_id

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # --- application actions -------------------------------------------------------------

    def open_stream(self, port: int, client_host: str, client_port: int) -> int:
        """RELAY: a public client connected to `port`; returns the new stream's id."""
        if self.role is not Role.RELAY:
            raise ValueError("only the relay opens streams")
        if self.going_away or self.peer_going_away:
            raise StreamLimitError("the tunnel is going away")
        if len(self._streams) >= self._max_streams:
            raise StreamLimitError(f"{self._max_streams} streams already open on this tunnel")
        stream_id = self._last_stream_id + 2 if self._last_stream_id else 1
        if stream_id > MAX_STREAM_ID:
            raise StreamLimitError("stream ids exhausted; the tunnel must reconnect")
        self._last_stream_id = stream_id
        self._streams[stream_id] = _Stream(stream_id, self._initial_window, self._clock())
        self._out.append(encode(Open(stream_id, port, client_host, client_port)))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """AGENT: the target is connected; tell the relay the stream is up."""
        stream = self._streams[stream_id]
        if stream.accepted:
            raise ValueError(f"stream {stream_id} already accepted")
        stream.accepted = True
        self._out.append(encode(OpenOk(stream_id)))

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> bool:
        """Queue data (and FIN) on a stream; True while the stream may keep reading its socket.

        Data beyond the peer's credit is held here (at most what one socket read
        overshoots, because the caller stops reading when this returns False).
        """
        stream = self._streams[stream_id]
        if stream.fin_sent or stream.pending_fin:
            raise ValueError(f"stream {stream_id} already sent FIN")
        if stream.pending:
            if data:
                stream.pending.append(data)
        elif data:
            sent = self._emit_data(stream, data)
            if sent < len(data):
                stream.pending.append(data[sent:])
        if fin:
            if stream.pending:
                stream.pending_fin = True
            else:
                self._emit_fin(stream)
                return False
        return not stream.pending and stream.send_credit > 0

    def consumed(self, stream_id: int, count: int) -> None:
        """The app handed `count` received bytes on to a socket that is not pausing us: credit them."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_received:
            return  # nothing more will come, so no credit is worth sending
        stream.unacked += count
        if stream.unacked < stream.recv_window // 4:
            return
        now = self._clock()
        grow = 0
        # Credit used up again within two round trips means the window, not the reader,
        # limits this stream: double it (go-yamux's rule), within the tunnel's budget.
        if self.min_rtt is not None and now - stream.last_update < 2 * self.min_rtt:
            target = min(stream.recv_window * 2, self.window_cap)
            grow = min(target - stream.recv_window, self._window_budget - self._window_grown)
            grow = max(grow, 0)
            stream.recv_window += grow
            self._window_grown += grow
        increment = stream.unacked + grow
        stream.unacked = 0
        stream.recv_allowed += increment
        stream.last_update = now
        self._out.append(encode(Window(stream_id, increment)))

    def expire_opens(self, timeout: float) -> list[int]:
        """RELAY: reset with TIMEOUT every stream the agent has not accepted or refused within
        `timeout` seconds of its OPEN; their ids. Each such stream holds a public client and
        counts toward the stream limit, so an agent that never answers must not keep them."""
        now = self._clock()
        expired = [s.id for s in self._streams.values() if not s.accepted and now - s.opened_at >= timeout]
        for stream_id in expired:
            self.reset_stream(stream_id, ErrorCode.TIMEOUT)
        return expired

    def reset_stream(self, stream_id: int, code: int) -> None:
        """Abort a stream both ways (a TCP reset on our side, or a refusal)."""
        if self._forget(stream_id) is not None:
            self._out.append(encode(Reset(stream_id, code)))

    def send_ping(self) -> None:
        self._ping_counter += 1
        if len(self._pings) >= 8:  # unanswered pings are not worth remembering forever
            self._pings.pop(next(iter(self._pings)))
        self._pings[self._ping_counter] = self._clock()
        self._out.append(encode(Ping(self._ping_counter)))

    def send_control(self, message: dict) -> None:
        self._out.append(encode(Control(message)))

    def go_away(self, code: int, reason: str = "") -> None:
        """Tell the peer we open or accept no more streams; existing ones may finish."""
        self.going_away = True
        self._out.append(encode(GoAway(code, self._last_stream_id, reason)))

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for the frames completed by data. ProtocolError means the tunnel must close."""
        events: list[Event] = []
        for frame in self._decoder.feed(data):
            kind = type(frame)
            if kind is Data:
                self._on_data(frame, events)
            elif kind is Window:
                self._on_window(frame, events)
            elif kind is Open:
                self._on_open(frame, events)
            elif kind is OpenOk:
                self._on_open_ok(frame, events)
            elif kind is Reset:
                if self._stream_for(frame.stream_id) is not None:
                    self._forget(frame.stream_id)
                    events.append(StreamReset(frame.stream_id, frame.code))
            elif kind is Ping:
                self._on_ping(frame, events)
            elif kind is GoAway:
                self.peer_going_away = True
                events.append(GoAwayReceived(frame.code, frame.last_stream_id, frame.reason))
            else:
                events.append(ControlReceived(frame.message))
        return events

    def _stream_for(self, stream_id: int) -> _Stream | None:
        """The live stream, or None for one that is already closed; ProtocolError if never opened."""
        stream = self._streams.get(stream_id)
        # Stream ids are odd: an even one was never opened either.
        if stream is None and (stream_id > self._last_stream_id or stream_id % 2 == 0):
            raise ProtocolError(f"frame for stream {stream_id}, which was never opened")
        return stream

    def _on_data(self, frame: Data, events: list[Event]) -> None:
        stream = self._stream_for(frame.stream_id)
        if stream is None:
            return  # it crossed our RESET
        if stream.fin_received:
            raise ProtocolError(f"DATA on stream {stream.id} after its FIN")
        size = len(frame.payload)
        if size > stream.recv_allowed:
            self.reset_stream(stream.id, ErrorCode.FLOW_CONTROL)
            events.append(StreamReset(stream.id, ErrorCode.FLOW_CONTROL, by_peer=False))
            return
        stream.recv_allowed -= size
        if frame.fin:
            stream.fin_received = True
        events.append(DataReceived(stream.id, frame.payload, frame.fin))
        if frame.fin:
            self._maybe_forget(stream)

    def _on_window(self, frame: Window, events: list[Event]) -> None:
        stream = self._stream_for(frame.stream_id)
        if stream is None:
            return
        stream.send_credit += frame.increment
        if stream.send_credit > 2**31 - 1:
            raise ProtocolError(f"window of stream {stream.id} grew past 2**31-1")
        if not stream.pending:
            if not stream.fin_sent:
                events.append(SendWindowOpened(stream.id))
            return
        pending = b"".join(stream.pending)
        sent = self._emit_data(stream, pending)
        stream.pending = [pending[sent:]] if sent < len(pending) else []
        if stream.pending:
            return
        if stream.pending_fin:
            self._emit_fin(stream)
        elif stream.send_credit > 0:
            events.append(SendWindowOpened(stream.id))

    def _on_open(self, frame: Open, events: list[Event]) -> None:
        if self.role is not Role.AGENT:
            raise ProtocolError("the agent sent OPEN; only the relay opens streams")
        if frame.stream_id <= self._last_stream_id or frame.stream_id % 2 == 0:
            raise ProtocolError(f"OPEN for stream {frame.stream_id} is out of sequence")
        self._last_stream_id = frame.stream_id
        if self.going_away or len(self._streams) >= self._max_streams:
            self.refused_opens += 1
            self._out.append(encode(Reset(frame.stream_id, ErrorCode.REFUSED)))
            return
        self._streams[frame.stream_id] = _Stream(frame.stream_id, self._initial_window, self._clock())
        events.append(StreamOpened(frame.stream_id, frame.port, frame.client_host, frame.client_port))

    def _on_open_ok(self, frame: OpenOk, events: list[Event]) -> None:
        if self.role is not Role.RELAY:
            raise ProtocolError("the relay sent OPEN_OK")
        stream = self._stream_for(frame.stream_id)
        if stream is None:
            return
        if stream.accepted:
            raise ProtocolError(f"second OPEN_OK for stream {stream.id}")
        stream.accepted = True
        events.append(StreamAccepted(stream.id))

    def _on_ping(self, frame: Ping, events: list[Event]) -> None:
        if not frame.ack:
            self._out.append(encode(Ping(frame.opaque, ack=True)))
            return
        sent_at = self._pings.pop(frame.opaque, None)
        if sent_at is not None:
            self.rtt = max(self._clock() - sent_at, 0.0)
            self.min_rtt = self.rtt if self.min_rtt is None else min(self.min_rtt, self.rtt)
            events.append(PongReceived(self.rtt))

    # --- helpers ------------------------------------------------------------------------

    def _emit_data(self, stream: _Stream, data: bytes) -> int:
        """Frame as much of data as the credit allows; returns how much went out.

        Each frame goes out as its header and a view of data, not a copy: the TLS layer
        joins only the record that holds a header (tlswire.record_aligned), and hands the
        rest of the view to OpenSSL as it is.
        """
        size = min(len(data), stream.send_credit)
        step = self._max_frame
        out = self._out
        if size <= step:
            if size:
                out.append(data_header(stream.id, size))
                out.append(data if size == len(data) else memoryview(data)[:size])
        else:
            view = memoryview(data)
            for start in range(0, size, step):
                end = min(start + step, size)
                out.append(data_header(stream.id, end - start))
                out.append(view[start:end])
        stream.send_credit -= size
        return size

    def _emit_fin(self, stream: _Stream) -> None:
        stream.fin_sent = True
        stream.pending_fin = False
        self._out.append(encode_data(stream.id, b"", fin=True))
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.fin_sent and stream.fin_received:
            self._forget(stream.id)

    def _forget(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._window_grown -= stream.recv_window - self._initial_window
        return stream
