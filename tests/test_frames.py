"""The relay/1 frame codec, in memory: round trips, pinned wire bytes, chunking, malformed input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import defaults
from relay.protocol import frames
from relay.protocol.frames import (
    FLAG_ACK,
    FLAG_FIN,
    HEADER_SIZE,
    MAX_HOST_BYTES,
    MAX_REASON_BYTES,
    MAX_STREAM_ID,
    VERSION,
    Control,
    Data,
    ErrorCode,
    FrameDecoder,
    FrameType,
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
    size_without_data,
)

MAX_PAYLOAD = defaults.MAX_DATA_PAYLOAD  # the largest payload of any frame type
MAX_PAYLOAD_OF = {
    FrameType.DATA: defaults.MAX_DATA_PAYLOAD,
    FrameType.WINDOW: 4,
    FrameType.OPEN: 4 + MAX_HOST_BYTES,
    FrameType.OPEN_OK: 0,
    FrameType.RESET: 4,
    FrameType.PING: 8,
    FrameType.GOAWAY: 8 + MAX_REASON_BYTES,
    FrameType.CONTROL: defaults.MAX_CONTROL_PAYLOAD,
}
SESSION_TYPES = (FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL)
STREAM_TYPES = (
    FrameType.DATA,
    FrameType.WINDOW,
    FrameType.OPEN,
    FrameType.OPEN_OK,
    FrameType.RESET,
)


def header(
    kind: int, flags: int = 0, stream_id: int = 0, length: int = 0, version: int = VERSION
) -> bytes:
    return struct.pack("!BBHII", version, kind, flags, stream_id, length)


def raw(kind: int, payload: bytes = b"", flags: int = 0, stream_id: int = 0) -> bytes:
    return header(kind, flags, stream_id, len(payload)) + payload


def decode_one(data: bytes) -> frames.Frame:
    decoder = FrameDecoder()
    out = decoder.feed(data)
    assert len(out) == 1, out
    assert decoder.buffered == 0
    return out[0]


def valid_stream_id(kind: FrameType) -> int:
    return 0 if kind in SESSION_TYPES else 1


# --- round trips ---------------------------------------------------------------------------

ROUND_TRIP = [
    Data(1, b"hello"),
    Data(MAX_STREAM_ID, b"x"),
    Data(1, b""),
    Data(7, b"", fin=True),
    Data(3, b"last bytes", fin=True),
    Data(5, bytes(range(256)) * 256),  # exactly 64 KiB
    Data(5, b"\x00" * MAX_PAYLOAD, fin=True),
    Window(1, 1),
    Window(MAX_STREAM_ID, 0xFFFFFFFF),
    Window(9, 65536),
    Open(1, 8080, "203.0.113.7", 54321),
    Open(MAX_STREAM_ID, 65535, "2001:db8::1", 65535),
    Open(3, 1, "::ffff:192.0.2.1", 0),
    Open(5, 22, "bücher.例え.jp", 1),
    Open(7, 443, "", 1234),
    Open(9, 443, "h" * MAX_HOST_BYTES, 1234),
    OpenOk(1),
    OpenOk(MAX_STREAM_ID),
    Reset(1, ErrorCode.REFUSED),
    Reset(MAX_STREAM_ID, 0xFFFFFFFF),
    Reset(11, ErrorCode.NORMAL),
    Ping(0),
    Ping(2**64 - 1, ack=True),
    Ping(42, ack=False),
    GoAway(ErrorCode.SHUTDOWN, 0, ""),
    GoAway(ErrorCode.PROTOCOL_ERROR, MAX_STREAM_ID, "bad frame: ünïcödé ✓"),
    GoAway(0xFFFFFFFF, 0xFFFFFFFF, "r" * MAX_REASON_BYTES),
    Control({"type": "hello", "version": 1}),
    Control({"type": "listen", "ports": [8080, 8443], "nested": {"a": None, "b": [True, 1.5]}}),
    Control({"type": "ünïcödé", "text": "日本語"}),
]


@pytest.mark.parametrize("frame", ROUND_TRIP, ids=lambda f: type(f).__name__)
def test_round_trip(frame):
    assert decode_one(encode(frame)) == frame


def test_round_trip_all_in_one_feed_keeps_order():
    blob = b"".join(encode(f) for f in ROUND_TRIP)
    decoder = FrameDecoder()
    assert decoder.feed(blob) == ROUND_TRIP
    assert decoder.buffered == 0


def test_encode_data_matches_encode():
    assert encode_data(3, b"abc", True) == encode(Data(3, b"abc", True))
    assert encode_data(3, b"abc") == encode(Data(3, b"abc"))


def test_data_header_is_encode_data_without_the_payload():
    assert frames.data_header(3, 3, True) + b"abc" == encode_data(3, b"abc", True)
    with pytest.raises(ValueError, match="exceeds"):
        frames.data_header(1, defaults.MAX_DATA_PAYLOAD + 1)
    with pytest.raises(ValueError, match="exceeds"):  # the peer would refuse it
        encode(Data(1, bytes(defaults.MAX_DATA_PAYLOAD + 1)))


def test_data_payloads_are_views_of_the_input_not_copies():
    big = bytes(range(256)) * 256  # a whole 64 KiB frame
    blob = encode_data(1, b"abc") + encode(Ping(7)) + encode_data(3, big, True)
    data, ping, last = FrameDecoder().feed(blob)
    assert isinstance(data.payload, memoryview) and data.payload.obj is blob
    assert data.payload.readonly and data.payload == b"abc"
    assert last.payload.obj is blob and last.payload == big and last.fin
    assert ping == Ping(7)


def test_a_frame_split_across_feeds_takes_only_its_rest_and_keeps_its_payload():
    first = encode_data(1, b"abcdef")
    blob = first + encode_data(3, b"ghi") + encode(Ping(5))
    decoder = FrameDecoder()
    assert decoder.feed(blob[:4]) == []  # not even a whole header yet
    assert decoder.feed(blob[4:15]) == []
    assert decoder.buffered == 15
    rest = blob[15:]
    frame, whole, ping = decoder.feed(rest)
    assert frame == Data(1, b"abcdef") and frame.payload.readonly
    assert whole.payload.obj is rest  # frames after the straddling one are not copied
    assert ping == Ping(5) and decoder.buffered == 0
    decoder.feed(blob[:10])  # the next partial frame does not write over the payload
    decoder.feed(blob[10:])
    assert frame.payload == b"abcdef"


def test_a_read_only_view_is_taken_without_a_copy_and_anything_writable_is_copied():
    # tlswire hands the decoder a read-only view of a buffer it never writes again: DATA
    # payloads are views of that buffer. Writable input could change under the views.
    blob = encode_data(1, b"abc") + encode(Control({"type": "x"}))
    source = bytearray(blob)
    data, control = FrameDecoder().feed(memoryview(source).toreadonly())
    assert data.payload.obj is source and data.payload == b"abc"
    assert control == Control({"type": "x"}) and type(control.message["type"]) is str
    for writable in (bytearray(blob), memoryview(bytearray(blob))):
        (data, _) = FrameDecoder().feed(writable)
        writable[HEADER_SIZE : HEADER_SIZE + 3] = b"XYZ"
        assert data.payload == b"abc"


def test_a_control_frame_split_across_feeds_is_bytes():
    blob = encode(Control({"type": "x"}))
    decoder = FrameDecoder()
    decoder.feed(blob[:14])
    (frame,) = decoder.feed(blob[14:])
    assert frame == Control({"type": "x"})


def test_types_are_decoded_to_their_classes():
    assert type(decode_one(encode(Ping(1, ack=True)))) is Ping
    assert decode_one(encode(Ping(1, ack=True))).ack is True
    assert decode_one(encode(Ping(1))).ack is False
    assert decode_one(encode_data(1, b"", fin=True)) == Data(1, b"", True)


# --- pinned wire format --------------------------------------------------------------------


def test_header_bytes_data_fin():
    assert (
        encode_data(1, b"abc", fin=True) == bytes.fromhex("01 00 0001 00000001 00000003") + b"abc"
    )


def test_header_bytes_data_no_fin():
    assert encode_data(0x01020304, b"") == bytes.fromhex("01 00 0000 01020304 00000000")


def test_header_bytes_other_types():
    assert encode(Window(5, 0x10000)) == bytes.fromhex("01 01 0000 00000005 00000004 00010000")
    assert (
        encode(Open(3, 8080, "a", 443))
        == bytes.fromhex("01 02 0000 00000003 00000005 1f90 01bb") + b"a"
    )
    assert encode(OpenOk(7)) == bytes.fromhex("01 03 0000 00000007 00000000")
    assert encode(Reset(9, ErrorCode.FLOW_CONTROL)) == bytes.fromhex(
        "01 04 0000 00000009 00000004 00000007"
    )
    assert encode(Ping(0x0102030405060708, ack=True)) == bytes.fromhex(
        "01 05 0001 00000000 00000008 0102030405060708"
    )
    assert (
        encode(GoAway(11, 5, "bye"))
        == bytes.fromhex("01 06 0000 00000000 0000000b 0000000b 00000005") + b"bye"
    )
    assert (
        encode(Control({"type": "x"}))
        == bytes.fromhex("01 07 0000 00000000 0000000c") + b'{"type":"x"}'
    )
    assert HEADER_SIZE == 12


def test_frame_type_and_error_code_numbers_are_pinned():
    assert [t.value for t in FrameType] == list(range(8))
    assert [t.name for t in FrameType] == [
        "DATA", "WINDOW", "OPEN", "OPEN_OK", "RESET", "PING", "GOAWAY", "CONTROL"
    ]  # fmt: skip
    assert ErrorCode.FLOW_CONTROL == 7
    assert ErrorCode.REFUSED == 3
    assert ErrorCode.name_of(7) == "FLOW_CONTROL"
    assert ErrorCode.name_of(999) == "UNKNOWN(999)"
    assert ProtocolError.code == ErrorCode.PROTOCOL_ERROR


# --- encoder limits ------------------------------------------------------------------------


def test_encode_truncates_long_host_and_reason():
    frame = decode_one(encode(Open(1, 80, "h" * 300, 1)))
    assert frame.client_host == "h" * MAX_HOST_BYTES
    frame = decode_one(encode(GoAway(0, 0, "r" * 2000)))
    assert frame.reason == "r" * MAX_REASON_BYTES


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_encode_truncation_never_splits_a_utf8_character(char):
    # A long non-ASCII reason/host must not turn into a ProtocolError at the peer.
    reason = char * MAX_REASON_BYTES
    frame = decode_one(encode(GoAway(1, 2, reason)))
    assert reason.startswith(frame.reason)
    assert MAX_REASON_BYTES - 4 < len(frame.reason.encode()) <= MAX_REASON_BYTES
    host = char * MAX_HOST_BYTES
    frame = decode_one(encode(Open(1, 80, host, 1)))
    assert host.startswith(frame.client_host)
    assert MAX_HOST_BYTES - 4 < len(frame.client_host.encode()) <= MAX_HOST_BYTES


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError):
        encode(Window(1, 0))
    with pytest.raises(ValueError):
        encode(Window(1, 2**32))
    with pytest.raises(ValueError, match="too large"):
        encode(Control({"type": "x", "blob": "a" * defaults.MAX_CONTROL_PAYLOAD}))
    with pytest.raises(TypeError):
        encode("not a frame")  # type: ignore[arg-type]


# --- chunking ------------------------------------------------------------------------------


def test_byte_by_byte_equals_whole():
    blob = b"".join(encode(f) for f in ROUND_TRIP[:12] + ROUND_TRIP[-8:])
    decoder = FrameDecoder()
    got = []
    for i in range(len(blob)):
        got += decoder.feed(blob[i : i + 1])
        assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD
    assert got == ROUND_TRIP[:12] + ROUND_TRIP[-8:]
    assert decoder.buffered == 0


def test_partial_frame_is_held_until_complete():
    blob = encode_data(1, b"abcdef")
    decoder = FrameDecoder()
    assert decoder.feed(blob[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(blob[5:14]) == []
    assert decoder.buffered == 14
    assert decoder.feed(blob[14:] + blob[:3]) == [Data(1, b"abcdef")]
    assert decoder.buffered == 3


def test_feed_empty_returns_nothing():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


host_text = st.text(max_size=60)
stream_ids = st.integers(1, MAX_STREAM_ID)
u32 = st.integers(0, 0xFFFFFFFF)
valid_frames = st.one_of(
    st.builds(Data, stream_ids, st.binary(max_size=3000), st.booleans()),
    st.builds(Window, stream_ids, st.integers(1, 0xFFFFFFFF)),
    st.builds(Open, stream_ids, st.integers(1, 65535), host_text, st.integers(0, 65535)),
    st.builds(OpenOk, stream_ids),
    st.builds(Reset, stream_ids, u32),
    st.builds(Ping, st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(GoAway, u32, u32, st.text(max_size=100)),
    st.builds(
        Control,
        st.fixed_dictionaries(
            {"type": st.text(max_size=20)},
            optional={
                "n": st.integers(-(2**40), 2**40),
                "s": st.text(max_size=30),
                "l": st.lists(st.booleans()),
            },
        ),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_list=st.lists(valid_frames, max_size=12), data=st.data())
def test_random_splits_yield_the_same_frames(frame_list, data):
    blob = b"".join(encode(f) for f in frame_list)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=20)))
    as_view = data.draw(st.booleans())  # bytes, or read-only views as tlswire feeds
    decoder = FrameDecoder()
    got = []
    previous = 0
    for cut in [*cuts, len(blob)]:
        piece = blob[previous:cut]
        got += decoder.feed(memoryview(bytearray(piece)).toreadonly() if as_view else piece)
        previous = cut
    assert got == frame_list
    assert decoder.buffered == 0


# --- malformed input -----------------------------------------------------------------------


def assert_rejected(data: bytes, match: str) -> FrameDecoder:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match=match):
        decoder.feed(data)
    return decoder


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version):
    assert_rejected(
        header(FrameType.DATA, 0, 1, 0, version=version), f"unsupported protocol version {version}"
    )


@pytest.mark.parametrize("kind", [8, 9, 255])
def test_unknown_type(kind):
    assert_rejected(header(kind, 0, 1, 0), f"unknown frame type {kind}")


def test_a_partial_header_is_not_judged_yet():
    decoder = FrameDecoder()
    assert decoder.feed(header(99, 0, 1, 2**32 - 1, version=7)[:11]) == []
    assert decoder.buffered == 11
    with pytest.raises(ProtocolError, match="version 7"):
        decoder.feed(b"\xff")


@pytest.mark.parametrize("kind", list(FrameType))
@pytest.mark.parametrize("excess", [1, 2**32 - 1])
def test_oversized_length_raises_on_the_header_alone(kind, excess):
    length = min(MAX_PAYLOAD_OF[kind] + excess, 2**32 - 1)
    decoder = assert_rejected(
        header(kind, 0, valid_stream_id(kind), length),
        f"{kind.name} frame of {length} bytes exceeds the limit",
    )
    assert decoder.buffered == 0  # nothing of the claimed payload was waited for, and a failed decoder keeps nothing


def test_four_gib_data_header_is_refused_before_any_payload():
    decoder = FrameDecoder()
    with pytest.raises(
        ProtocolError, match="DATA frame of 4294967295 bytes exceeds the limit of 65536"
    ):
        decoder.feed(header(FrameType.DATA, 0, 1, 2**32 - 1))
    assert decoder.buffered == 0


@pytest.mark.parametrize("kind", [k for k in FrameType if k is not FrameType.OPEN_OK])
def test_max_length_header_is_accepted_and_waits_for_the_payload(kind):
    decoder = FrameDecoder()
    assert decoder.feed(header(kind, 0, valid_stream_id(kind), MAX_PAYLOAD_OF[kind])) == []
    assert decoder.buffered == HEADER_SIZE


@pytest.mark.parametrize(
    ("kind", "length"),
    [(FrameType.WINDOW, 3), (FrameType.WINDOW, 0), (FrameType.OPEN, 3), (FrameType.RESET, 0),
     (FrameType.RESET, 3), (FrameType.PING, 7), (FrameType.PING, 0), (FrameType.GOAWAY, 7)],
)  # fmt: skip
def test_too_short_fixed_payloads(kind, length):
    decoder = assert_rejected(
        header(kind, 0, valid_stream_id(kind), length),
        f"{kind.name} frame of {length} bytes is too short",
    )
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("kind", "flags"),
    [(FrameType.DATA, 0x2), (FrameType.DATA, 0x8000), (FrameType.DATA, 0x3), (FrameType.WINDOW, FLAG_FIN),
     (FrameType.OPEN, 0x1), (FrameType.OPEN_OK, 0x1), (FrameType.RESET, 0x1), (FrameType.PING, 0x2),
     (FrameType.GOAWAY, 0x1), (FrameType.CONTROL, 0x1), (FrameType.CONTROL, 0xFFFF)],
)  # fmt: skip
def test_unknown_flags(kind, flags):
    length = frames._MIN_PAYLOAD.get(kind, 0)
    assert_rejected(
        header(kind, flags, valid_stream_id(kind), length),
        f"{kind.name} frame with unknown flags {flags:#x}",
    )


def test_known_flags_accepted():
    assert decode_one(raw(FrameType.DATA, b"x", FLAG_FIN, 1)) == Data(1, b"x", True)
    assert decode_one(raw(FrameType.PING, bytes(8), FLAG_ACK)) == Ping(0, True)


@pytest.mark.parametrize("kind", SESSION_TYPES)
@pytest.mark.parametrize("stream_id", [1, 2, MAX_STREAM_ID, 2**32 - 1])
def test_session_frames_must_be_on_stream_zero(kind, stream_id):
    length = frames._MIN_PAYLOAD.get(kind, 0)
    assert_rejected(
        header(kind, 0, stream_id, length), f"{kind.name} frame on stream {stream_id}, must be 0"
    )


@pytest.mark.parametrize("kind", STREAM_TYPES)
@pytest.mark.parametrize("stream_id", [0, MAX_STREAM_ID + 1, 2**32 - 1])
def test_stream_frames_need_a_valid_stream_id(kind, stream_id):
    length = frames._MIN_PAYLOAD.get(kind, 0)
    assert_rejected(
        header(kind, 0, stream_id, length), f"{kind.name} frame on invalid stream id {stream_id}"
    )


def test_window_zero_increment():
    assert_rejected(
        raw(FrameType.WINDOW, bytes(4), stream_id=1), "WINDOW frame with a zero increment"
    )


def test_open_port_zero():
    assert_rejected(
        raw(FrameType.OPEN, struct.pack("!HH", 0, 80) + b"h", stream_id=1), "OPEN frame for port 0"
    )


def test_open_host_not_utf8():
    assert_rejected(
        raw(FrameType.OPEN, struct.pack("!HH", 80, 80) + b"\xff\xfe", stream_id=1),
        "OPEN client host is not UTF-8",
    )


def test_goaway_reason_not_utf8():
    assert_rejected(
        raw(FrameType.GOAWAY, struct.pack("!II", 0, 0) + b"ok\xc3"), "GOAWAY reason is not UTF-8"
    )


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b'{"type": "x"', b"\xff\xfe{}", b"NaN-ish{", b"[" * 5000 + b"]" * 5000,
     b'{"type":' * 1800 + b'"x"' + b"}" * 1800],
    ids=["empty", "text", "open-brace", "unterminated", "not-utf8", "garbage", "deep-list", "deep-object"],
)  # fmt: skip
def test_control_not_json(payload):
    assert len(payload) <= defaults.MAX_CONTROL_PAYLOAD
    assert_rejected(raw(FrameType.CONTROL, payload), "CONTROL frame is not a JSON object")


@pytest.mark.parametrize(
    "message",
    [
        [],
        ["type"],
        "type",
        1,
        None,
        {},
        {"kind": "x"},
        {"type": 1},
        {"type": None},
        {"type": ["x"]},
    ],
    ids=repr,
)
def test_control_not_an_object_with_string_type(message):
    payload = json.dumps(message).encode()
    assert_rejected(
        raw(FrameType.CONTROL, payload), "CONTROL frame is not a JSON object with a string 'type'"
    )


def test_control_huge_integer_is_a_protocol_error():
    payload = b'{"type":"x","n":' + b"9" * 5000 + b"}"
    assert_rejected(raw(FrameType.CONTROL, payload), "CONTROL frame is not a JSON object")


def test_good_frames_before_a_bad_one_do_not_hide_the_error():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="unknown frame type"):
        decoder.feed(encode(Ping(1)) + header(42))


# --- fuzz ----------------------------------------------------------------------------------

# Mostly-plausible garbage: real frames, headers with random fields, random bytes.
plausible_header = st.builds(
    lambda v, k, f, s, n, p: struct.pack("!BBHII", v, k, f, s, n) + p,
    st.sampled_from([1, 1, 1, 0, 2]),
    st.integers(0, 9),
    st.sampled_from([0, 0, 1, 2, 0xFFFF]),
    st.sampled_from([0, 1, 2, 3, MAX_STREAM_ID, MAX_STREAM_ID + 1, 2**32 - 1]),
    st.one_of(
        st.integers(0, 20), st.sampled_from([4, 8, 259, 1032, 16384, 65536, 65537, 2**32 - 1])
    ),
    st.binary(max_size=40),
)
segments = st.lists(
    st.one_of(valid_frames.map(encode), plausible_header, st.binary(min_size=1, max_size=64)),
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=segments, chunk=st.integers(1, 5000))
def test_fuzz_only_protocol_errors_and_bounded_buffer(parts, chunk):
    blob = b"".join(parts)
    decoder = FrameDecoder()
    for start in range(0, len(blob), chunk):
        piece = blob[start : start + chunk]
        try:
            out = decoder.feed(piece)
        except ProtocolError as e:
            assert str(e)
            assert decoder.buffered == 0
            return
        assert all(isinstance(f, frames.Frame.__args__) for f in out)
        assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_fuzz_random_bytes_random_chunks(blob, cuts):
    decoder = FrameDecoder()
    previous = 0
    try:
        for cut in [*sorted(c for c in cuts if c <= len(blob)), len(blob)]:
            piece = blob[previous:cut]
            previous = cut
            decoder.feed(piece)
            assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD
    except ProtocolError:
        assert decoder.buffered == 0


def test_size_without_data_counts_every_frame_but_data():
    ping, window = encode(Ping(7)), encode(Window(1, 4096))
    control = encode(Control({"type": "listen_ok", "port": 8080}))
    payload = bytes(HEADER_SIZE)  # a payload the size of a header, that looks like one
    out = [
        ping,
        data_header(1, len(payload)), memoryview(payload),
        window,
        data_header(3, 5), b"hello",
        encode_data(1, b"", fin=True),
        control,
    ]  # fmt: skip
    assert size_without_data(out) == len(ping) + len(window) + len(control)
    assert size_without_data([]) == 0
