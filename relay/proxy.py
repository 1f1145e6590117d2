"""Reach the relay through a SOCKS5, SOCKS4(a) or HTTP CONNECT proxy.

`ProxyClientEndpoint` connects to the proxy, asks it for a tunnel to the relay and
then behaves like a TCP connection to the relay, so the agent wraps it in TLS exactly
as it wraps a direct connection. `parse_proxy_url` and `proxy_from_environment` read
`--proxy URL` and the curl-style environment variables.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

DEFAULT_PORT = 1080  # curl's default for every proxy scheme, http included
MAX_HTTP_HEAD = 16 * 1024

_SCHEMES = {
    "socks5": "socks5",
    "socks5h": "socks5",
    "socks4": "socks4",
    "socks4a": "socks4a",
    "http": "http",
}
_HANDSHAKE_NAMES = {
    "socks5": "SOCKS5",
    "socks4": "SOCKS4",
    "socks4a": "SOCKS4a",
    "http": "HTTP CONNECT",
}

SOCKS5_REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
SOCKS4_REPLIES = {
    0x5B: "request rejected or failed",
    0x5C: "request rejected because the proxy cannot reach the client's identd",
    0x5D: "request rejected because identd reports a different user id",
}
# A host name we put in a request line or SOCKS request verbatim: nothing that could
# end a line or smuggle a second header.
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


class ProxyError(Exception):
    """The proxy could not be used; str() is a credential-free sentence for the log."""


@dataclass(frozen=True)
class ProxyURL:
    """A parsed proxy URL; str() and repr() never show the credentials."""

    scheme: str  # "socks5" | "socks4a" | "socks4" | "http"
    host: str  # IPv6 without brackets
    port: int
    username: str | None = field(repr=False)
    password: str | None = field(repr=False)

    def __str__(self) -> str:
        userinfo = "***@" if self.username is not None else ""
        return f"{self.scheme}://{userinfo}{_host_port(self.host, self.port)}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _masked(url: str) -> str:
    # Hide everything up to the last "@": a password may itself hold "@", "/" or "#".
    scheme, _, rest = url.partition("://")
    userinfo = "***@" if "@" in rest else ""
    return f"{scheme}://{userinfo}{rest.rpartition('@')[2]}"


def parse_proxy_url(url: str) -> ProxyURL:
    """Parse a proxy URL as curl does; ValueError says what is wrong, without credentials."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text  # curl: a proxy without a scheme is an HTTP proxy
    shown = _masked(text)
    try:
        parts = urlsplit(text)
    except ValueError as e:  # e.g. an unclosed "[" around an IPv6 address
        raise ValueError(f"proxy URL {shown}: {e}") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        what = (
            "https:// proxies (TLS to the proxy) are"
            if parts.scheme.lower() == "https"
            else f"scheme {parts.scheme!r} is"
        )
        raise ValueError(
            f"proxy URL {shown}: {what} not supported; use socks5://, socks4a://, socks4:// or http://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy URL {shown}: expected scheme://[user[:password]@]host[:port] only")
    host = parts.hostname
    if not host:
        raise ValueError(f"proxy URL {shown}: no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"proxy URL {shown}: port must be a number from 1 to 65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if not username and password is None:
        username = None  # "socks5://@host" carries no credentials
    if scheme.startswith("socks4") and password is not None:
        # SOCKS4 sends only a user id; rather than drop a secret silently, say so.
        raise ValueError(
            f"proxy URL {shown}: SOCKS4 has no password; use {scheme}://USER@host:port"
        )
    if scheme == "socks5" and username is not None:
        if len(username.encode()) > 255 or len((password or "").encode()) > 255:
            raise ValueError(
                f"proxy URL {shown}: SOCKS5 user name and password are limited to 255 bytes"
            )
    if username is not None and "\0" in username:
        raise ValueError(f"proxy URL {shown}: the user name contains a NUL character")
    return ProxyURL(scheme, host, port, username, password)


def _env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    # curl reads the lowercase variable first; an empty value counts as unset.
    for key in (name.lower(), name.upper()):
        value = env.get(key, "").strip()
        if value:
            return key, value
    return None


def _no_proxy_matches(no_proxy: str, host: str) -> bool:
    # As curl's Curl_check_noproxy: "*" turns the proxy off only as the whole value, and
    # an entry is a bare name, address or CIDR block: one with a port, or an address in
    # brackets, matches nothing (curl compares it whole).
    if no_proxy == "*":
        return True
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in re.split(r"[,\s]+", no_proxy.strip()):
        if not entry:
            continue
        entry = entry.rstrip(".").lower()
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # a name never matches an IP literal
        else:
            entry = entry.lstrip(".")
            if entry and (host == entry or host.endswith("." + entry)):
                return True
    return False


def proxy_from_environment(
    target_host: str, target_port: int, env: Mapping[str, str] | None = None
) -> ProxyURL | None:
    """The proxy curl would use for https://target_host:target_port, or None.

    target_port does not change the answer (curl's NO_PROXY has no ports); it is
    taken so that callers describe the whole destination. ValueError names the
    variable whose value is not a usable proxy URL.
    """
    env = os.environ if env is None else env
    no_proxy = _env(env, "no_proxy")
    # The value as set, not stripped: curl's "*" is the whole value or nothing.
    if no_proxy is not None and _no_proxy_matches(env[no_proxy[0]], target_host):
        return None
    found = _env(env, "https_proxy") or _env(env, "all_proxy")
    if found is None:
        return None
    key, value = found
    try:
        return parse_proxy_url(value)
    except ValueError as e:
        raise ValueError(f"${key}: {e}") from None


# --- handshakes -----------------------------------------------------------------
#
# Each handshake is a generator: it writes through `write` and yields what it needs to
# read next, either an exact byte count or a terminator (read through it). The driver
# resumes it with those bytes, so framing across partial reads lives in one place. When
# the proxy hangs up mid-handshake the driver throws _ProxyClosed into it, so a
# handshake can say what the hang-up most likely means at that step.

_Need = int | bytes
_Handshake = Generator[_Need, bytes, None]


class _ProxyClosed(Exception):
    pass


def _host_bytes(host: str) -> bytes:
    """The relay's host name (not an IP literal) as sent to the proxy."""
    try:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError:
        name = b""
    if not _HOST_NAME.fullmatch(name.decode("ascii")):
        raise ProxyError(f"relay host name {host!r} cannot be sent to a proxy")
    return name


def _socks5(proxy: ProxyURL, host: str, port: int, write: Callable[[bytes], None]) -> _Handshake:
    target = _host_port(host, port)
    with_auth = proxy.username is not None
    # Offer exactly one method: with credentials, a proxy that would let us in without
    # them must still check them (that is what the operator configured).
    write(b"\x05\x01\x02" if with_auth else b"\x05\x01\x00")
    try:
        version, method = yield 2
    except _ProxyClosed:
        if with_auth:
            raise
        raise ProxyError(
            f"proxy {proxy} closed the connection when offered no authentication; "
            "it probably requires a username and password"
        ) from None
    if version != 5:
        raise ProxyError(f"proxy {proxy} is not a SOCKS5 proxy (reply version {version})")
    if method == 0xFF:
        if with_auth:
            raise ProxyError(f"proxy {proxy} does not accept username/password authentication")
        raise ProxyError(
            f"proxy {proxy} requires credentials; give them in the proxy URL "
            "(socks5://USER:PASSWORD@host:port)"
        )
    if method != (0x02 if with_auth else 0x00):
        raise ProxyError(
            f"proxy {proxy} chose SOCKS5 authentication method {method}, which was not offered"
        )
    if with_auth:
        user = (proxy.username or "").encode()
        password = (proxy.password or "").encode()
        write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)  # RFC 1929
        try:
            _, status = yield 2
        except _ProxyClosed:
            raise ProxyError(
                f"proxy {proxy} closed the connection on receiving the username/password; "
                "it probably rejected them"
            ) from None
        if status != 0:
            raise ProxyError(f"proxy {proxy} rejected the username/password")
    try:
        address = ipaddress.ip_address(host)
        atyp = b"\x01" if address.version == 4 else b"\x04"
        encoded = atyp + address.packed
    except ValueError:
        name = _host_bytes(host)  # the proxy resolves the relay's name
        encoded = b"\x03" + bytes([len(name)]) + name
    write(b"\x05\x01\x00" + encoded + port.to_bytes(2, "big"))
    version, reply, _, atyp_reply = yield 4
    if version != 5:
        raise ProxyError(f"proxy {proxy} is not a SOCKS5 proxy (reply version {version})")
    if reply != 0:
        reason = SOCKS5_REPLIES.get(reply, "unknown error")
        raise ProxyError(f"proxy {proxy} cannot reach {target}: {reason} (SOCKS5 reply {reply})")
    # Skip the bound address: its length depends on its type.
    if atyp_reply == 0x01:
        yield 4 + 2
    elif atyp_reply == 0x04:
        yield 16 + 2
    elif atyp_reply == 0x03:
        (length,) = yield 1
        yield length + 2
    else:
        raise ProxyError(
            f"proxy {proxy} sent a SOCKS5 reply with unknown address type {atyp_reply}"
        )


def _socks4(
    proxy: ProxyURL, host: str, port: int, write: Callable[[bytes], None], address: str | None
) -> _Handshake:
    """SOCKS4 with `address` (resolved here), or SOCKS4a naming the host when it is None."""
    target = _host_port(host, port)
    user = (proxy.username or "").encode()
    if address is None:
        # SOCKS4a: the invalid address 0.0.0.1 tells the proxy a host name follows.
        destination, name = b"\0\0\0\x01", _host_bytes(host) + b"\0"
    else:
        destination, name = ipaddress.IPv4Address(address).packed, b""
    write(b"\x04\x01" + port.to_bytes(2, "big") + destination + user + b"\0" + name)
    version, reply, *_ = yield 8
    if version != 0:
        raise ProxyError(f"proxy {proxy} is not a SOCKS4 proxy (reply version {version})")
    if reply != 0x5A:
        reason = SOCKS4_REPLIES.get(reply, "unknown error")
        raise ProxyError(f"proxy {proxy} cannot reach {target}: {reason} (SOCKS4 reply {reply})")


_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?: ([^\r\n]*))?")


def _http(proxy: ProxyURL, host: str, port: int, write: Callable[[bytes], None]) -> _Handshake:
    try:
        ipaddress.ip_address(host)
        name = host
    except ValueError:
        name = _host_bytes(host).decode("ascii")
    target = _host_port(name, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    with_auth = proxy.username is not None
    if with_auth:
        secret = f"{proxy.username}:{proxy.password or ''}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(secret).decode("ascii"))
    write("\r\n".join(lines).encode("ascii") + b"\r\n\r\n")
    head = yield b"\r\n\r\n"
    match = _STATUS_LINE.match(head)
    if match is None:
        raise ProxyError(f"proxy {proxy} sent a malformed answer to CONNECT (not HTTP)")
    status = int(match.group(1))
    # The reason phrase is the proxy's text: keep it printable and short for the log.
    phrase = re.sub(rb"[^\x20-\x7e]", b"?", match.group(2) or b"")[:80].decode("ascii").strip()
    said = f"HTTP {status} {phrase}".rstrip()
    if 200 <= status < 300:
        return
    if status == 407:
        if with_auth:
            raise ProxyError(f"proxy {proxy} rejected the username/password ({said})")
        raise ProxyError(
            f"proxy {proxy} requires authentication; give http://USER:PASSWORD@ in the proxy URL ({said})"
        )
    if status == 403:
        raise ProxyError(f"proxy {proxy} does not allow a connection to {target} ({said})")
    if status in (502, 503, 504):
        raise ProxyError(f"proxy {proxy} cannot reach {target} ({said})")
    raise ProxyError(f"proxy {proxy} refused CONNECT {target} ({said})")


# --- endpoint ---------------------------------------------------------------------


class _HandshakeProtocol(Protocol):
    """Runs the handshake, then stays as a thin forwarder to the caller's protocol.

    Forwarding is used rather than replacing `transport.protocol`: that attribute is
    not part of ITransport, and here the transport's protocol is HostnameEndpoint's own
    wrapper, not this one. The caller's protocol gets the real TCP transport itself, so
    its writes, producer registration and loseConnection go straight to the socket;
    only dataReceived and connectionLost pass through here. Half-close is not offered:
    TLS closes with close_notify, and an EOF from the proxy ends the connection.
    """

    def __init__(self, attempt: _Attempt) -> None:
        self._attempt = attempt
        self._buffer = bytearray()
        self._steps: _Handshake | None = None
        self._need: _Need = 0
        self.wrapped: Protocol | None = None

    def connectionMade(self) -> None:
        steps = self._steps = self._attempt.handshake_started(self)
        self._advance(lambda: next(steps))

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
        elif self._steps is not None:  # else the handshake failed and we are aborting
            self._buffer += data
            self._advance(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif (steps := self._steps) is not None:
            self._advance(lambda: steps.throw(_ProxyClosed()))

    def _advance(self, first: Callable[[], _Need] | None) -> None:
        assert self._steps is not None
        try:
            if first is not None:
                self._need = first()
            while (chunk := self._take()) is not None:
                self._need = self._steps.send(chunk)
        except StopIteration:
            self._steps = None
            self._attempt.established(self, bytes(self._buffer))
        except ProxyError as e:
            self._steps = None
            self._attempt.failed(e)
        except _ProxyClosed:
            self._steps = None
            self._attempt.failed(self._attempt.closed_error())

    def _take(self) -> bytes | None:
        """The bytes the handshake asked for, once they are all here."""
        need = self._need
        if isinstance(need, int):
            end = need if len(self._buffer) >= need else -1
        else:
            found = self._buffer.find(need)
            end = found + len(need) if found >= 0 else -1
            if end > MAX_HTTP_HEAD or (end < 0 and len(self._buffer) > MAX_HTTP_HEAD):
                raise ProxyError(
                    f"proxy {self._attempt.proxy} sent a reply header larger than 16 KiB"
                )
        if end < 0:
            return None
        chunk = bytes(self._buffer[:end])
        del self._buffer[:end]
        return chunk


class _HandshakeFactory(Factory):
    noisy = False  # one per connection attempt: our own lines say where it went

    def __init__(self, attempt: _Attempt) -> None:
        self._attempt = attempt

    def buildProtocol(self, addr: object) -> _HandshakeProtocol:
        return _HandshakeProtocol(self._attempt)


@implementer(IResolutionReceiver)
class _FirstAddress:
    """Collects the first address of a name resolution into a Deferred."""

    def __init__(self) -> None:
        self.deferred: Deferred[str | None] = Deferred()
        self._host: str | None = None

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if self._host is None:
            self._host = address.host

    def resolutionComplete(self) -> None:
        self.deferred.callback(self._host)


class _Attempt:
    """One connect(): resolve (SOCKS4 only), reach the proxy, handshake, hand over."""

    def __init__(
        self,
        reactor,
        proxy: ProxyURL,
        host: str,
        port: int,
        timeout: float,
        factory: IProtocolFactory,
    ) -> None:
        self._reactor = reactor
        self.proxy = proxy
        self._host = host
        self._port = port
        self._timeout = timeout
        self._factory = factory
        self._address: str | None = None  # the IPv4 address sent in a SOCKS4 request
        self._pending: Deferred | None = None  # name resolution or TCP connect in progress
        self._handshake: _HandshakeProtocol | None = None
        self._done = False
        self.result: Deferred[Protocol] = Deferred(self._cancel)
        # One deadline for everything: resolving, connecting and the handshake.
        self._timer = reactor.callLater(timeout, self._timed_out)

    @property
    def _target(self) -> str:
        return _host_port(self._host, self._port)

    def start(self) -> None:
        try:
            version: int | None = ipaddress.ip_address(self._host).version
        except ValueError:
            version = None
            try:
                _host_bytes(self._host)
            except ProxyError as e:
                self.failed(e)
                return
        if self.proxy.scheme.startswith("socks4") and version == 6:
            self.failed(
                ProxyError(
                    f"proxy {self.proxy} is {self.proxy.scheme}, which cannot reach the IPv6 address {self._target}"
                )
            )
        elif self.proxy.scheme == "socks4" and version is None:
            # SOCKS4 carries only an IPv4 address, so the relay's name is resolved here.
            receiver = _FirstAddress()
            self._pending = receiver.deferred
            self._reactor.nameResolver.resolveHostName(receiver, self._host, 0, [IPv4Address])
            receiver.deferred.addCallbacks(self._resolved, lambda _: self._resolved(None))
        else:
            self._address = self._host if version == 4 else None
            self._connect()

    def _resolved(self, address: str | None) -> None:
        self._pending = None
        if self._done:
            return
        if address is None:
            self.failed(
                ProxyError(
                    f"cannot resolve {self._host} to an IPv4 address for proxy {self.proxy} "
                    "(socks4a:// or socks5:// let the proxy resolve it)"
                )
            )
            return
        self._address = address
        self._connect()

    def _connect(self) -> None:
        endpoint = HostnameEndpoint(self._reactor, self.proxy.host, self.proxy.port)
        self._pending = endpoint.connect(_HandshakeFactory(self))
        self._pending.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, _: _HandshakeProtocol) -> None:
        self._pending = None

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._done:
            return
        if failure.check(ConnectionRefusedError):
            reason = "connection refused"
        elif failure.check(DNSLookupError):
            reason = f"cannot resolve {self.proxy.host}"
        else:
            reason = failure.getErrorMessage()
        self.failed(ProxyError(f"cannot connect to proxy {self.proxy}: {reason}"))

    def handshake_started(self, handshake: _HandshakeProtocol) -> _Handshake:
        self._handshake = handshake
        write = handshake.transport.write
        if self.proxy.scheme == "socks5":
            return _socks5(self.proxy, self._host, self._port, write)
        if self.proxy.scheme == "http":
            return _http(self.proxy, self._host, self._port, write)
        return _socks4(self.proxy, self._host, self._port, write, self._address)

    def closed_error(self) -> ProxyError:
        kind = _HANDSHAKE_NAMES[self.proxy.scheme]
        return ProxyError(
            f"proxy {self.proxy} closed the connection during the {kind} handshake for {self._target}"
        )

    def established(self, handshake: _HandshakeProtocol, leftover: bytes) -> None:
        if self._done:
            return
        self._finish()
        self._handshake = None  # it refers to us (_attempt) and lives on as the forwarder
        transport = handshake.transport
        try:
            protocol = self._factory.buildProtocol(transport.getPeer())
            if protocol is None:
                raise NoProtocol()
        except Exception:
            transport.abortConnection()
            self.result.errback()
            return
        handshake.wrapped = protocol
        protocol.makeConnection(transport)
        self.result.callback(protocol)
        # Bytes the proxy sent after its reply in the same read belong to the relay.
        if leftover:
            handshake.dataReceived(leftover)

    def failed(self, error: ProxyError) -> None:
        if self._done:
            return
        self._finish()
        self._abort()
        self.result.errback(error)

    def _finish(self) -> None:
        self._done = True
        # Dropped, not only cancelled: once fired, the DelayedCall still holds our
        # _timed_out, a reference cycle with us.
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _abort(self) -> None:
        # The handshake protocol refers to us (_attempt): once done, we let go of it.
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.transport.abortConnection()
        elif self._pending is not None:
            self._pending.cancel()

    def _timed_out(self) -> None:
        if self.proxy.scheme == "socks4" and self._address is None:
            message = (
                f"cannot resolve {self._host} for proxy {self.proxy} within {self._timeout:g} s"
            )
        elif self._handshake is None:
            message = f"cannot connect to proxy {self.proxy} within {self._timeout:g} s"
        else:
            message = f"proxy {self.proxy} did not answer within {self._timeout:g} s (connecting to {self._target})"
        self.failed(ProxyError(message))

    def _cancel(self, _: Deferred) -> None:
        # Deferred.cancel() errbacks with CancelledError after this returns; _done keeps
        # the aborted connection from firing the Deferred first.
        self._finish()
        self._abort()


@implementer(IStreamClientEndpoint)
class ProxyClientEndpoint:
    """Connects to host:port through `proxy`; the connection then carries only the relay's bytes."""

    def __init__(
        self, reactor, proxy: ProxyURL, host: str, port: int, timeout: float = 30.0
    ) -> None:
        self._reactor = reactor
        self._proxy = proxy
        self._host = host
        self._port = port
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<ProxyClientEndpoint {_host_port(self._host, self._port)} via {self._proxy}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[Protocol]:
        attempt = _Attempt(
            self._reactor, self._proxy, self._host, self._port, self._timeout, factory
        )
        attempt.start()
        return attempt.result
