"""The agent verifies the relay: a wrong CA, a wrong pin or a certificate for another name is
never trusted, so the agent never sends its token and the relay never opens its port."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .conftest import echo_once, free_ports, port_accepts

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def relay(module_harness):
    state = module_harness.state()
    proc = module_harness.relay(state)
    return SimpleNamespace(proc=proc, state=state)


def assert_never_authenticates(agent, relay_proc, mark: int, port: int, error: str) -> None:
    # Two failed attempts in a row: the agent keeps failing the same way, never gets in.
    agent.wait_for_log(error, timeout=15, count=2)
    agent.assert_not_logged(r"tunnel to the relay is up")
    agent.assert_not_logged(r"relay listens on public port")
    relay_proc.assert_not_logged(r"agent \S+ connected", after=mark)
    relay_proc.assert_not_logged(rf"listening on public port {port}\b", after=mark)
    assert not port_accepts(port), "the relay opened the public port of an agent that did not trust it"


def test_pin_and_ca_both_work(relay, harness):
    """The control case: the same agent set-up with the right CA or pin gets in."""
    echo = harness.echo()
    by_ca, by_pin = free_ports(2)
    token = relay.state.token("trusting")
    a = harness.agent(relay.proc, token, {by_ca: echo.port}, ca=relay.state.ca)
    a.wait_listening()
    assert echo_once(by_ca) == b"ping"
    a.stop()
    b = harness.agent(relay.proc, token, {by_pin: echo.port}, pin=relay.state.pin)
    b.wait_listening()
    assert echo_once(by_pin) == b"ping"


def test_wrong_ca(relay, harness):
    other = harness.state()  # another `relay init`: another CA
    echo = harness.echo()
    (port,) = free_ports(1)
    mark = relay.proc.mark()
    agent = harness.agent(relay.proc, relay.state.token("wrong-ca"), {port: echo.port}, ca=other.ca)
    assert_never_authenticates(
        agent, relay.proc, mark, port, r"cannot connect to the relay .*certificate is not trusted"
    )


def test_wrong_pin(relay, harness):
    other = harness.state()
    echo = harness.echo()
    (port,) = free_ports(1)
    mark = relay.proc.mark()
    agent = harness.agent(relay.proc, relay.state.token("wrong-pin"), {port: echo.port}, pin=other.pin)
    assert_never_authenticates(
        agent, relay.proc, mark, port, r"cannot connect to the relay .*certificate is not trusted"
    )


def test_hostname_mismatch(harness):
    state = harness.state(hostnames=["example.invalid"])  # 127.0.0.1 is not in the certificate
    relay = harness.relay(state)
    echo = harness.echo()
    (port,) = free_ports(1)
    mark = relay.mark()
    agent = harness.agent(relay, state.token("mismatch"), {port: echo.port}, ca=state.ca)
    assert_never_authenticates(
        agent, relay, mark, port, r"cannot connect to the relay .*(does not match|hostname|IP address mismatch)"
    )
    # The pin is the identity (no name check): the same relay is fine with --pin.
    pinned = harness.agent(relay, state.token("mismatch"), {port: echo.port}, pin=state.pin)
    pinned.wait_listening()
    assert echo_once(port) == b"ping"
