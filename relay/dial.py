"""Dialling an inside target by its address, in as few reactor turns as the kernel allows.

Twisted's TCP client waits a reactor turn before it connects, and another for the socket to
become writable, registering and unregistering it with epoll on the way. To a target on
loopback or a near LAN host, the kernel has usually finished the handshake by the time a
non-blocking connect() returns, so this endpoint asks again at once and, if it is done,
hands the connected socket to the reactor in the same turn as the OPEN that asked for it.
Only when the handshake is really still under way does it wait for writability.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import defer, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)
_CONNECTED = (0, errno.EISCONN)


@implementer(IStreamClientEndpoint)
class AddressEndpoint:
    """A client endpoint for an IP address (no resolver), as TCP4/6ClientEndpoint but faster.
    Every failure, to make a socket too (EMFILE), comes back as a failed Deferred."""

    def __init__(self, reactor, host: str, port: int, timeout: float, family: int = socket.AF_INET) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.family = family

    @property
    def address(self) -> tuple:
        if self.family == socket.AF_INET6:
            # The 4-tuple keeps a link-local address's scope (fe80::1%eth0); a 2-tuple
            # would connect with scope 0 and fail with EINVAL.
            return socket.getaddrinfo(self.host, self.port, self.family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4]
        return (self.host, self.port)

    def connect(self, factory) -> defer.Deferred:
        sock = None
        try:
            address = self.address
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code in _IN_PROGRESS:
                code = sock.connect_ex(address)
            if code in _CONNECTED:
                return defer.succeed(_adopt(self.reactor, sock, address, factory))
            if code in _IN_PROGRESS:
                return _Pending(self, sock, address, factory).deferred
            raise error.getConnectError((code, os.strerror(code)))
        except Exception as e:
            if sock is not None:
                sock.close()
            # Without its traceback, which held this frame and every one up the stack: a
            # caller that keeps the failure while one of those frames refers to it (a
            # NameEndpoint trying its next address) made a reference cycle of them all.
            return defer.fail(e.with_traceback(None))


def _adopt(reactor, sock: socket.socket, address, factory):
    """The connected socket as a Twisted TCP transport, and its protocol connected. If the
    protocol fails to start, the reactor forgets the socket before it is closed, so the
    descriptor's number is not left registered for the next socket that gets it."""
    protocol = factory.buildProtocol(None)
    if protocol is None:
        raise error.ConnectError(string="the factory made no protocol")
    transport = tcp.Server(sock, protocol, address, None, None, reactor)  # reads from now
    transport.logstr = f"{transport.logstr.split(',')[0]},client"
    transport.repstr = f"<{type(protocol).__name__} to {address[0]}:{address[1]}>"
    try:
        protocol.makeConnection(transport)
    except Exception:
        transport.stopReading()
        transport.stopWriting()
        raise
    return protocol


class _Pending:
    """A connect still under way: wait, with a deadline, until the socket is writable."""

    def __init__(self, endpoint: AddressEndpoint, sock: socket.socket, address, factory) -> None:
        self.reactor = endpoint.reactor
        self.sock = sock
        self.address = address
        self.factory = factory
        self.deferred = defer.Deferred(self._cancel)
        self.timer = self.reactor.callLater(endpoint.timeout, self._fail, error.TimeoutError())
        self.reactor.addWriter(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "AddressEndpoint"

    def doWrite(self):  # noqa: N802 (Twisted's name)
        if self._failed():
            return
        self._stop()
        try:
            protocol = _adopt(self.reactor, self.sock, self.address, self.factory)
        except Exception:
            self.sock.close()
            self.deferred.errback()
            return
        self.deferred.callback(protocol)

    def connectionLost(self, reason) -> None:  # noqa: N802 (Twisted's name)
        # epoll reports a failed connect as a hang-up, which the reactor hands us here,
        # not to doWrite: the socket's own error says what it was (refused, unreachable).
        if not self._failed():
            self._fail(error.ConnectError(string=reason.getErrorMessage()))

    def _failed(self) -> bool:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(error.getConnectError((code, os.strerror(code))))
        return bool(code)

    def _stop(self) -> None:
        self.reactor.removeWriter(self)
        # Dropped, not only cancelled: once the deadline has fired, the DelayedCall still
        # holds its func, our _fail, and with it us, the socket and the factory (a
        # TargetStream with the data that arrived before the connect, up to a window): a
        # reference cycle for every target that timed out.
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, reason: Exception) -> None:
        if self.deferred.called:
            return
        self._stop()
        self.sock.close()
        self.deferred.errback(reason)

    def _cancel(self, _deferred) -> None:
        self._stop()
        self.sock.close()  # the Deferred then fails with CancelledError


# RFC 8305's connection attempt delay: how long one address has before the next one starts
# beside it.
ATTEMPT_DELAY = 0.25


@implementer(IStreamClientEndpoint)
class NameEndpoint:
    """A target given by name: resolved for every stream (its addresses may change), then
    dialled address by address as RFC 8305 has it. The next address starts at once when
    one fails (refused, unreachable), or after ATTEMPT_DELAY while one is still under way;
    the first to connect wins and the others are cancelled.

    Twisted's HostnameEndpoint waits its attempt delay (0.3 s) even after a failure, so a
    name such as localhost, whose first address (::1) refuses when the service listens on
    IPv4 only, cost every stream 0.3 s."""

    def __init__(self, reactor, host: str, port: int, timeout: float, dial=AddressEndpoint) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self._dial = dial  # one address's endpoint (tests give their own)

    def connect(self, factory) -> defer.Deferred:
        return _NameDial(self, factory).deferred

    def address_endpoint(self, address):
        host = address.host
        if isinstance(address, IPv6Address):
            if address.scopeID and "%" not in host:
                host = f"{host}%{address.scopeID}"  # a link-local address keeps its interface
            return self._dial(self.reactor, host, address.port, self.timeout, socket.AF_INET6)
        return self._dial(self.reactor, host, address.port, self.timeout, socket.AF_INET)


@implementer(IResolutionReceiver)
class _NameDial:
    """One connect of a NameEndpoint: the resolution, then the attempts."""

    def __init__(self, endpoint: NameEndpoint, factory) -> None:
        self.endpoint = endpoint
        self.reactor = endpoint.reactor
        self.factory = factory
        self.addresses: list = []
        self.attempts: list[defer.Deferred] = []
        self.failures: list[Failure] = []
        self.timer = None
        self.done = False
        self.deferred = defer.Deferred(self._cancel)
        self.reactor.nameResolver.resolveHostName(self, endpoint.host, endpoint.port)

    # IResolutionReceiver: called by the resolver, in the reactor's thread

    def resolutionBegan(self, resolution) -> None:  # noqa: N802 (Twisted's name)
        pass

    def addressResolved(self, address) -> None:  # noqa: N802 (Twisted's name)
        if isinstance(address, IPv4Address | IPv6Address):
            self.addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802 (Twisted's name)
        if self.done:
            return  # cancelled while resolving
        if not self.addresses:
            self._finish(Failure(error.DNSLookupError(f"no results for hostname lookup: {self.endpoint.host}")))
            return
        self._next()

    # the attempts

    def _next(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.done:
            return
        if not self.addresses:
            if not self.attempts:
                self._finish(self.failures[-1])
            return  # the last attempts are still under way
        attempt = self.endpoint.address_endpoint(self.addresses.pop(0)).connect(self.factory)
        self.attempts.append(attempt)
        # On loopback and near hosts it has often succeeded or failed already, and these run now.
        attempt.addCallbacks(self._won, self._failed, callbackArgs=(attempt,), errbackArgs=(attempt,))
        if not self.done and attempt in self.attempts and self.addresses:
            self.timer = self.reactor.callLater(ATTEMPT_DELAY, self._next)

    def _won(self, protocol, attempt) -> None:
        self.attempts.remove(attempt)
        self._finish(protocol)

    def _failed(self, failure: Failure, attempt) -> None:
        self.attempts.remove(attempt)
        if self.done:
            return  # cancelled by us: the winner, or the caller, decided
        self.failures.append(failure)
        self._next()

    def _finish(self, result) -> None:
        self._stop()
        if isinstance(result, Failure):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)

    def _stop(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.failures = []  # done with: a failure's traceback may lead back to us
        for attempt in list(self.attempts):
            attempt.cancel()

    def _cancel(self, _deferred) -> None:
        self._stop()  # the Deferred then fails with CancelledError
