"""The relay/1 frame codec: frames as plain values, bytes in and out, every malformed input a ProtocolError.

Wire format (docs/protocol.md): a 12-byte big-endian header
``version u8 | type u8 | flags u16 | stream id u32 | payload length u32`` then the payload.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

from .. import defaults

VERSION = 1
HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size

FLAG_FIN = 0x1  # DATA: the sender will send no more on this stream
FLAG_ACK = 0x1  # PING: this is the answer

MAX_STREAM_ID = 2**31 - 1
MAX_HOST_BYTES = 255
MAX_REASON_BYTES = 1024

_OPEN = struct.Struct("!HH")  # public port, client port; client host follows
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_GOAWAY = struct.Struct("!II")


class FrameType(IntEnum):
    DATA = 0
    WINDOW = 1
    OPEN = 2
    OPEN_OK = 3
    RESET = 4
    PING = 5
    GOAWAY = 6
    CONTROL = 7


class ErrorCode(IntEnum):
    """Why a stream was reset or a tunnel told to go away."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    REFUSED = 3  # too many streams, or not accepting new ones
    CONNECT_FAILED = 4  # the agent could not reach the target
    NOT_ALLOWED = 5  # the port is not exposed by this agent
    RESET_BY_PEER = 6  # the client or target reset its TCP connection
    FLOW_CONTROL = 7  # the peer sent beyond the window
    TIMEOUT = 8
    AUTH_FAILED = 9
    REPLACED = 10  # a newer tunnel of the same agent took over
    SHUTDOWN = 11  # the relay is stopping

    @classmethod
    def name_of(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"UNKNOWN({code})"


class ProtocolError(Exception):
    """The peer broke docs/protocol.md; the tunnel must go away with this reason."""

    code = ErrorCode.PROTOCOL_ERROR


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    payload: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Open:
    stream_id: int
    port: int
    client_host: str
    client_port: int


@dataclass(frozen=True, slots=True)
class OpenOk:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Ping:
    opaque: int
    ack: bool = False


@dataclass(frozen=True, slots=True)
class GoAway:
    code: int
    last_stream_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Control:
    message: dict


Frame = Data | Window | Open | OpenOk | Reset | Ping | GoAway | Control

# Largest payload each type may carry; checked on the header, before any payload is
# buffered, so a lying length costs us nothing.
_MAX_PAYLOAD = {
    FrameType.DATA: defaults.MAX_DATA_PAYLOAD,
    FrameType.WINDOW: _U32.size,
    FrameType.OPEN: _OPEN.size + MAX_HOST_BYTES,
    FrameType.OPEN_OK: 0,
    FrameType.RESET: _U32.size,
    FrameType.PING: _U64.size,
    FrameType.GOAWAY: _GOAWAY.size + MAX_REASON_BYTES,
    FrameType.CONTROL: defaults.MAX_CONTROL_PAYLOAD,
}
_MIN_PAYLOAD = {
    FrameType.WINDOW: _U32.size,
    FrameType.OPEN: _OPEN.size,
    FrameType.RESET: _U32.size,
    FrameType.PING: _U64.size,
    FrameType.GOAWAY: _GOAWAY.size,
}
_ALLOWED_FLAGS = {FrameType.DATA: FLAG_FIN, FrameType.PING: FLAG_ACK}
_SESSION_TYPES = (FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL)


def encode(frame: Frame) -> bytes:
    """One frame as bytes. DATA has a faster path in encode_data()."""
    if isinstance(frame, Data):
        return encode_data(frame.stream_id, frame.payload, frame.fin)
    if isinstance(frame, Window):
        if not 1 <= frame.increment <= 0xFFFFFFFF:
            raise ValueError("window increment out of range")
        return _frame(FrameType.WINDOW, 0, frame.stream_id, _U32.pack(frame.increment))
    if isinstance(frame, Open):
        host = _utf8_prefix(frame.client_host, MAX_HOST_BYTES)
        payload = _OPEN.pack(frame.port, frame.client_port) + host
        return _frame(FrameType.OPEN, 0, frame.stream_id, payload)
    if isinstance(frame, OpenOk):
        return _frame(FrameType.OPEN_OK, 0, frame.stream_id, b"")
    if isinstance(frame, Reset):
        return _frame(FrameType.RESET, 0, frame.stream_id, _U32.pack(frame.code))
    if isinstance(frame, Ping):
        return _frame(FrameType.PING, FLAG_ACK if frame.ack else 0, 0, _U64.pack(frame.opaque))
    if isinstance(frame, GoAway):
        reason = _utf8_prefix(frame.reason, MAX_REASON_BYTES)
        payload = _GOAWAY.pack(frame.code, frame.last_stream_id) + reason
        return _frame(FrameType.GOAWAY, 0, 0, payload)
    if isinstance(frame, Control):
        payload = json.dumps(frame.message, separators=(",", ":")).encode("utf-8")
        if len(payload) > defaults.MAX_CONTROL_PAYLOAD:
            raise ValueError("control message too large")
        return _frame(FrameType.CONTROL, 0, 0, payload)
    raise TypeError(f"not a frame: {frame!r}")


def encode_data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    return data_header(stream_id, len(payload), fin) + payload


def data_header(stream_id: int, length: int, fin: bool = False) -> bytes:
    """The header of a DATA frame whose payload follows separately (no copy of the payload)."""
    if length > _MAX_PAYLOAD[FrameType.DATA]:
        raise ValueError(f"DATA payload of {length} bytes exceeds the limit")
    return HEADER.pack(VERSION, FrameType.DATA, FLAG_FIN if fin else 0, stream_id, length)


def size_without_data(chunks: list) -> int:
    """How many bytes of a session's output (data_to_send) are not DATA frames.

    DATA leaves as a header chunk followed by its payload chunk (data_header), a FIN as
    a header alone; every other frame is one chunk of its own.
    """
    total = 0
    skip = False
    for chunk in chunks:
        if skip:
            skip = False
        elif len(chunk) == HEADER_SIZE and chunk[1] == FrameType.DATA:
            skip = HEADER.unpack(chunk)[4] > 0
        else:
            total += len(chunk)
    return total


def _utf8_prefix(text: str, limit: int) -> bytes:
    """text as UTF-8, cut to at most limit bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def _frame(kind: FrameType, flags: int, stream_id: int, payload: bytes) -> bytes:
    return HEADER.pack(VERSION, kind, flags, stream_id, len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames. Partial input is kept until the frame is whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """All frames completed by data, in order; ProtocolError on the first bad one.

        Frames wholly inside `data` are taken from it without a copy: a DATA payload is a
        read-only memoryview of `data`, or of the buffer it was completed in, which is then
        never written again; other payloads are bytes. `data` is bytes, or a read-only
        memoryview of memory nobody writes again (tlswire's fresh buffer of each TLS read),
        so nothing can change under the views; anything else is copied first. Only the
        frame that straddles two feeds is copied: its start waits in the buffer, and only
        its rest is taken from the next feed, not all of it (a bulk stream's frames
        straddle almost every TLS read).
        """
        if type(data) is memoryview and data.readonly and data.contiguous:
            view = data.cast("B") if data.format != "B" else data
        else:
            view = memoryview(data if type(data) is bytes else bytes(data))
        frames: list[Frame] = []
        offset = 0
        end = len(view)
        try:
            if self._buffer:
                offset = self._complete_buffered(view, frames)
                if self._buffer:
                    return frames  # data ran out inside that frame
            while end - offset >= HEADER_SIZE:
                version, kind, flags, stream_id, length = HEADER.unpack_from(view, offset)
                kind = _check_header(version, kind, flags, stream_id, length)
                start = offset + HEADER_SIZE
                if end - start < length:
                    break
                offset = start + length
                payload = view[start:offset] if kind is FrameType.DATA else bytes(view[start:offset])
                frames.append(_parse(kind, flags, stream_id, payload))
        except ProtocolError:
            self._buffer.clear()  # the tunnel is closing; nothing after the error is ever read
            raise
        if offset < end:
            self._buffer += view[offset:]
        return frames

    def _complete_buffered(self, view: memoryview, frames: list[Frame]) -> int:
        """Move into the buffer as much of view as its partial frame lacks; emit the frame
        once whole. Returns how much of view was taken."""
        buf = self._buffer
        taken = 0
        if len(buf) < HEADER_SIZE:
            taken = min(HEADER_SIZE - len(buf), len(view))
            buf += view[:taken]
            if len(buf) < HEADER_SIZE:
                return taken
        version, kind, flags, stream_id, length = HEADER.unpack_from(buf, 0)
        kind = _check_header(version, kind, flags, stream_id, length)
        more = min(HEADER_SIZE + length - len(buf), len(view) - taken)
        buf += view[taken : taken + more]
        taken += more
        if len(buf) == HEADER_SIZE + length:
            # The buffer becomes the payload (no copy out of it); a new one takes its place.
            self._buffer = bytearray()
            payload = memoryview(buf).toreadonly()[HEADER_SIZE:]
            if kind is not FrameType.DATA:
                payload = bytes(payload)
            frames.append(_parse(kind, flags, stream_id, payload))
        return taken

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def _check_header(version: int, kind: int, flags: int, stream_id: int, length: int) -> FrameType:
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        kind = FrameType(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    if length > _MAX_PAYLOAD[kind]:
        raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {_MAX_PAYLOAD[kind]}")
    if length < _MIN_PAYLOAD.get(kind, 0):
        raise ProtocolError(f"{kind.name} frame of {length} bytes is too short")
    if flags & ~_ALLOWED_FLAGS.get(kind, 0):
        raise ProtocolError(f"{kind.name} frame with unknown flags {flags:#x}")
    if kind in _SESSION_TYPES:
        if stream_id != 0:
            raise ProtocolError(f"{kind.name} frame on stream {stream_id}, must be 0")
    elif not 1 <= stream_id <= MAX_STREAM_ID:
        raise ProtocolError(f"{kind.name} frame on invalid stream id {stream_id}")
    return kind


def _parse(kind: FrameType, flags: int, stream_id: int, payload: bytes) -> Frame:
    if kind is FrameType.DATA:
        return Data(stream_id, payload, bool(flags & FLAG_FIN))
    if kind is FrameType.WINDOW:
        (increment,) = _U32.unpack(payload)
        if increment == 0:
            raise ProtocolError("WINDOW frame with a zero increment")
        return Window(stream_id, increment)
    if kind is FrameType.OPEN:
        port, client_port = _OPEN.unpack_from(payload)
        if port == 0:
            raise ProtocolError("OPEN frame for port 0")
        return Open(stream_id, port, _text(payload[_OPEN.size :], "OPEN client host"), client_port)
    if kind is FrameType.OPEN_OK:
        return OpenOk(stream_id)
    if kind is FrameType.RESET:
        return Reset(stream_id, _U32.unpack(payload)[0])
    if kind is FrameType.PING:
        return Ping(_U64.unpack(payload)[0], bool(flags & FLAG_ACK))
    if kind is FrameType.GOAWAY:
        code, last = _GOAWAY.unpack_from(payload)
        return GoAway(code, last, _text(payload[_GOAWAY.size :], "GOAWAY reason"))
    return Control(_control(payload))


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _control(payload: bytes) -> dict:
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("CONTROL frame is not a JSON object") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("CONTROL frame is not a JSON object with a string 'type'")
    return message
