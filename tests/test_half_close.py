"""A stream's FIN: the half-close is done at once when nothing is queued (relay/tunnel.py
close_write_now), in Twisted's order when something is; and the orderly close after it
makes no second shutdown and no new Failure (close_now). Real loopback sockets, no reactor run: what the peer socket
sees is read without waiting."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import error, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from relay.tunnel import _CLOSED_CLEANLY, OpenStreams, Stream, close_now, close_write_now


@implementer(IHalfCloseableProtocol)
class HalfCloser(Protocol):
    def __init__(self):
        self.write_closed = 0
        self.lost = None

    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        self.write_closed += 1

    def connectionLost(self, reason=None):
        self.lost = reason


class RecordingSocket:
    """The accepted socket, with its shutdown calls recorded (a socket's methods cannot be
    replaced on the instance)."""

    def __init__(self, sock):
        self._sock = sock
        self.shutdowns: list[int] = []

    def shutdown(self, how):
        self.shutdowns.append(how)
        return self._sock.shutdown(how)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.fixture
def connected():
    """(reactor, Twisted transport of the accepted end, its protocol, the peer socket)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, address = listener.accept()
    accepted.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactorClock()
    protocol = HalfCloser()
    transport = tcp.Server(RecordingSocket(accepted), protocol, address, None, 1, reactor)
    protocol.makeConnection(transport)
    yield reactor, transport, protocol, peer
    peer.close()
    accepted.close()


def test_nothing_queued_the_fin_leaves_at_once(connected):
    reactor, transport, protocol, peer = connected
    close_write_now(transport)
    assert peer.recv(10) == b""  # the FIN is already there: no write event was needed
    assert protocol.write_closed == 1
    assert transport._writeDisconnected
    assert transport not in reactor.getWriters()
    assert transport.socket.shutdowns == [socket.SHUT_WR]


def test_queued_bytes_go_before_the_fin(connected):
    reactor, transport, protocol, peer = connected
    transport.write(b"queued")  # Twisted's buffer: sent at the next write event
    close_write_now(transport)
    with pytest.raises(BlockingIOError):
        peer.recv(10)  # neither the bytes nor the FIN yet
    assert protocol.write_closed == 0
    for _ in range(3):  # the reactor's write events, at most a few
        if transport not in reactor.getWriters():
            break
        transport.doWrite()
    assert peer.recv(10) == b"queued"
    assert peer.recv(10) == b""
    assert protocol.write_closed == 1


def test_a_transport_that_is_not_plain_tcp_is_left_to_twisted():
    calls = []

    class Other:
        def loseWriteConnection(self):
            calls.append("loseWriteConnection")

    close_write_now(Other())
    assert calls == ["loseWriteConnection"]


def test_the_close_after_a_half_close_makes_no_second_shutdown(connected):
    """Twisted shuts down both ways before close() on an orderly close; after our half-close
    that call only fails (ENOTCONN). A stream turns it off when it gets its socket."""
    reactor, transport, _protocol, peer = connected

    class FakeTunnel:
        paused = False
        def __init__(self):
            self.lost = []
            self.open_streams = OpenStreams()

        def stream_lost(self, stream, clean):
            self.lost.append(clean)

        def stream_eof(self, stream):
            pass

    class RecordingStream(Stream):
        reason = None

        def connectionLost(self, reason=None):
            self.reason = reason
            super().connectionLost(reason)

    tunnel = FakeTunnel()
    sock = transport.socket
    stream = RecordingStream(tunnel, 1)
    transport.protocol = stream
    stream.makeConnection(transport)
    stream.deliver_fin()
    assert peer.recv(10) == b""
    stream.readConnectionLost()  # the peer's FIN: both directions are done, so it closes
    assert tunnel.lost == [True]
    assert sock.fileno() == -1  # closed, at once
    assert sock.shutdowns == [socket.SHUT_WR]
    assert stream.reason is _CLOSED_CLEANLY  # close_now's shared Failure, not a new one
    assert transport not in reactor.getReaders() and transport not in reactor.getWriters()


def test_the_orderly_close_hands_on_the_one_shared_failure(connected):
    """Both directions ended: the transport stops being watched and closes its socket at
    once, and the protocol hears ConnectionDone, the same Failure object every time."""
    reactor, transport, protocol, peer = connected
    sock = transport.socket
    close_write_now(transport)
    close_now(transport)
    assert transport not in reactor.getReaders() and transport not in reactor.getWriters()
    assert sock.fileno() == -1
    assert protocol.lost.check(error.ConnectionDone)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname(), timeout=5):
            accepted, address = listener.accept()
        other = HalfCloser()
        second = tcp.Server(accepted, other, address, None, 2, reactor)
        other.makeConnection(second)
        close_write_now(second)
        close_now(second)
    assert other.lost is protocol.lost  # not a new Failure per connection


@pytest.mark.parametrize("state", ["still writing", "already closing"])
def test_a_close_before_both_directions_ended_is_left_to_twisted(connected, state):
    """Only a transport whose write side is shut down is closed at once; otherwise Twisted's
    loseConnection keeps its order (queued bytes first, then the close)."""
    reactor, transport, protocol, peer = connected
    if state == "already closing":
        transport.write(b"queued")
        transport.loseConnection()
    else:
        transport.write(b"queued")
    close_now(transport)
    assert protocol.lost is None  # not closed yet: the queued bytes go first
    assert transport.disconnecting
    # The reactor's write event: the bytes leave, then Twisted reports the close (which
    # the reactor hands to connectionLost).
    assert isinstance(transport.doWrite(), error.ConnectionDone)
    assert peer.recv(10) == b"queued"


def test_a_wrapped_transport_is_left_to_twisted(connected):
    """A protocol wrapper (TLS, say) passes the TCP transport's attributes through; closing
    it at the socket's level would skip the wrapper, so both helpers leave it to Twisted."""
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    reactor, transport, protocol, peer = connected
    calls = []

    class Wrapper(ProtocolWrapper):
        def loseWriteConnection(self):
            calls.append("loseWriteConnection")

        def loseConnection(self):
            calls.append("loseConnection")

    wrapper = Wrapper(WrappingFactory(Protocol), Protocol())
    wrapper.makeConnection(transport)
    assert wrapper.socket is transport.socket  # what the old attribute checks looked at
    close_write_now(wrapper)
    transport._writeDisconnected = True  # as if the write side had been shut down
    close_now(wrapper)
    assert calls == ["loseWriteConnection", "loseConnection"]
    assert transport.connected and transport.socket.fileno() != -1
