"""The sans-IO tunnel session, in memory: a relay Session and an agent Session wired together.

No reactor, no sockets, no sleeps: time is a FakeClock the tests move by hand.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import defaults
from relay.protocol.frames import (
    HEADER_SIZE,
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
    encode,
    encode_data,
)
from relay.protocol.session import (
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    Role,
    SendWindowOpened,
    Session,
    StreamAccepted,
    StreamLimitError,
    StreamOpened,
    StreamReset,
)

KiB = 1024
MiB = 1024 * KiB
SMALL = {"initial_window": 1024, "max_frame": 256}  # flow control visible with small numbers


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain_frames(session: Session) -> list:
    """What the session queued, decoded by an independent decoder (drains the queue)."""
    decoder = FrameDecoder()
    out = decoder.feed(b"".join(session.data_to_send()))
    assert decoder.buffered == 0
    return out


def forward(src: Session, dst: Session) -> list:
    """Decode what src queued (for assertions) and deliver it to dst; dst's events are dropped."""
    blob = b"".join(src.data_to_send())
    dst.receive_data(blob)
    return FrameDecoder().feed(blob)


class Pair:
    """A relay and an agent session joined by an in-memory pipe."""

    def __init__(self, **options) -> None:
        self.clock = FakeClock()
        self.relay = Session(Role.RELAY, clock=self.clock, **options)
        self.agent = Session(Role.AGENT, clock=self.clock, **options)

    def to_agent(self) -> list:
        return self.agent.receive_data(b"".join(self.relay.data_to_send()))

    def to_relay(self) -> list:
        return self.relay.receive_data(b"".join(self.agent.data_to_send()))

    def settle(self) -> tuple[list, list]:
        """Pump both ways until nothing is queued; (events at the relay, events at the agent)."""
        at_relay, at_agent = [], []
        for _ in range(1000):
            at_agent += self.to_agent()
            at_relay += self.to_relay()
            if not self.relay._out and not self.agent._out:
                return at_relay, at_agent
        raise AssertionError("the sessions never went quiet")

    def open(self, port: int = 8080, host: str = "203.0.113.7", client_port: int = 50000) -> int:
        sid = self.relay.open_stream(port, host, client_port)
        assert self.to_agent() == [StreamOpened(sid, port, host, client_port)]
        self.agent.accept_stream(sid)
        assert self.to_relay() == [StreamAccepted(sid)]
        return sid

    def measure_rtt(self, session: Session, rtt: float) -> None:
        """Give `session` an RTT sample of exactly `rtt` via PING/ACK through the fake clock."""
        session.send_ping()
        self.clock.advance(rtt)
        if session is self.relay:
            assert self.to_agent() == []
            assert self.to_relay() == [PongReceived(rtt)]
        else:
            assert self.to_relay() == []  # the relay answers; no event there
            assert self.to_agent() == [PongReceived(rtt)]
        assert session.rtt == rtt


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i) % 251 for i in range(n))


def data_events(events: list, sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def received(events: list, sid: int) -> tuple[bytes, bool]:
    """(the data, whether FIN came last) of the DataReceived events of one stream; nothing else allowed."""
    assert all(isinstance(e, DataReceived) and e.stream_id == sid for e in events), events
    assert all(not e.fin for e in events[:-1]), events
    return data_events(events, sid), bool(events) and events[-1].fin


# --- open / accept ---------------------------------------------------------------------------


def test_open_gives_stream_opened_with_client_address():
    pair = Pair()
    sid = pair.relay.open_stream(8080, "203.0.113.7", 50123)
    assert sid == 1
    assert pair.relay.stream_count == 1
    assert pair.relay.last_stream_id == 1
    assert drain_frames(pair.relay) == [Open(1, 8080, "203.0.113.7", 50123)]


def test_open_ids_are_odd_and_increasing_and_ipv6_hosts_pass():
    pair = Pair()
    assert pair.open() == 1
    assert pair.open(443, "2001:db8::1", 65535) == 3
    sid = pair.relay.open_stream(22, "fe80::1%eth0", 1)
    assert sid == 5
    assert pair.to_agent() == [StreamOpened(5, 22, "fe80::1%eth0", 1)]
    assert pair.agent.stream_count == 3
    assert pair.agent.last_stream_id == 5


def test_accept_gives_stream_accepted_once():
    pair = Pair()
    sid = pair.relay.open_stream(8080, "h", 1)
    pair.to_agent()
    pair.agent.accept_stream(sid)
    assert drain_frames(pair.agent) == [OpenOk(sid)]
    with pytest.raises(ValueError, match="already accepted"):
        pair.agent.accept_stream(sid)
    assert pair.agent.data_to_send() == []


def test_agent_cannot_open():
    with pytest.raises(ValueError):
        Session(Role.AGENT, clock=FakeClock()).open_stream(80, "h", 1)


# --- data ------------------------------------------------------------------------------------


def test_data_both_ways_byte_exact():
    pair = Pair()
    sid = pair.open()
    assert pair.relay.send_data(sid, b"GET / HTTP/1.1\r\n\r\n") is True
    assert pair.to_agent() == [DataReceived(sid, b"GET / HTTP/1.1\r\n\r\n", False)]
    assert pair.agent.send_data(sid, b"HTTP/1.1 200 OK\r\n") is True
    assert pair.to_relay() == [DataReceived(sid, b"HTTP/1.1 200 OK\r\n", False)]
    assert pair.relay.send_credit(sid) == defaults.INITIAL_WINDOW - 18
    assert pair.agent.send_credit(sid) == defaults.INITIAL_WINDOW - 17


def test_optimistic_data_before_open_ok():
    pair = Pair()
    sid = pair.relay.open_stream(80, "h", 1)
    pair.relay.send_data(sid, b"hello")
    assert pair.to_agent() == [StreamOpened(sid, 80, "h", 1), DataReceived(sid, b"hello", False)]


def test_large_send_is_split_into_64k_frames():
    pair = Pair()
    sid = pair.open()
    blob = os.urandom(200 * KiB)
    assert pair.relay.send_data(sid, blob) is True
    sent = drain_frames(pair.relay)
    assert [len(f.payload) for f in sent] == [65536, 65536, 65536, 8192]
    assert all(f == Data(sid, f.payload, False) for f in sent)
    assert b"".join(f.payload for f in sent) == blob


def test_data_goes_out_as_header_and_view_without_a_copy():
    pair = Pair()
    sid = pair.open()
    pair.relay.data_to_send()
    blob = os.urandom(200 * KiB)
    pair.relay.send_data(sid, blob)
    out = pair.relay.data_to_send()
    headers, payloads = out[0::2], out[1::2]
    assert [len(h) for h in headers] == [HEADER_SIZE] * 4
    assert all(isinstance(p, memoryview) and p.obj is blob for p in payloads)
    assert b"".join(payloads) == blob
    small = b"x" * 100  # within one frame and the window: the object itself
    pair.relay.send_data(sid, small)
    assert pair.relay.data_to_send()[1] is small


def test_send_beyond_window_completes_as_the_receiver_consumes():
    pair = Pair()
    sid = pair.open()
    blob = os.urandom(1 * 1024 * KiB + 12345)
    assert pair.relay.send_data(sid, blob, fin=True) is False
    received = b""
    fin = False
    for _ in range(200):
        events = pair.to_agent()
        for e in events:
            assert isinstance(e, DataReceived)
            assert len(e.data) <= defaults.MAX_DATA_PAYLOAD
            received += e.data
            fin = fin or e.fin
            pair.agent.consumed(sid, len(e.data))
        pair.to_relay()
        if fin:
            break
    assert received == blob
    assert fin


def test_fin_from_relay_is_a_half_close():
    pair = Pair()
    sid = pair.open()
    assert pair.relay.send_data(sid, b"request", fin=True) is False
    assert received(pair.to_agent(), sid) == (b"request", True)
    with pytest.raises(ValueError, match="already sent FIN"):
        pair.relay.send_data(sid, b"more")
    # the other direction keeps working
    assert pair.agent.send_data(sid, b"response part 1") is True
    assert pair.agent.send_data(sid, b"response part 2") is True
    assert pair.to_relay() == [
        DataReceived(sid, b"response part 1", False),
        DataReceived(sid, b"response part 2", False),
    ]
    assert pair.relay.has_stream(sid) and pair.agent.has_stream(sid)
    assert pair.agent.send_data(sid, b"", fin=True) is False
    assert pair.agent.stream_count == 0  # sent and received FIN: forgotten
    assert pair.to_relay() == [DataReceived(sid, b"", True)]
    assert pair.relay.stream_count == 0
    assert not pair.relay.has_stream(sid)


def test_fin_from_agent_is_a_half_close():
    pair = Pair()
    sid = pair.open()
    pair.agent.send_data(sid, b"banner", fin=True)
    assert received(pair.to_relay(), sid) == (b"banner", True)
    assert pair.relay.send_data(sid, b"still talking") is True
    assert pair.to_agent() == [DataReceived(sid, b"still talking", False)]
    assert pair.relay.stream_count == 1
    pair.relay.send_data(sid, b"bye", fin=True)
    assert pair.relay.stream_count == 0
    assert received(pair.to_agent(), sid) == (b"bye", True)
    assert pair.agent.stream_count == 0


def test_frames_for_a_closed_stream_are_dropped():
    pair = Pair()
    sid = pair.open()
    pair.relay.send_data(sid, b"x", fin=True)
    pair.agent.send_data(sid, b"y", fin=True)
    pair.settle()
    assert pair.relay.stream_count == pair.agent.stream_count == 0
    # late WINDOW / RESET for a stream that once existed: silently ignored
    assert pair.relay.receive_data(encode(Window(sid, 100)) + encode(Reset(sid, 0))) == []
    assert pair.agent.receive_data(encode(Window(sid, 100)) + encode(Reset(sid, 0))) == []
    assert pair.relay.data_to_send() == [] and pair.agent.data_to_send() == []


# --- reset -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resetter", ["relay", "agent"])
def test_reset_both_ways_and_late_frames_dropped(resetter):
    pair = Pair()
    sid = pair.open()
    other_sid = pair.open()
    me = getattr(pair, resetter)
    peer = pair.agent if resetter == "relay" else pair.relay
    deliver_to_peer = pair.to_agent if resetter == "relay" else pair.to_relay
    deliver_to_me = pair.to_relay if resetter == "relay" else pair.to_agent

    peer.send_data(sid, b"in flight")  # crosses our RESET
    me.reset_stream(sid, ErrorCode.RESET_BY_PEER)
    assert not me.has_stream(sid)
    reset_bytes = b"".join(me.data_to_send())
    assert FrameDecoder().feed(reset_bytes) == [Reset(sid, ErrorCode.RESET_BY_PEER)]
    me.reset_stream(sid, ErrorCode.RESET_BY_PEER)
    assert me.data_to_send() == []  # resetting a gone stream sends nothing

    assert deliver_to_me() == []  # the crossing DATA is dropped silently
    assert peer.receive_data(reset_bytes) == [
        StreamReset(sid, ErrorCode.RESET_BY_PEER, by_peer=True)
    ]
    assert not peer.has_stream(sid)
    assert me.stream_count == peer.stream_count == 1
    # later frames for the stream, either way: silently dropped
    assert me.receive_data(encode_data(sid, b"late") + encode(Window(sid, 5))) == []
    assert peer.receive_data(encode_data(sid, b"late", fin=True) + encode(Reset(sid, 1))) == []
    me.consumed(sid, 10_000)
    assert me.data_to_send() == []
    # the other stream is untouched
    me.send_data(other_sid, b"ok")
    assert deliver_to_peer() == [DataReceived(other_sid, b"ok", False)]


def test_one_read_may_open_the_window_and_then_reset_the_stream():
    # Events describe the frames in order: the IO layer must expect a stream to vanish
    # later in the same batch (then send_credit()/send_data() on it raise KeyError).
    pair = Pair(**SMALL)
    sid = pair.open()
    pair.relay.send_data(sid, payload(512))
    pair.to_agent()
    pair.agent.consumed(sid, 512)
    pair.agent.reset_stream(sid, ErrorCode.RESET_BY_PEER)
    assert pair.to_relay() == [
        SendWindowOpened(sid),
        StreamReset(sid, ErrorCode.RESET_BY_PEER, True),
    ]
    assert not pair.relay.has_stream(sid)
    with pytest.raises(KeyError):
        pair.relay.send_credit(sid)


def test_agent_refuses_a_stream():
    pair = Pair()
    sid = pair.relay.open_stream(9999, "h", 1)
    pair.relay.send_data(sid, b"optimistic")
    assert pair.to_agent() == [
        StreamOpened(sid, 9999, "h", 1),
        DataReceived(sid, b"optimistic", False),
    ]
    pair.agent.reset_stream(sid, ErrorCode.NOT_ALLOWED)
    assert pair.to_relay() == [StreamReset(sid, ErrorCode.NOT_ALLOWED, True)]
    assert pair.relay.stream_count == pair.agent.stream_count == 0


# --- flow control ----------------------------------------------------------------------------


def test_sender_stops_at_the_initial_window():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.send_data(sid, payload(1000)) is True
    assert pair.relay.send_credit(sid) == 24
    assert pair.relay.send_data(sid, payload(24, 1000)) is False  # exactly used up
    assert pair.relay.send_credit(sid) == 0
    frames = drain_frames(pair.relay)
    assert [len(f.payload) for f in frames] == [256, 256, 256, 232, 24]
    assert pair.relay.send_data(sid, b"more") is False
    assert pair.relay.send_data(sid, b"and more") is False
    assert pair.relay.data_to_send() == []  # nothing framed beyond the window
    assert pair.relay.send_credit(sid) == -12  # 12 bytes pending


def test_receiver_credits_at_a_quarter_window():
    pair = Pair(**SMALL)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    assert data_events(pair.to_agent(), sid) == payload(1024)
    pair.agent.consumed(sid, 200)
    pair.agent.consumed(sid, 55)
    assert pair.agent.data_to_send() == []  # 255 < 1024 / 4
    pair.agent.consumed(sid, 1)
    assert drain_frames(pair.agent) == [Window(sid, 256)]
    pair.agent.consumed(sid, 300)
    assert drain_frames(pair.agent) == [Window(sid, 300)]
    pair.agent.consumed(sid, 100)
    assert pair.agent.data_to_send() == []
    assert pair.agent.recv_window(sid) == 1024


def test_pending_data_flushes_and_window_opened_only_when_all_out():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.send_data(sid, payload(1624)) is False  # 600 pending
    assert data_events(pair.to_agent(), sid) == payload(1024)
    pair.agent.consumed(sid, 256)
    assert pair.to_relay() == []  # 344 still pending: no event
    assert pair.relay.send_credit(sid) == -344
    assert data_events(pair.to_agent(), sid) == payload(256, 1024)
    pair.agent.consumed(sid, 256)
    assert pair.to_relay() == []  # 88 still pending
    assert data_events(pair.to_agent(), sid) == payload(256, 1280)
    pair.agent.consumed(sid, 512)
    assert pair.to_relay() == [SendWindowOpened(sid)]
    assert pair.relay.send_credit(sid) == 512 - 88
    assert data_events(pair.to_agent(), sid) == payload(88, 1536)


def test_data_sent_while_pending_queues_behind_it():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.send_data(sid, payload(1100)) is False
    assert pair.relay.send_data(sid, payload(50, 1100)) is False
    assert pair.relay.send_data(sid, b"") is False
    assert data_events(pair.to_agent(), sid) == payload(1024)
    assert pair.relay.send_credit(sid) == -126
    pair.agent.consumed(sid, 1024)
    assert pair.to_relay() == [SendWindowOpened(sid)]
    assert data_events(pair.to_agent(), sid) == payload(126, 1024)  # in order, nothing lost
    assert pair.relay.send_credit(sid) == 1024 - 126
    assert pair.relay.send_data(sid, b"next") is True
    assert pair.to_agent() == [DataReceived(sid, b"next", False)]


def test_window_opened_after_exact_exhaustion():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.send_data(sid, payload(1024)) is False
    pair.to_agent()
    pair.agent.consumed(sid, 256)
    assert pair.to_relay() == [SendWindowOpened(sid)]
    assert pair.relay.send_credit(sid) == 256


def test_no_window_opened_when_the_credit_is_used_up_again_by_pending():
    pair = Pair(**SMALL)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024 + 256))
    pair.to_agent()
    pair.agent.consumed(sid, 256)
    assert pair.to_relay() == []  # the 256 pending took all the new credit
    assert pair.relay.send_credit(sid) == 0
    assert [len(f.payload) for f in drain_frames(pair.relay)] == [256]


def test_pending_fin_goes_after_pending_data():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.send_data(sid, payload(1500), fin=True) is False
    frames = drain_frames(pair.relay)
    assert sum(len(f.payload) for f in frames) == 1024
    assert not any(f.fin for f in frames)  # the FIN waits behind the data
    with pytest.raises(ValueError, match="already sent FIN"):
        pair.relay.send_data(sid, b"x")
    pair.agent.receive_data(b"".join(encode(f) for f in frames))
    pair.agent.consumed(sid, 512)
    assert pair.to_relay() == []  # FIN went out, so no SendWindowOpened
    frames = drain_frames(pair.relay)
    assert [(len(f.payload), f.fin) for f in frames] == [(256, False), (220, False), (0, True)]
    assert pair.relay.send_credit(sid) == 512 - 476


def test_fin_with_empty_pending_needs_no_credit():
    pair = Pair(**SMALL)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    assert pair.relay.send_data(sid, b"", fin=True) is False
    assert drain_frames(pair.relay)[-1] == Data(sid, b"", True)


def test_peer_beyond_the_window_gets_flow_control_reset():
    pair = Pair(**SMALL)
    sid = pair.open()
    other = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    events = pair.agent.receive_data(encode_data(sid, b"!"))  # one byte too many, crafted
    assert events == [StreamReset(sid, ErrorCode.FLOW_CONTROL, by_peer=False)]
    assert drain_frames(pair.agent) == [Reset(sid, ErrorCode.FLOW_CONTROL)]
    assert not pair.agent.has_stream(sid)
    assert pair.agent.receive_data(encode_data(sid, b"more")) == []  # later ones dropped
    # the other stream is unaffected
    pair.relay.send_data(other, payload(1024))
    assert data_events(pair.to_agent(), other) == payload(1024)
    pair.agent.send_data(other, b"fine")
    assert pair.to_relay() == [DataReceived(other, b"fine", False)]


def test_flow_control_violation_in_one_big_frame():
    pair = Pair(**SMALL)
    sid = pair.open()
    events = pair.agent.receive_data(encode_data(sid, payload(1025), fin=True))
    assert events == [StreamReset(sid, ErrorCode.FLOW_CONTROL, by_peer=False)]
    pair.agent.reset_stream(sid, 0)
    assert drain_frames(pair.agent) == [Reset(sid, ErrorCode.FLOW_CONTROL)]
    assert pair.relay.receive_data(encode(Reset(sid, ErrorCode.FLOW_CONTROL))) == [
        StreamReset(sid, ErrorCode.FLOW_CONTROL, True)
    ]


def test_window_exactly_at_2_31_minus_1_is_fine_and_past_it_is_a_protocol_error():
    pair = Pair(**SMALL)
    sid = pair.open()
    assert pair.relay.receive_data(encode(Window(sid, 2**31 - 1 - 1024))) == [SendWindowOpened(sid)]
    assert pair.relay.send_credit(sid) == 2**31 - 1
    with pytest.raises(ProtocolError, match="2\\*\\*31-1"):
        pair.relay.receive_data(encode(Window(sid, 1)))


def test_huge_window_in_one_frame_is_a_protocol_error():
    pair = Pair()
    sid = pair.open()
    with pytest.raises(ProtocolError):
        pair.agent.receive_data(encode(Window(sid, 0xFFFFFFFF)))


def test_no_credit_after_fin_received():
    pair = Pair(**SMALL)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1000), fin=True)
    pair.to_agent()
    pair.agent.consumed(sid, 1000)
    assert pair.agent.data_to_send() == []


# --- window auto-tuning ----------------------------------------------------------------------

TUNE = {"initial_window": 1024, "max_window": 4096, "window_budget": 64 * KiB, "max_frame": 256}


def test_rtt_from_ping_with_fake_clock():
    pair = Pair()
    pair.measure_rtt(pair.agent, 0.125)
    pair.measure_rtt(pair.relay, 0.5)
    assert pair.agent.rtt == 0.125


def test_fast_consumption_doubles_the_window_up_to_max():
    pair = Pair(**TUNE)
    pair.measure_rtt(pair.agent, 0.125)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    pair.clock.advance(0.2)  # < 2 * rtt since the stream opened
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 256 + 1024)]
    assert pair.agent.recv_window(sid) == 2048
    assert pair.agent.window_grown == 1024
    pair.clock.advance(0.2)  # < 2 * rtt since the last WINDOW
    pair.agent.consumed(sid, 511)
    assert pair.agent.data_to_send() == []  # the threshold grew with the window
    pair.agent.consumed(sid, 1)
    assert drain_frames(pair.agent) == [Window(sid, 512 + 2048)]
    assert pair.agent.recv_window(sid) == 4096
    assert pair.agent.window_grown == 3072
    # the sender really may have the grown window in flight now
    pair.relay.receive_data(encode(Window(sid, 1280)) + encode(Window(sid, 2560)))
    assert pair.relay.send_credit(sid) == 1024 - 1024 + 1280 + 2560
    pair.relay.send_data(sid, payload(3840))
    assert len(data_events(pair.to_agent(), sid)) == 3840  # no FLOW_CONTROL reset
    pair.clock.advance(0.2)
    pair.agent.consumed(sid, 1024)
    assert drain_frames(pair.agent) == [Window(sid, 1024)]  # at max_window: no more growth
    assert pair.agent.recv_window(sid) == 4096
    assert pair.agent.window_grown == 3072


def test_slow_consumption_does_not_grow():
    pair = Pair(**TUNE)
    pair.measure_rtt(pair.agent, 0.125)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    pair.clock.advance(0.25)  # not < 2 * rtt
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 256)]
    pair.clock.advance(0.3)
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 256)]
    assert pair.agent.recv_window(sid) == 1024
    assert pair.agent.window_grown == 0


def test_growth_is_judged_by_the_smallest_rtt_not_a_queued_one():
    """A PING that waited behind a full tunnel says little about the path: judged by it, the
    queue would grow the windows that grow the queue (bufferbloat)."""
    pair = Pair(**TUNE)
    pair.measure_rtt(pair.agent, 0.125)
    pair.measure_rtt(pair.agent, 2.0)  # the tunnel is loaded now
    assert (pair.agent.rtt, pair.agent.min_rtt) == (2.0, 0.125)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    pair.clock.advance(0.3)  # < 2 x the latest RTT, but not < 2 x the path's
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 256)]
    assert pair.agent.recv_window(sid) == 1024


def _grow_fast(pair: Pair, sid: int, rounds: int = 40) -> int:
    """Consume a quarter window at a time, each within the round trip: as fast as it gets."""
    for _ in range(rounds):
        pair.clock.advance(pair.agent.min_rtt / 2)
        pair.agent.consumed(sid, pair.agent.recv_window(sid) // 4)
        pair.agent.data_to_send()
    return pair.agent.recv_window(sid)


@pytest.mark.parametrize(
    "min_rtt, window",
    [
        # round trips exact in binary, so the fake clock measures them exactly
        (2**-13, 2 * MiB),  # loopback (0.12 ms): the short-path window, not max_window
        (2**-9, 2 * MiB),  # a LAN (2 ms): 1 GB/s x 1.95 ms is still below it
        (2**-7, 7_812_500),  # 7.8 ms: 1 GB/s x 7.8 ms
        (2**-5, 16 * MiB),  # a long path (31 ms) earns max_window
    ],
)
def test_window_growth_is_capped_by_what_the_path_round_trip_needs(min_rtt, window):
    pair = Pair()  # the real defaults: 256 KiB growing up to 16 MiB
    pair.measure_rtt(pair.agent, min_rtt)
    sid = pair.open()
    assert _grow_fast(pair, sid) == window == pair.agent.window_cap
    assert defaults.SHORT_PATH_WINDOW == 2 * MiB and defaults.MAX_WINDOW == 16 * MiB


def test_a_configured_max_window_below_the_short_path_window_still_caps():
    pair = Pair(max_window=1 * MiB)
    pair.measure_rtt(pair.agent, 2**-13)
    sid = pair.open()
    assert _grow_fast(pair, sid) == 1 * MiB


def test_no_growth_without_an_rtt_sample():
    pair = Pair(**TUNE)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    assert pair.agent.rtt is None
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 256)]
    assert pair.agent.recv_window(sid) == 1024


def test_growth_stops_at_the_tunnel_budget_and_returns_when_streams_close():
    pair = Pair(**{**TUNE, "window_budget": 2560})
    pair.measure_rtt(pair.agent, 0.125)
    a = pair.open()
    b = pair.open()
    pair.relay.send_data(a, payload(1024))
    pair.relay.send_data(b, payload(1024))
    pair.to_agent()
    pair.clock.advance(0.1)
    pair.agent.consumed(a, 256)
    pair.agent.consumed(b, 256)
    assert forward(pair.agent, pair.relay) == [Window(a, 256 + 1024), Window(b, 256 + 1024)]
    assert pair.agent.window_grown == 2048
    # a wants to double 2048 -> 4096, but only 512 of the budget is left
    pair.agent.consumed(a, 512)
    assert forward(pair.agent, pair.relay) == [Window(a, 512 + 512)]
    assert pair.agent.recv_window(a) == 2560
    assert pair.agent.window_grown == 2560
    pair.agent.consumed(b, 512)
    assert forward(pair.agent, pair.relay) == [Window(b, 512)]  # budget exhausted
    assert pair.agent.recv_window(b) == 2048
    assert pair.agent.window_grown == 2560
    # closing a stream gives its growth back to the others
    pair.relay.reset_stream(a, ErrorCode.NORMAL)
    assert pair.to_agent() == [StreamReset(a, ErrorCode.NORMAL, True)]
    assert pair.agent.window_grown == 1024
    pair.relay.send_data(b, payload(512))
    pair.to_agent()
    pair.agent.consumed(b, 512)
    assert forward(pair.agent, pair.relay) == [Window(b, 512 + 1536)]
    assert pair.agent.recv_window(b) == 3584
    assert pair.agent.window_grown == 2560
    pair.relay.send_data(b, b"", fin=True)
    pair.agent.send_data(b, b"", fin=True)
    pair.settle()
    assert pair.agent.stream_count == pair.relay.stream_count == 0
    assert pair.agent.window_grown == 0


def test_flow_control_reset_returns_the_budget():
    pair = Pair(**TUNE)
    pair.measure_rtt(pair.agent, 0.125)
    sid = pair.open()
    pair.relay.send_data(sid, payload(1024))
    pair.to_agent()
    pair.agent.consumed(sid, 256)
    assert drain_frames(pair.agent) == [Window(sid, 1280)]
    assert pair.agent.window_grown == 1024
    events = pair.agent.receive_data(encode_data(sid, payload(1281)))  # allowed: 1280
    assert events == [StreamReset(sid, ErrorCode.FLOW_CONTROL, by_peer=False)]
    assert pair.agent.window_grown == 0


# --- limits / going away -----------------------------------------------------------------------


def test_relay_max_streams():
    pair = Pair(max_streams=2)
    a = pair.open()
    pair.open()
    with pytest.raises(StreamLimitError):
        pair.relay.open_stream(80, "h", 1)
    assert pair.relay.data_to_send() == []
    pair.relay.reset_stream(a, 0)
    assert pair.relay.open_stream(80, "h", 1) == 5


def test_agent_max_streams_refuses_without_event():
    pair = Pair()
    pair.agent = Session(Role.AGENT, clock=pair.clock, max_streams=1)
    pair.relay.open_stream(80, "a", 1)
    pair.relay.open_stream(80, "b", 2)
    pair.relay.send_data(3, b"optimistic")
    assert pair.to_agent() == [StreamOpened(1, 80, "a", 1)]
    assert drain_frames(pair.agent) == [Reset(3, ErrorCode.REFUSED)]
    assert pair.agent.stream_count == 1
    assert pair.relay.receive_data(encode(Reset(3, ErrorCode.REFUSED))) == [
        StreamReset(3, ErrorCode.REFUSED, True)
    ]
    assert pair.relay.stream_count == 1


def test_relay_cannot_open_after_its_go_away():
    pair = Pair()
    sid = pair.open()
    pair.relay.go_away(ErrorCode.SHUTDOWN, "stopping")
    assert pair.relay.going_away
    with pytest.raises(StreamLimitError, match="going away"):
        pair.relay.open_stream(80, "h", 1)
    assert pair.to_agent() == [GoAwayReceived(ErrorCode.SHUTDOWN, sid, "stopping")]
    # existing streams may finish
    pair.relay.send_data(sid, b"drain", fin=True)
    assert received(pair.to_agent(), sid) == (b"drain", True)


def test_relay_cannot_open_after_the_agents_go_away():
    pair = Pair()
    pair.agent.go_away(ErrorCode.NORMAL, "")
    assert pair.to_relay() == [GoAwayReceived(ErrorCode.NORMAL, 0, "")]
    assert pair.relay.peer_going_away
    with pytest.raises(StreamLimitError):
        pair.relay.open_stream(80, "h", 1)


def test_agent_refuses_opens_after_its_go_away():
    pair = Pair()
    first = pair.open()
    pair.agent.go_away(ErrorCode.REPLACED, "newer tunnel")
    assert drain_frames(pair.agent) == [GoAway(ErrorCode.REPLACED, first, "newer tunnel")]
    sid = pair.relay.open_stream(80, "h", 1)  # crossed the GOAWAY
    assert pair.to_agent() == []
    assert drain_frames(pair.agent) == [Reset(sid, ErrorCode.REFUSED)]
    assert pair.agent.last_stream_id == sid
    assert not pair.agent.has_stream(sid)
    assert pair.agent.receive_data(encode_data(sid, b"late")) == []  # refused stream: dropped


def test_stream_ids_exhausted():
    pair = Pair()
    pair.relay._last_stream_id = MAX_STREAM_ID  # reaching it for real takes 2**30 opens
    with pytest.raises(StreamLimitError, match="exhausted"):
        pair.relay.open_stream(80, "h", 1)


# --- protocol errors ---------------------------------------------------------------------------


def test_agent_sending_open_is_a_protocol_error():
    pair = Pair()
    with pytest.raises(ProtocolError, match="only the relay opens"):
        pair.relay.receive_data(encode(Open(1, 80, "h", 1)))


def test_relay_sending_open_ok_is_a_protocol_error():
    pair = Pair()
    pair.relay.open_stream(80, "h", 1)
    pair.to_agent()
    with pytest.raises(ProtocolError, match="relay sent OPEN_OK"):
        pair.agent.receive_data(encode(OpenOk(1)))


@pytest.mark.parametrize(
    "ids", [[2], [3, 1], [3, 3], [1, 4], [5, 5], [1, 3, 2]], ids=lambda ids: "-".join(map(str, ids))
)
def test_open_ids_out_of_sequence_or_even(ids):
    agent = Session(Role.AGENT, clock=FakeClock())
    *good, bad = ids
    for sid in good:
        assert agent.receive_data(encode(Open(sid, 80, "h", 1))) == [StreamOpened(sid, 80, "h", 1)]
    with pytest.raises(ProtocolError, match=f"OPEN for stream {bad} is out of sequence"):
        agent.receive_data(encode(Open(bad, 80, "h", 1)))


def test_open_may_skip_ids():
    agent = Session(Role.AGENT, clock=FakeClock())
    assert agent.receive_data(encode(Open(7, 80, "h", 1))) == [StreamOpened(7, 80, "h", 1)]


@pytest.mark.parametrize(
    "frame",
    [Data(1, b"x"), Data(1, b"", True), Window(1, 1), Reset(1, 0), OpenOk(1)],
    ids=lambda f: type(f).__name__,
)
def test_frames_for_a_never_opened_stream(frame):
    relay = Session(Role.RELAY, clock=FakeClock())
    with pytest.raises(ProtocolError, match="never opened"):
        relay.receive_data(encode(frame))
    agent = Session(Role.AGENT, clock=FakeClock())
    if isinstance(frame, OpenOk):
        return
    with pytest.raises(ProtocolError, match="never opened"):
        agent.receive_data(encode(frame))


def test_data_for_a_stream_beyond_the_last_opened():
    pair = Pair()
    pair.open()
    pair.open()
    with pytest.raises(ProtocolError, match="stream 5, which was never opened"):
        pair.relay.receive_data(encode_data(5, b"x"))
    with pytest.raises(ProtocolError, match="stream 7, which was never opened"):
        pair.agent.receive_data(encode_data(7, b"x"))


@pytest.mark.parametrize(
    "frame", [Data(2, b"x"), Window(2, 1), Reset(2, 0)], ids=lambda f: type(f).__name__
)
def test_frames_for_an_even_stream_id_are_a_protocol_error(frame):
    # The relay opens odd ids only: an even id below the last one was never opened either.
    pair = Pair()
    pair.open()
    pair.open()
    with pytest.raises(ProtocolError, match="stream 2, which was never opened"):
        pair.relay.receive_data(encode(frame))
    with pytest.raises(ProtocolError, match="stream 2, which was never opened"):
        pair.agent.receive_data(encode(frame))


def test_data_after_fin_is_a_protocol_error():
    pair = Pair()
    sid = pair.open()
    pair.relay.send_data(sid, b"x", fin=True)
    pair.to_agent()
    assert pair.agent.has_stream(sid)  # half-closed: the agent has not sent FIN yet
    with pytest.raises(ProtocolError, match=f"DATA on stream {sid} after its FIN"):
        pair.agent.receive_data(encode_data(sid, b"more"))


def test_second_fin_is_a_protocol_error():
    pair = Pair()
    sid = pair.open()
    pair.agent.send_data(sid, b"", fin=True)
    pair.to_relay()
    with pytest.raises(ProtocolError, match="after its FIN"):
        pair.relay.receive_data(encode_data(sid, b"", fin=True))


def test_second_open_ok_is_a_protocol_error():
    pair = Pair()
    sid = pair.open()
    with pytest.raises(ProtocolError, match=f"second OPEN_OK for stream {sid}"):
        pair.relay.receive_data(encode(OpenOk(sid)))


def test_malformed_bytes_are_a_protocol_error():
    pair = Pair()
    with pytest.raises(ProtocolError, match="version"):
        pair.agent.receive_data(b"\x02" + bytes(11))


def test_duplicate_open_in_one_read():
    pair = Pair()
    with pytest.raises(ProtocolError):
        pair.agent.receive_data(encode(Open(1, 80, "h", 1)) + encode(Open(1, 80, "h", 1)))


# --- ping ------------------------------------------------------------------------------------


def test_ping_is_answered_with_the_same_opaque():
    agent = Session(Role.AGENT, clock=FakeClock())
    assert agent.receive_data(encode(Ping(0xDEADBEEFCAFE))) == []
    assert drain_frames(agent) == [Ping(0xDEADBEEFCAFE, ack=True)]
    assert agent.rtt is None


def test_send_ping_and_ack_give_the_rtt():
    clock = FakeClock()
    relay = Session(Role.RELAY, clock=clock)
    relay.send_ping()
    (ping,) = drain_frames(relay)
    assert ping.ack is False
    clock.advance(0.375)
    assert relay.receive_data(encode(Ping(ping.opaque, ack=True))) == [PongReceived(0.375)]
    assert relay.rtt == 0.375
    # the same ack again is unknown now
    assert relay.receive_data(encode(Ping(ping.opaque, ack=True))) == []
    assert relay.data_to_send() == []  # acks are not answered


def test_unknown_ack_is_ignored():
    relay = Session(Role.RELAY, clock=FakeClock())
    relay.send_ping()
    (ping,) = drain_frames(relay)
    assert relay.receive_data(encode(Ping(ping.opaque + 1000, ack=True))) == []
    assert relay.rtt is None


def test_clock_going_backwards_gives_zero_rtt():
    clock = FakeClock()
    relay = Session(Role.RELAY, clock=clock)
    relay.send_ping()
    (ping,) = drain_frames(relay)
    clock.advance(-5)
    assert relay.receive_data(encode(Ping(ping.opaque, ack=True))) == [PongReceived(0.0)]


def test_only_eight_outstanding_pings_are_remembered():
    clock = FakeClock()
    relay = Session(Role.RELAY, clock=clock)
    for _ in range(9):
        relay.send_ping()
        clock.advance(1.0)
    pings = drain_frames(relay)
    assert len(pings) == 9
    assert len({p.opaque for p in pings}) == 9
    events = relay.receive_data(b"".join(encode(Ping(p.opaque, ack=True)) for p in pings))
    # the oldest was forgotten; the others answer with their own age
    assert events == [PongReceived(float(9 - i)) for i in range(1, 9)]


# --- goaway / control --------------------------------------------------------------------------


def test_goaway_received():
    pair = Pair()
    pair.open()
    pair.open()
    pair.relay.go_away(ErrorCode.SHUTDOWN, "relay stopping")
    assert not pair.agent.peer_going_away
    assert pair.to_agent() == [GoAwayReceived(ErrorCode.SHUTDOWN, 3, "relay stopping")]
    assert pair.agent.peer_going_away
    assert not pair.agent.going_away


def test_control_both_ways():
    pair = Pair()
    pair.agent.send_control({"type": "hello", "version": 1, "token": "t"})
    assert pair.to_relay() == [ControlReceived({"type": "hello", "version": 1, "token": "t"})]
    pair.relay.send_control({"type": "listen_ok", "ports": [8080]})
    assert pair.to_agent() == [ControlReceived({"type": "listen_ok", "ports": [8080]})]
    assert drain_frames(pair.relay) == []
    pair.relay.send_control({"type": "x"})
    assert drain_frames(pair.relay) == [Control({"type": "x"})]


def test_byte_by_byte_delivery_gives_the_same_events():
    pair = Pair(**SMALL)
    sid = pair.relay.open_stream(80, "h", 1)
    pair.relay.send_data(sid, payload(700), fin=True)
    pair.relay.send_ping()
    blob = b"".join(pair.relay.data_to_send())
    events = []
    for i in range(len(blob)):
        events += pair.agent.receive_data(blob[i : i + 1])
    assert events[0] == StreamOpened(sid, 80, "h", 1)
    assert data_events(events, sid) == payload(700)
    assert [e.fin for e in events if isinstance(e, DataReceived)][-1] is True
    assert drain_frames(pair.agent)[-1].ack is True


# --- randomized interleavings ------------------------------------------------------------------

RAND = {
    "initial_window": 512,
    "max_window": 4096,
    "window_budget": 5000,
    "max_frame": 128,
    "max_streams": 64,
}
SIDES = ("relay", "agent")


class Model:
    """What the two applications know about one stream."""

    def __init__(self) -> None:
        self.sent = {s: bytearray() for s in SIDES}  # handed to send_data by that side
        self.received = {s: bytearray() for s in SIDES}  # DataReceived at that side
        self.unconsumed = {s: 0 for s in SIDES}
        self.fin_sent = {s: False for s in SIDES}
        self.fin_received = {s: False for s in SIDES}
        self.dead = {s: False for s in SIDES}  # this side reset it or saw StreamReset
        self.reset = False
        self.opened_at_agent = False
        self.accepted = False
        self.credit = {s: RAND["initial_window"] for s in SIDES}  # what that side allowed the peer

    def usable(self, side: str) -> bool:
        if self.dead[side] or (self.fin_sent[side] and self.fin_received[side]):
            return False
        return side == "relay" or self.accepted


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.sessions = {s: Session(Role(s), clock=self.clock, **RAND) for s in SIDES}
        self.wire = {s: bytearray() for s in SIDES}  # bytes sent by that side, undelivered
        self.snoop = {s: FrameDecoder() for s in SIDES}
        self.streams: dict[int, Model] = {}

    @staticmethod
    def other(side: str) -> str:
        return "agent" if side == "relay" else "relay"

    def collect(self, side: str) -> None:
        """Move what the session queued onto the wire, checking it on the way."""
        blob = b"".join(self.sessions[side].data_to_send())
        self.wire[side] += blob
        for frame in self.snoop[side].feed(blob):
            if isinstance(frame, Window):
                self.streams[frame.stream_id].credit[side] += frame.increment
            elif isinstance(frame, Data):
                assert len(frame.payload) <= RAND["max_frame"]

    def deliver(self, side: str, count: int, chunk: int) -> None:
        """Deliver `count` bytes of what `side` sent to the other side, in `chunk`-sized reads."""
        self.collect(side)
        blob = bytes(self.wire[side][:count])
        del self.wire[side][:count]
        to = self.other(side)
        for start in range(0, len(blob), chunk):
            for event in self.sessions[to].receive_data(blob[start : start + chunk]):
                self.on_event(to, event)
        self.collect(to)

    def on_event(self, side: str, event) -> None:
        session = self.sessions[side]
        if isinstance(event, StreamOpened):
            assert side == "agent"
            assert (event.port, event.client_host, event.client_port) == (
                8000 + event.stream_id,
                "::1",
                event.stream_id,
            )
            self.streams[event.stream_id].opened_at_agent = True
        elif isinstance(event, StreamAccepted):
            assert side == "relay"
            assert self.streams[event.stream_id].accepted
        elif isinstance(event, DataReceived):
            model = self.streams[event.stream_id]
            assert not model.dead[side] and not model.fin_received[side]
            got = model.received[side]
            got += event.data
            model.unconsumed[side] += len(event.data)
            # exactly once, in order: always a prefix of what the peer sent
            assert bytes(got) == bytes(model.sent[self.other(side)][: len(got)])
            # never more in flight than this side allowed
            assert len(got) <= model.credit[side]
            if session.has_stream(event.stream_id):
                assert model.unconsumed[side] <= session.recv_window(event.stream_id)
            if event.fin:
                assert model.fin_sent[self.other(side)]
                assert bytes(got) == bytes(model.sent[self.other(side)])
                model.fin_received[side] = True
        elif isinstance(event, StreamReset):
            model = self.streams[event.stream_id]
            assert event.by_peer, "the session reset a stream for a flow-control breach"
            assert model.reset
            assert not model.dead[side]
            model.dead[side] = True
            model.unconsumed[side] = 0
        elif isinstance(event, SendWindowOpened):
            # (a RESET later in the same read may already have removed the stream)
            if session.has_stream(event.stream_id):
                assert session.send_credit(event.stream_id) > 0
        else:
            assert isinstance(event, PongReceived)

    def check(self) -> None:
        for side, session in self.sessions.items():
            grown = 0
            for sid, model in self.streams.items():
                if session.has_stream(sid):
                    window = session.recv_window(sid)
                    assert RAND["initial_window"] <= window <= RAND["max_window"]
                    grown += window - RAND["initial_window"]
                    assert len(model.received[side]) <= model.credit[side]
            assert session.window_grown == grown <= RAND["window_budget"]

    def finish(self) -> None:
        """Everyone consumes everything and closes; then every non-reset stream must be complete."""
        for _ in range(500):
            for side in SIDES:
                for sid, model in self.streams.items():
                    if (
                        side == "agent"
                        and model.opened_at_agent
                        and not model.accepted
                        and not model.dead[side]
                    ):
                        self.sessions[side].accept_stream(sid)
                        model.accepted = True
                    if model.unconsumed[side]:
                        self.sessions[side].consumed(sid, model.unconsumed[side])
                        model.unconsumed[side] = 0
                    if model.usable(side) and not model.fin_sent[side]:
                        self.sessions[side].send_data(sid, b"", fin=True)
                        model.fin_sent[side] = True
                self.collect(side)
            if not self.wire["relay"] and not self.wire["agent"]:
                break
            for side in SIDES:
                self.deliver(side, len(self.wire[side]), 4096)
        else:
            raise AssertionError("never settled")
        for sid, model in self.streams.items():
            if not model.reset:
                for side in SIDES:
                    assert model.received[side] == model.sent[self.other(side)], sid
                    assert model.fin_received[side]
        for session in self.sessions.values():
            assert session.stream_count == 0
            assert session.window_grown == 0
        self.check()


# Weighted by repetition.
OPS = ["open", "accept", "send", "send", "send", "consume", "consume", "fin", "reset"]
OPS += ["deliver", "deliver", "deliver", "tick", "ping"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_interleavings(data):
    h = Harness()
    relay, agent = h.sessions["relay"], h.sessions["agent"]
    h.sessions["agent"].send_ping()  # an rtt so that windows may grow
    h.clock.advance(0.5)
    h.deliver("agent", 10**6, 10**6)
    h.deliver("relay", 10**6, 10**6)
    assert agent.rtt == 0.5

    def pick(predicate):
        choices = [sid for sid, m in h.streams.items() if predicate(sid, m)]
        return data.draw(st.sampled_from(choices)) if choices else None

    steps = data.draw(st.integers(1, 80))
    for _ in range(steps):
        op = data.draw(st.sampled_from(OPS))
        if op == "open" and len(h.streams) < 8:
            expected = relay.last_stream_id + 2 if relay.last_stream_id else 1
            assert relay.open_stream(8000 + expected, "::1", expected) == expected
            h.streams[expected] = Model()
        elif op == "accept":
            sid = pick(lambda sid, m: m.opened_at_agent and not m.accepted and not m.dead["agent"])
            if sid is not None:
                h.streams[sid].accepted = True
                if data.draw(st.integers(0, 4)):
                    agent.accept_stream(sid)
                else:  # refused: the target is unreachable
                    agent.reset_stream(sid, ErrorCode.CONNECT_FAILED)
                    h.streams[sid].reset = True
                    h.streams[sid].dead["agent"] = True
        elif op == "send":
            side = data.draw(st.sampled_from(SIDES))
            sid = pick(lambda sid, m, side=side: m.usable(side) and not m.fin_sent[side])
            if sid is not None:
                model = h.streams[sid]
                n = data.draw(
                    st.one_of(st.integers(0, 1500), st.sampled_from([128, 512, 513, 3000]))
                )
                fin = data.draw(st.integers(0, 5)) == 0
                # the pattern depends on the offset, so loss, reordering or duplication shows
                chunk = payload(n, len(model.sent[side]) + sid)
                h.sessions[side].send_data(sid, chunk, fin)
                model.sent[side] += chunk
                model.fin_sent[side] = fin
        elif op == "consume":
            side = data.draw(st.sampled_from(SIDES))
            sid = pick(lambda sid, m, side=side: m.unconsumed[side] > 0)
            if sid is not None:
                model = h.streams[sid]
                n = data.draw(
                    st.one_of(
                        st.integers(1, model.unconsumed[side]), st.just(model.unconsumed[side])
                    )
                )
                h.sessions[side].consumed(sid, n)
                model.unconsumed[side] -= n
        elif op == "fin":
            side = data.draw(st.sampled_from(SIDES))
            sid = pick(lambda sid, m, side=side: m.usable(side) and not m.fin_sent[side])
            if sid is not None:
                h.sessions[side].send_data(sid, b"", fin=True)
                h.streams[sid].fin_sent[side] = True
        elif op == "reset":
            side = data.draw(st.sampled_from(SIDES))
            sid = pick(
                lambda sid, m, side=side: not m.dead[side] and h.sessions[side].has_stream(sid)
            )
            if sid is not None:
                h.sessions[side].reset_stream(sid, ErrorCode.RESET_BY_PEER)
                h.streams[sid].reset = True
                h.streams[sid].dead[side] = True
                h.streams[sid].unconsumed[side] = 0
        elif op == "deliver":
            side = data.draw(st.sampled_from(SIDES))
            h.collect(side)
            count = data.draw(
                st.one_of(st.integers(0, len(h.wire[side])), st.just(len(h.wire[side])))
            )
            h.deliver(side, count, data.draw(st.integers(1, 400)))
        elif op == "tick":
            h.clock.advance(data.draw(st.sampled_from([0.0, 0.1, 0.3, 2.0])))
        elif op == "ping":
            h.sessions[data.draw(st.sampled_from(SIDES))].send_ping()
        h.collect("relay")
        h.collect("agent")
        h.check()
    h.finish()


def test_harness_detects_lost_bytes():
    # The randomized test's harness must be able to fail: corrupt a delivery and see it.
    h = Harness()
    sid = h.sessions["relay"].open_stream(8001, "::1", 1)
    h.streams[sid] = Model()
    h.sessions["relay"].send_data(sid, payload(10, sid))
    h.streams[sid].sent["relay"] += payload(10, sid + 1)  # the model expects other bytes
    with pytest.raises(AssertionError):
        h.deliver("relay", 10**6, 7)


def test_opens_the_agent_never_answers_expire_with_timeout():
    pair = Pair()
    answered = pair.open()
    waiting = pair.relay.open_stream(8080, "203.0.113.7", 50001)
    assert pair.to_agent() == [StreamOpened(waiting, 8080, "203.0.113.7", 50001)]
    pair.clock.advance(29.9)
    assert pair.relay.expire_opens(30.0) == []
    pair.clock.advance(0.1)
    assert pair.relay.expire_opens(30.0) == [waiting]
    assert not pair.relay.has_stream(waiting)
    assert pair.relay.has_stream(answered)  # accepted streams never expire, however old
    assert pair.to_agent() == [StreamReset(waiting, ErrorCode.TIMEOUT)]
    assert pair.relay.expire_opens(30.0) == []
