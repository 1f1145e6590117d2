"""ThrottledLog: one line per key per interval, and a full key table never lifts every limit."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from relay import logs
from relay.logs import ThrottledLog


def throttled():
    lines: list[str] = []
    log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    clock = Clock()
    return ThrottledLog(log, clock.seconds), clock, lines


def test_one_line_per_key_per_interval_with_the_count_held_back():
    t, clock, lines = throttled()
    for _ in range(5):
        t.warn("k", "refused {n}", n=1)
    assert lines == ["refused 1"]
    clock.advance(10)
    t.warn("k", "refused {n}", n=2)
    assert lines[-1] == "refused 2 (4 more like this in the last 10 s)"


def test_a_full_table_forgets_expired_keys_not_the_live_ones():
    t, clock, lines = throttled()
    t.warn("flooded", "flood")
    clock.advance(10)
    for i in range(logs.MAX_KEYS - 1):
        t.warn(f"other:{i}", "other")  # the table is full now; "flooded" expired
    clock.advance(1)
    t.warn("one-more", "one more")  # makes room by dropping "flooded" only
    before = len(lines)
    t.warn("other:0", "other")  # still within its interval: held back
    assert len(lines) == before


def test_a_full_table_of_live_keys_drops_the_oldest_only():
    t, clock, lines = throttled()
    for i in range(logs.MAX_KEYS):
        t.warn(f"k:{i}", "line")
    t.warn("new", "line")
    before = len(lines)
    for i in range(1, logs.MAX_KEYS):
        t.warn(f"k:{i}", "line")
    assert len(lines) == before  # only k:0 was forgotten; all the others stay limited


def test_reset_codes_a_peer_makes_up_share_one_limit(state, logs):
    """The agent chooses a RESET's code: made-up codes must not each get a log line."""
    from relay.protocol import ErrorCode

    from .inmemory import World, stream, up

    world = World(state)
    agent = up(world, state)
    client, client_sock, target, target_sock = stream(world, agent)
    for code in range(1000, 1100):
        agent.relay_tunnel.stream_was_reset(client, code, by_peer=True)
    agent.relay_tunnel.stream_was_reset(client, ErrorCode.CONNECT_FAILED, by_peer=True)
    refused = [line for line in logs if "refused: " in line]
    assert len(refused) == 2, refused  # one for all the made-up codes, one for CONNECT_FAILED
    assert "CONNECT_FAILED" in refused[1]


def test_a_group_logs_at_most_group_lines_per_interval_whatever_its_keys():
    t, clock, lines = throttled()
    for i in range(logs.GROUP_LINES + 5):
        t.warn(f"auth:192.0.2.{i}", "failed from {n}", group="auth", n=i)
    assert lines == [f"failed from {i}" for i in range(logs.GROUP_LINES)]
    t.warn("other", "another kind")  # a key outside the group is not held back by it
    t.warn("tls:192.0.2.1", "tls failed", group="tls")  # nor one of another group
    assert lines[-2:] == ["another kind", "tls failed"]
    clock.advance(10)
    t.warn("auth:198.51.100.7", "failed from {n}", group="auth", n=7)
    assert lines[-1] == "failed from 7 (5 more of this kind were not logged)"


def test_a_key_within_its_interval_does_not_use_up_its_groups_lines():
    t, clock, lines = throttled()
    for _ in range(50):
        t.warn("auth:192.0.2.1", "failed", group="auth")
    for i in range(logs.GROUP_LINES - 1):
        t.warn(f"auth:198.51.100.{i}", "failed", group="auth")
    assert len(lines) == logs.GROUP_LINES  # the 49 held-back repeats took none of the ten
    t.warn("auth:203.0.113.1", "failed", group="auth")
    assert len(lines) == logs.GROUP_LINES  # and the ten are used up now
