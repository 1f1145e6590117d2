"""Who may listen where: bad tokens, ports an agent is not allowed, ports another agent holds,
and the same agent connecting twice. One relay serves the module; every test starts its own
agents and targets (function-scoped `harness`) and stops them when it ends."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from .conftest import (
    HOST,
    connect,
    echo_roundtrip,
    free_ports,
    port_accepts,
    read_line,
    tag_echo_handler,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def relay(module_harness):
    state = module_harness.state()
    proc = module_harness.relay(state)
    return SimpleNamespace(proc=proc, state=state)


def tag_of(port: int) -> bytes | None:
    """The tag the target behind PORT greets with, after checking it echoes; None if refused."""
    try:
        with connect(port, timeout=5) as s:
            tag = read_line(s)
            assert echo_roundtrip(s, b"x" * 1000) == b"x" * 1000
            return tag
    except (ConnectionRefusedError, ConnectionResetError, EOFError):
        return None


def test_wrong_token_is_rejected_and_others_carry_on(relay, harness):
    good_target = harness.server(tag_echo_handler(b"good"))
    bad_target = harness.server(tag_echo_handler(b"bad"))
    good_port, bad_port = free_ports(2)
    good = harness.agent(relay.proc, relay.state.token("good"), {good_port: good_target.port}, ca=relay.state.ca)
    good.wait_listening()

    relay.state.token("victim")  # a real agent name, so only the secret is wrong
    bad_token = harness.root / "bad.token"
    bad_token.write_text("victim." + "A" * 43 + "\n")
    bad_token.chmod(0o600)
    mark = relay.proc.mark()
    bad = harness.agent(relay.proc, bad_token, {bad_port: bad_target.port}, ca=relay.state.ca)

    bad.wait_for_log(r"relay rejected this agent's token.*authentication failed")
    relay.proc.wait_for_log(r"authentication failed", after=mark)
    bad.assert_not_logged(r"tunnel to the relay is up")
    relay.proc.assert_not_logged(rf"public port {bad_port}\b", after=mark)
    relay.proc.assert_not_logged(r"agent victim connected", after=mark)
    assert not port_accepts(bad_port), "the relay listens for an agent that failed to authenticate"
    assert "A" * 43 not in relay.proc.log() + bad.log(), "a token secret was logged"

    # The relay still serves the good agent, before and after the bad one gave up.
    assert tag_of(good_port) == b"good"
    bad.stop()
    assert tag_of(good_port) == b"good"
    assert relay.proc.alive()


def test_port_not_allowed_is_refused_alone(relay, harness):
    target = harness.server(tag_echo_handler(b"limited"))
    allowed, forbidden = free_ports(2)
    token = relay.state.token("limited", ports=str(allowed))
    mark = relay.proc.mark()
    agent = harness.agent(relay.proc, token, {allowed: target.port, forbidden: target.port}, ca=relay.state.ca)

    agent.wait_listening(allowed)
    agent.wait_for_log(rf"relay refused public port {forbidden}: port {forbidden} is not allowed for agent limited")
    relay.proc.wait_for_log(rf"agent limited: port {forbidden} refused: port {forbidden} is not allowed", after=mark)
    assert tag_of(allowed) == b"limited"
    assert not port_accepts(forbidden)


def test_port_held_by_another_agent_is_refused_alone(relay, harness):
    first_target = harness.server(tag_echo_handler(b"first"))
    second_target = harness.server(tag_echo_handler(b"second"))
    shared, own = free_ports(2)
    first = harness.agent(relay.proc, relay.state.token("first"), {shared: first_target.port}, ca=relay.state.ca)
    first.wait_listening()
    assert tag_of(shared) == b"first"

    mark = relay.proc.mark()
    second = harness.agent(
        relay.proc,
        relay.state.token("second"),
        {shared: second_target.port, own: second_target.port},
        ca=relay.state.ca,
    )
    second.wait_listening(own)
    second.wait_for_log(rf"relay refused public port {shared}: port {shared} is served by another agent")
    relay.proc.wait_for_log(rf"agent second: port {shared} refused: port {shared} is served by another agent", after=mark)
    assert tag_of(own) == b"second"
    assert tag_of(shared) == b"first", "the first agent lost its port"
    first.assert_not_logged(r"tunnel to the relay lost|refused")


def test_same_agent_twice_newest_tunnel_wins(relay, harness, figures):
    old_target = harness.server(tag_echo_handler(b"old"))
    new_target = harness.server(tag_echo_handler(b"new"))
    (port,) = free_ports(1)
    token = relay.state.token("twin")
    old = harness.agent(relay.proc, token, {port: old_target.port}, ca=relay.state.ca)
    old.wait_listening()
    assert tag_of(port) == b"old"

    mark = relay.proc.mark()
    start = time.monotonic()
    new = harness.agent(relay.proc, token, {port: new_target.port}, ca=relay.state.ca)
    new.wait_up()
    wait_until(lambda: tag_of(port) == b"new", 5, "the public port to reach the newer agent's target")
    took = time.monotonic() - start
    relay.proc.wait_for_log(r"agent twin: a new tunnel from \S+ replaces the one from", after=mark)
    old.wait_for_log(r"replaced by a newer tunnel of the same agent")
    # No window where the port was closed: it is still served, by the new agent.
    new.wait_listening()
    for _ in range(3):
        assert tag_of(port) == b"new"
    figures(f"takeover: new agent serving {took:.2f} s after it was started (incl. process start)")
    old.stop()
    new.stop()


def test_unknown_agent_port_is_refused_after_agent_leaves(relay, harness):
    """A public connection while no agent serves the port is refused within a second."""
    target = harness.server(tag_echo_handler(b"leaving"))
    (port,) = free_ports(1)
    agent = harness.agent(relay.proc, relay.state.token("leaving"), {port: target.port}, ca=relay.state.ca)
    agent.wait_listening()
    assert tag_of(port) == b"leaving"
    agent.stop()
    wait_until(lambda: not port_accepts(port), 2, f"{HOST}:{port} to be refused after its agent left")
