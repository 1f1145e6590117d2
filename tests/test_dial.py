"""How the agent dials a target by address (relay/dial.py): at once when the kernel has already
finished the handshake, else when the socket becomes writable; with its errors, deadline and
cancel. In memory with a scripted socket, and once for real on loopback."""

from __future__ import annotations

import errno
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relay import dial
from relay.agent import AgentService, AgentSettings, Target
from relay.dial import AddressEndpoint

from .inmemory import garbage_left_by

ADDRESS = ("127.0.0.1", 5432)


class ScriptedSocket:
    """A non-blocking socket whose connect_ex answers come from a script."""

    made: list[ScriptedSocket] = []

    def __init__(self, family, kind, connects=(), so_error=0):
        self.family = family
        self.connects = list(connects)
        self.so_error = so_error
        self.connect_calls: list[tuple] = []
        self.closed = False
        self.blocking = True
        ScriptedSocket.made.append(self)

    def setblocking(self, flag):
        self.blocking = bool(flag)

    def connect_ex(self, address):
        self.connect_calls.append(address)
        return self.connects.pop(0)

    def getsockopt(self, level, name):
        assert (level, name) == (socket.SOL_SOCKET, socket.SO_ERROR)
        return self.so_error

    def fileno(self):
        return 99

    def close(self):
        self.closed = True


class Recorder(Protocol):
    def __init__(self):
        self.made = 0

    def connectionMade(self):
        self.made += 1


@pytest.fixture
def scripted(monkeypatch):
    """scripted(*connect_ex answers): the endpoint's next socket follows that script."""
    ScriptedSocket.made = []

    def script(*connects, so_error=0):
        monkeypatch.setattr(
            dial.socket, "socket", lambda family, kind: ScriptedSocket(family, kind, connects, so_error)
        )

    return script


def connect(reactor, timeout=7.0):
    protocol = Recorder()
    d = AddressEndpoint(reactor, *ADDRESS, timeout).connect(Factory.forProtocol(lambda: protocol))
    return d, protocol, ScriptedSocket.made[-1]


def result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_a_handshake_done_at_the_second_ask_connects_in_the_same_turn(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, 0)
    d, protocol, sock = connect(reactor)
    assert result(d) is protocol and protocol.made == 1
    assert sock.connect_calls == [ADDRESS, ADDRESS] and not sock.blocking
    assert protocol.transport.socket is sock  # the socket itself, not a duplicate
    assert reactor.readers == {protocol.transport}
    assert not reactor.writers and reactor.getDelayedCalls() == []  # no wait, no timer


def test_a_handshake_under_way_waits_for_writability(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY)
    d, protocol, sock = connect(reactor)
    assert not d.called and protocol.made == 0
    (pending,) = list(reactor.writers)
    assert pending.fileno() == 99
    pending.doWrite()  # writable, SO_ERROR 0: connected
    assert result(d) is protocol and protocol.made == 1
    assert not reactor.writers and reactor.readers == {protocol.transport}
    assert reactor.getDelayedCalls() == []  # the deadline is cancelled
    assert not sock.closed


def test_a_refusal_at_once_fails_with_twisteds_error_and_closes_the_socket(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.ECONNREFUSED)
    d, protocol, sock = connect(reactor)
    failure = result(d)
    assert failure.check(error.ConnectionRefusedError)
    assert "Connection refused" in failure.getErrorMessage()
    assert sock.closed and protocol.made == 0 and not reactor.readers and not reactor.writers


def test_a_refusal_after_waiting_fails_the_same_way(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY, so_error=errno.ECONNREFUSED)
    d, protocol, sock = connect(reactor)
    next(iter(reactor.writers)).doWrite()
    assert result(d).check(error.ConnectionRefusedError)
    assert sock.closed and protocol.made == 0
    assert not reactor.writers and reactor.getDelayedCalls() == []


def test_a_refusal_the_reactor_reports_as_a_hang_up_is_still_a_refusal(scripted):
    """epoll gives a failed connect to connectionLost, not doWrite."""
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY, so_error=errno.ECONNREFUSED)
    d, _, sock = connect(reactor)
    next(iter(reactor.writers)).connectionLost(Failure(error.ConnectionLost()))
    assert result(d).check(error.ConnectionRefusedError)
    assert sock.closed and not reactor.writers and reactor.getDelayedCalls() == []


def test_a_hang_up_without_an_error_fails_with_the_reactors_reason(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY)
    d, _, sock = connect(reactor)
    next(iter(reactor.writers)).connectionLost(Failure(error.ConnectionLost("gone")))
    failure = result(d)
    assert failure.check(error.ConnectError) and "gone" in failure.getErrorMessage()
    assert sock.closed


def test_an_unreachable_target_fails_with_its_errno(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY, so_error=errno.EHOSTUNREACH)
    d, _, sock = connect(reactor)
    next(iter(reactor.writers)).doWrite()
    failure = result(d)
    assert failure.check(error.ConnectError)
    assert "No route to host" in failure.getErrorMessage()
    assert sock.closed


def test_a_connect_that_never_finishes_times_out(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY)
    d, protocol, sock = connect(reactor, timeout=7.0)
    reactor.advance(6.9)
    assert not d.called
    reactor.advance(0.2)
    assert result(d).check(error.TimeoutError)
    assert sock.closed and not reactor.writers and protocol.made == 0


def test_cancel_stops_waiting_and_closes_the_socket(scripted):
    reactor = MemoryReactorClock()
    scripted(errno.EINPROGRESS, errno.EALREADY)
    d, protocol, sock = connect(reactor)
    d.cancel()
    assert result(d).check(defer.CancelledError)
    assert sock.closed and not reactor.writers and reactor.getDelayedCalls() == []
    assert protocol.made == 0


def test_ipv6_addresses_get_an_ipv6_socket(scripted):
    scripted(0)
    AddressEndpoint(MemoryReactorClock(), "::1", 80, 7.0, socket.AF_INET6).connect(Factory.forProtocol(Protocol))
    assert ScriptedSocket.made[-1].family == socket.AF_INET6


def test_a_link_local_target_keeps_its_scope():
    endpoint = AddressEndpoint(MemoryReactorClock(), "fe80::1%lo", 80, 7.0, socket.AF_INET6)
    host, port, _flow, scope = endpoint.address
    assert (port, scope) == (80, socket.if_nametoindex("lo"))


def test_no_socket_to_be_had_is_a_failed_connect_not_an_exception(monkeypatch):
    """EMFILE must reach the agent as a failed Deferred (a reset stream and a log line),
    not as an exception out of the tunnel's read, which would end every stream."""

    def no_more(family, kind):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dial.socket, "socket", no_more)
    d = AddressEndpoint(MemoryReactorClock(), *ADDRESS, 7.0).connect(Factory.forProtocol(Protocol))
    failure = result(d)
    assert failure.check(OSError) and "Too many open files" in failure.getErrorMessage()


def test_a_bad_address_is_a_failed_connect(scripted):
    d = AddressEndpoint(MemoryReactorClock(), "fe80::1%no-such-interface", 80, 7.0, socket.AF_INET6).connect(
        Factory.forProtocol(Protocol)
    )
    assert result(d).check(socket.gaierror)
    assert ScriptedSocket.made == []  # failed before a socket was made


def test_a_protocol_that_fails_to_start_leaves_no_reader_behind(scripted):
    class Broken(Protocol):
        def connectionMade(self):
            raise RuntimeError("broken")

    reactor = MemoryReactorClock()
    scripted(0)
    d = AddressEndpoint(reactor, *ADDRESS, 7.0).connect(Factory.forProtocol(Broken))
    assert result(d).check(RuntimeError)
    assert ScriptedSocket.made[-1].closed
    assert not reactor.readers and not reactor.writers


def test_the_transport_describes_itself(scripted):
    scripted(0)
    protocol = result(AddressEndpoint(MemoryReactorClock(), *ADDRESS, 7.0).connect(Factory.forProtocol(Recorder)))
    assert repr(protocol.transport) == "<Recorder to 127.0.0.1:5432>"
    assert protocol.transport.logstr == "Recorder,client"


@pytest.mark.parametrize(
    "host, family", [("127.0.0.1", socket.AF_INET), ("10.1.2.3", socket.AF_INET), ("::1", socket.AF_INET6), ("fe80::1", socket.AF_INET6)]
)
def test_the_agent_dials_addresses_with_this_endpoint(host, family):
    """No resolver, no thread pool: an address is dialled as it is."""
    settings = AgentSettings(token="t", expose={}, connect_timeout=7.0)
    service = AgentService(MemoryReactorClock(), endpoint=None, settings=settings, relay_name="relay.test:7835")
    endpoint = service.target_endpoint(Target(host, 80))
    assert isinstance(endpoint, AddressEndpoint)
    assert (endpoint.host, endpoint.port, endpoint.timeout, endpoint.family) == (host, 80, 7.0, family)


def test_the_agent_makes_each_targets_endpoint_once():
    """Per stream, only the connect: the endpoint (and telling an address from a name) is
    made at the first stream to a target and kept, for names as for addresses."""
    settings = AgentSettings(token="t", expose={}, connect_timeout=7.0)
    service = AgentService(MemoryReactorClock(), endpoint=None, settings=settings, relay_name="relay.test:7835")
    for target in (Target("127.0.0.1", 80), Target("::1", 80), Target("db.internal", 5432)):
        assert service.target_endpoint(target) is service.target_endpoint(Target(target.host, target.port))
    assert service.target_endpoint(Target("127.0.0.1", 80)) is not service.target_endpoint(Target("127.0.0.1", 81))


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "host, family",
    [
        ("127.0.0.1", socket.AF_INET),
        pytest.param("::1", socket.AF_INET6, marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 here")),
    ],
)
@pytest_twisted.inlineCallbacks
def test_on_loopback_it_connects_and_carries_bytes(host, family):
    from twisted.internet import reactor

    class Echo(Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface=host)
    try:
        got = defer.Deferred()

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                got.callback(data)

        protocol = yield AddressEndpoint(reactor, host, port.getHost().port, 5.0, family).connect(Factory.forProtocol(Client))
        got.addTimeout(5, reactor)
        assert (yield got) == b"ping"
        peer = protocol.transport.getPeer()
        assert (peer.host, peer.port) == (host, port.getHost().port)
        protocol.transport.loseConnection()
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_on_loopback_a_closed_port_is_refused():
    from twisted.internet import reactor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(error.ConnectionRefusedError):
        yield AddressEndpoint(reactor, "127.0.0.1", closed, 5.0).connect(Factory.forProtocol(Protocol))


def test_a_connect_that_times_out_is_freed_without_the_garbage_collector(scripted):
    # The fired deadline (a DelayedCall holding the attempt's own _fail) stayed with the
    # attempt: a reference cycle with the factory in it, which for the agent is the stream
    # and the data that arrived for it before the connect (up to a window).
    reactor = MemoryReactorClock()

    def time_out():
        scripted(errno.EINPROGRESS, errno.EALREADY)
        d, protocol, sock = connect(reactor, timeout=7.0)
        reactor.advance(7.0)
        assert result(d).check(error.TimeoutError) and sock.closed

    assert garbage_left_by(time_out) == 0
