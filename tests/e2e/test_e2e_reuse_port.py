"""--reuse-port: two relay processes on one host share a public port, each with its own tunnel
port and agent process (one credential); the kernel spreads clients over them, and when one
relay process stops, the other serves every client."""

from __future__ import annotations

import collections
import os

import pytest

from .conftest import connect, echo_roundtrip, free_ports, read_line, tag_echo_handler

pytestmark = pytest.mark.e2e

CLIENTS = 64  # all on one process by chance: 2 * 2**-64


def _through(public: int, n: int) -> collections.Counter:
    """N clients, each a byte-exact echo; which target (process) each one reached."""
    reached: collections.Counter = collections.Counter()
    for i in range(n):
        with connect(public) as s:
            reached[read_line(s)] += 1
            payload = os.urandom(4096) + b"client %d" % i
            assert echo_roundtrip(s, payload) == payload
    return reached


def test_two_relay_processes_share_a_public_port(harness):
    state = harness.state()
    public, tunnel_a, tunnel_b = free_ports(3)
    token = state.token("scale-out", ports=str(public))
    targets = {b"A": harness.server(tag_echo_handler(b"A"), "a"), b"B": harness.server(tag_echo_handler(b"B"), "b")}
    relays = {}
    for tag, tunnel in ((b"A", tunnel_a), (b"B", tunnel_b)):
        relays[tag] = harness.relay(state, tunnel_port=tunnel, extra=["--reuse-port"])
        agent = harness.agent(relays[tag], token, {public: targets[tag].port}, ca=state.ca)
        agent.wait_listening()

    assert set(_through(public, CLIENTS)) == {b"A", b"B"}

    relays[b"A"].stop()
    assert _through(public, 16) == {b"B": 16}
    relays[b"B"].assert_not_logged(r"Traceback|Unhandled")


def test_without_reuse_port_the_second_process_cannot_take_the_port(harness):
    state = harness.state()
    public, tunnel_a, tunnel_b = free_ports(3)
    token = state.token("scale-out", ports=str(public))
    first_target = harness.server(tag_echo_handler(b"A"), "a")
    first = harness.agent(harness.relay(state, tunnel_port=tunnel_a), token, {public: first_target.port}, ca=state.ca)
    first.wait_listening()
    second_relay = harness.relay(state, tunnel_port=tunnel_b)
    second = harness.agent(second_relay, token, {public: harness.echo().port}, ca=state.ca)
    second.wait_for_log(rf"relay refused public port {public}: the relay cannot listen on port {public}.*in use")
    assert _through(public, 8) == {b"A": 8}
