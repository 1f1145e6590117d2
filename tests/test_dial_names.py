"""How the agent dials a target given by name (relay/dial.py NameEndpoint): resolved for every
stream, then address by address as RFC 8305 has it: the next address at once when one
fails, or after ATTEMPT_DELAY while one is still under way. In memory with scripted
addresses, and once on real loopback sockets."""

from __future__ import annotations

import errno
import socket

import pytest
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay import dial
from relay.dial import ATTEMPT_DELAY, NameEndpoint

from .inmemory import garbage_left_by
from .test_dial import ScriptedSocket


class Resolver:
    """Answers at once with the given addresses, as getaddrinfo lists them."""

    def __init__(self, *addresses):
        self.addresses = addresses
        self.receivers = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # noqa: N802
        self.receivers.append(receiver)
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()
        return receiver


class LaterResolver(Resolver):
    """Answers only when told to (resolve())."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # noqa: N802
        self.receivers.append(receiver)
        return receiver

    def resolve(self):
        for receiver in self.receivers:
            receiver.resolutionBegan(None)
            for address in self.addresses:
                receiver.addressResolved(address)
            receiver.resolutionComplete()


class Attempts:
    """Stands in for AddressEndpoint: each address's connect is a Deferred the test fires."""

    def __init__(self):
        self.started: list[tuple[str, int]] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []
        self.at_once: dict[str, object] = {}  # host -> a protocol or a Failure, given at once

    def __call__(self, reactor, host, port, timeout, family):
        attempts = self

        class Endpoint:
            def connect(self, factory):
                attempts.started.append((host, family))
                if host in attempts.at_once:
                    result = attempts.at_once[host]
                    return defer.fail(result) if isinstance(result, Failure) else defer.succeed(result)
                d = defer.Deferred(lambda _: attempts.cancelled.append(host))
                attempts.pending[host] = d
                return d

        return Endpoint()


def endpoint(*addresses, resolver=None):
    reactor = MemoryReactorClock()
    reactor.nameResolver = resolver or Resolver(*addresses)
    attempts = Attempts()
    return reactor, attempts, NameEndpoint(reactor, "db.internal", 5432, 10.0, dial=attempts)


V6 = IPv6Address("TCP", "::1", 5432)
V4 = IPv4Address("TCP", "127.0.0.1", 5432)
REFUSED = Failure(error.ConnectionRefusedError())


def test_a_refusal_moves_on_to_the_next_address_at_once():
    """localhost: ::1 refuses (the service listens on IPv4 only); 127.0.0.1 is tried in the
    same reactor turn, not after an attempt delay (Twisted's HostnameEndpoint waited 0.3 s)."""
    reactor, attempts, name = endpoint(V6, V4)
    attempts.at_once["::1"] = REFUSED
    attempts.at_once["127.0.0.1"] = won = Protocol()
    d = name.connect(Factory())
    assert attempts.started == [("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)]
    assert d.called and d.result is won
    assert reactor.getDelayedCalls() == []


def test_an_address_still_under_way_gets_the_attempt_delay_then_the_next_starts_beside_it():
    reactor, attempts, name = endpoint(V6, V4)
    d = name.connect(Factory())
    assert attempts.started == [("::1", socket.AF_INET6)]
    reactor.advance(ATTEMPT_DELAY - 0.01)
    assert len(attempts.started) == 1
    reactor.advance(0.01)
    assert [host for host, _ in attempts.started] == ["::1", "127.0.0.1"]
    won = Protocol()
    attempts.pending["127.0.0.1"].callback(won)
    assert d.result is won
    assert attempts.cancelled == ["::1"]  # the loser is given up
    assert reactor.getDelayedCalls() == []


def test_a_later_failure_of_the_first_address_starts_the_next_without_waiting():
    reactor, attempts, name = endpoint(V6, V4, IPv4Address("TCP", "10.0.0.7", 5432))
    name.connect(Factory())
    reactor.advance(0.1)
    attempts.pending["::1"].errback(REFUSED)
    assert [host for host, _ in attempts.started] == ["::1", "127.0.0.1"]  # at 0.1 s, not 0.25
    reactor.advance(ATTEMPT_DELAY)  # the delay counts from the latest start
    assert [host for host, _ in attempts.started] == ["::1", "127.0.0.1", "10.0.0.7"]


def test_when_every_address_fails_the_last_failure_is_the_answer():
    reactor, attempts, name = endpoint(V6, V4)
    attempts.at_once["::1"] = REFUSED
    attempts.at_once["127.0.0.1"] = Failure(error.TimeoutError())
    d = name.connect(Factory())
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(error.TimeoutError)
    assert reactor.getDelayedCalls() == []


def test_a_name_without_addresses_fails_with_a_lookup_error():
    reactor, attempts, name = endpoint()
    failure = []
    name.connect(Factory()).addErrback(failure.append)
    assert failure[0].check(error.DNSLookupError) and "db.internal" in failure[0].getErrorMessage()
    assert attempts.started == []


def test_a_cancel_while_resolving_dials_nothing_afterwards():
    """A stream reset while its target's name resolves: nothing is dialled when the answer
    comes."""
    resolver = LaterResolver(V4)
    reactor, attempts, name = endpoint(resolver=resolver)
    d = name.connect(Factory())
    d.cancel()
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(defer.CancelledError)
    resolver.resolve()
    assert attempts.started == []


def test_a_cancel_during_the_attempts_gives_them_all_up():
    reactor, attempts, name = endpoint(V6, V4)
    d = name.connect(Factory())
    reactor.advance(ATTEMPT_DELAY)
    d.cancel()
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert sorted(attempts.cancelled) == ["127.0.0.1", "::1"]
    assert reactor.getDelayedCalls() == []


def test_a_link_local_address_keeps_its_interface():
    reactor, attempts, name = endpoint(IPv6Address("TCP", "fe80::1", 5432, 0, 2))
    name.connect(Factory())
    assert attempts.started == [("fe80::1%2", socket.AF_INET6)]


def test_on_loopback_a_refusing_address_costs_no_delay():
    """Real sockets: 127.0.0.2 refuses (nothing listens there), 127.0.0.1 accepts; the
    stream's protocol is connected before the clock moves."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        reactor = MemoryReactorClock()
        reactor.nameResolver = Resolver(IPv4Address("TCP", "127.0.0.2", port), IPv4Address("TCP", "127.0.0.1", port))
        made = []

        class Made(Protocol):
            def connectionMade(self):
                made.append(self.transport.getPeer().host)

        d = NameEndpoint(reactor, "service.internal", port, 5.0).connect(Factory.forProtocol(Made))
        assert d.called and made == ["127.0.0.1"]
        accepted, _ = listener.accept()
        accepted.close()
        d.result.transport.abortConnection()


@pytest.mark.parametrize("host", ["localhost", "db.internal"])
def test_the_agent_dials_names_with_this_endpoint(host):
    from relay.agent import AgentService, AgentSettings, Target

    settings = AgentSettings(token="t", expose={}, connect_timeout=7.0)
    service = AgentService(MemoryReactorClock(), endpoint=None, settings=settings, relay_name="relay.test:7835")
    target = service.target_endpoint(Target(host, 80))
    assert isinstance(target, NameEndpoint)
    assert (target.host, target.port, target.timeout) == (host, 80, 7.0)


class Socket(ScriptedSocket):
    def setsockopt(self, *args):
        pass


class Answers(Resolver):
    """Answers at once and keeps nothing, as the reactor's getaddrinfo does."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # noqa: N802
        super().resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        self.receivers.clear()
        return receiver


@pytest.mark.parametrize("v4", [0, errno.ECONNREFUSED], ids=["the-next-connects", "every-address-refuses"])
def test_addresses_refused_at_once_are_freed_without_the_garbage_collector(monkeypatch, v4):
    """AddressEndpoint failed at once with a Failure whose traceback held every frame up the
    stack, _NameDial._next's among them; kept in _NameDial.failures, a reference cycle for
    every stream to a name whose first address refuses (localhost: ::1 first, a service on
    IPv4 only), with the stream and its connection in it."""
    answers = {socket.AF_INET6: errno.ECONNREFUSED, socket.AF_INET: v4}
    monkeypatch.setattr(dial.socket, "socket", lambda family, kind: Socket(family, kind, [answers[family]]))
    reactor = MemoryReactorClock()
    reactor.nameResolver = Answers(V6, V4)
    name = NameEndpoint(reactor, "db.internal", 5432, 10.0)

    def dial_once():
        outcome = []
        name.connect(Factory.forProtocol(Protocol)).addBoth(outcome.append)
        if v4 == 0:
            transport = outcome[0].transport
            reactor.removeReader(transport)
            transport.connectionLost(Failure(error.ConnectionAborted()))  # the stream ends
        else:
            assert outcome[0].check(error.ConnectionRefusedError)
        ScriptedSocket.made.clear()

    assert garbage_left_by(dial_once) == 0
