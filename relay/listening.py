"""Public ports: a plain listenTCP, or, with --reuse-port, a socket several relay processes share.

SO_REUSEPORT lets every relay process on a host listen on the same public port; the kernel
hands each new client to one of them (a hash of its address). Linux lets only sockets of the
same user, that set SO_REUSEPORT too, join a port's group: another local user cannot take a
share of our clients. The processes must bind the same address (--public-interface): a
socket bound to one address takes every client of that address from a wildcard one.
"""

from __future__ import annotations

import socket

from twisted.internet import error
from twisted.internet.abstract import isIPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

BACKLOG = 50  # what reactor.listenTCP uses, so both ways queue the same


def listen_public(reactor, port: int, factory, interface: str = "", reuse_port: bool = False) -> IListeningPort:
    """Listen on `port` for `factory`; CannotListenError if the port is taken (by another user,
    or by anyone when reuse_port is off)."""
    if not reuse_port:
        return reactor.listenTCP(port, factory, interface=interface)
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            # getaddrinfo keeps a link-local address's scope (fe80::1%eth0), as listenTCP does.
            address = socket.getaddrinfo(
                interface or None, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST | socket.AI_PASSIVE
            )[0][4]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as e:
            raise error.CannotListenError(interface, port, e) from None
        sock.setblocking(False)
        # The reactor listens on its own duplicate of the descriptor; ours closes on return.
        return reactor.adoptStreamPort(sock.fileno(), family, factory)


def quiet_accept_errors(port, observer) -> None:
    """Send what Twisted's accept loop on `port` logs to `observer` (the relay's limited
    log) instead of the global log. Out of descriptors, that loop closes every client that
    is waiting and logs three lines for each (EMFILE), so a stranger that keeps connecting
    wrote three lines a connection. tcp.Port reads its logger from the instance at every
    accept; a port that has none (a test's) is left as it is."""
    logger = getattr(port, "_logger", None)
    if isinstance(logger, Logger):
        port._logger = Logger(namespace=logger.namespace, observer=observer)
