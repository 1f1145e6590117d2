"""Tests of relay.proxy: URL and environment parsing, each handshake in memory, and
real round trips through pproxy (a SOCKS4/SOCKS5/HTTP proxy run as a subprocess)."""

from __future__ import annotations

import base64
import ipaddress
import socket

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, NoProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.wire import Echo
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.proxy import (
    MAX_HTTP_HEAD,
    SOCKS4_REPLIES,
    SOCKS5_REPLIES,
    ProxyClientEndpoint,
    ProxyError,
    ProxyURL,
    parse_proxy_url,
    proxy_from_environment,
)

USER = "alice-user"
PASSWORD = "s3cr3t-pw"
SECRETS = (USER, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
RELAY = "relay.example.com"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# --- parse_proxy_url ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("socks5://127.0.0.1:1080", ProxyURL("socks5", "127.0.0.1", 1080, None, None)),
        ("socks5h://proxy:9050", ProxyURL("socks5", "proxy", 9050, None, None)),
        ("SOCKS5://Proxy.Example:1", ProxyURL("socks5", "proxy.example", 1, None, None)),
        ("socks5://u:p@h:2", ProxyURL("socks5", "h", 2, "u", "p")),
        ("socks5://a%40b:p%3A%2F%40x@h:2", ProxyURL("socks5", "h", 2, "a@b", "p:/@x")),
        ("socks5://u:@h", ProxyURL("socks5", "h", 1080, "u", "")),
        ("socks5://@h", ProxyURL("socks5", "h", 1080, None, None)),
        ("socks4a://alice@h:1081", ProxyURL("socks4a", "h", 1081, "alice", None)),
        ("socks4://h", ProxyURL("socks4", "h", 1080, None, None)),
        ("http://h", ProxyURL("http", "h", 1080, None, None)),
        ("http://u:p@h:3128/", ProxyURL("http", "h", 3128, "u", "p")),
        ("proxy.corp:3128", ProxyURL("http", "proxy.corp", 3128, None, None)),
        ("u:p@proxy.corp", ProxyURL("http", "proxy.corp", 1080, "u", "p")),
        ("http://[2001:db8::1]:8080", ProxyURL("http", "2001:db8::1", 8080, None, None)),
        ("socks5://[::1]", ProxyURL("socks5", "::1", 1080, None, None)),
        ("  http://h:1  ", ProxyURL("http", "h", 1, None, None)),
    ],
)
def test_parse_proxy_url(url: str, expected: ProxyURL) -> None:
    assert parse_proxy_url(url) == expected  # eq compares username and password too


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            f"https://{USER}:{PASSWORD}@h:443",
            "https:// proxies (TLS to the proxy) are not supported",
        ),
        ("ftp://h:21", "scheme 'ftp' is not supported"),
        ("socks://h", "scheme 'socks' is not supported"),
        (f"socks5://{USER}:{PASSWORD}@h:99999", "port must be a number from 1 to 65535"),
        (f"socks5://{USER}:{PASSWORD}@h:0", "port must be a number from 1 to 65535"),
        (f"socks5://{USER}:{PASSWORD}@h:http", "port must be a number from 1 to 65535"),
        (f"http://{USER}:{PASSWORD}@:8080", "no host"),
        (
            f"http://{USER}:{PASSWORD}@h:8080/path",
            "expected scheme://[user[:password]@]host[:port] only",
        ),
        (
            f"http://{USER}:{PASSWORD}@h:8080?q",
            "expected scheme://[user[:password]@]host[:port] only",
        ),
        (f"socks4://{USER}:{PASSWORD}@h", "SOCKS4 has no password; use socks4://USER@host:port"),
        (f"socks4a://{USER}:{PASSWORD}@h", "SOCKS4 has no password; use socks4a://USER@host:port"),
        (f"socks5://{USER}:{'x' * 256}@h", "limited to 255 bytes"),
        ("socks4a://a%00b@h", "NUL"),
        (f"http://{USER}:{PASSWORD}@[::1", "Invalid IPv6 URL"),
        # An unencoded "/" in the password: still masked in the message.
        (f"http://{USER}:{PASSWORD}/x@h", "expected scheme://"),
    ],
)
def test_parse_proxy_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_proxy_url(url)
    assert message in str(info.value)
    assert str(info.value).startswith("proxy URL ")
    assert_no_secret(str(info.value))


def test_proxy_url_never_shows_credentials() -> None:
    proxy = parse_proxy_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    assert str(proxy) == "socks5://***@127.0.0.1:1080"
    assert repr(proxy) == "ProxyURL(scheme='socks5', host='127.0.0.1', port=1080)"
    assert str(parse_proxy_url("http://[::1]:3128")) == "http://[::1]:3128"
    assert str(parse_proxy_url("socks4a://bob@h:1")) == "socks4a://***@h:1"


# --- proxy_from_environment -------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "host", "expected"),
    [
        ({}, RELAY, None),
        ({"HTTPS_PROXY": "http://a:1"}, RELAY, "http://a:1"),
        ({"https_proxy": "http://a:1"}, RELAY, "http://a:1"),
        (
            {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1"},
            RELAY,
            "http://lower:1",
        ),
        ({"ALL_PROXY": "socks5://b:2"}, RELAY, "socks5://b:2"),
        (
            {"ALL_PROXY": "socks5://upper:2", "all_proxy": "socks5://lower:2"},
            RELAY,
            "socks5://lower:2",
        ),
        ({"ALL_PROXY": "socks5://b:2", "HTTPS_PROXY": "http://a:1"}, RELAY, "http://a:1"),
        # An empty value counts as unset, so the next variable is used.
        ({"https_proxy": "", "HTTPS_PROXY": "http://a:1"}, RELAY, "http://a:1"),
        ({"HTTPS_PROXY": "", "ALL_PROXY": "socks5://b:2"}, RELAY, "socks5://b:2"),
        # HTTP_PROXY is for http:// destinations only; the tunnel is TLS.
        ({"HTTP_PROXY": "http://a:1", "http_proxy": "http://a:1"}, RELAY, None),
        ({"HTTPS_PROXY": "proxy.corp:3128"}, RELAY, "http://proxy.corp:3128"),
        # NO_PROXY
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "*"}, RELAY, None),
        # "*" is the whole value or nothing, as in curl: in a list, or with blanks, it
        # matches no host.
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "other, *"}, RELAY, "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": " * "}, RELAY, "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": RELAY}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "RELAY.Example.COM"}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "example.com"}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": ".example.com"}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": ".example.com"}, "example.com", None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "ample.com"}, RELAY, "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "relay.example"}, RELAY, "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "a.relay.example.com"}, RELAY, "socks5://b:2"),
        # curl compares an entry whole: one with a port never matches.
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "x.org, example.com:443"}, RELAY, "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "x.org example.com"}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "example.com."}, RELAY + ".", None),
        (
            {"ALL_PROXY": "socks5://b:2", "no_proxy": "x.org", "NO_PROXY": "example.com"},
            RELAY,
            "socks5://b:2",
        ),
        ({"ALL_PROXY": "socks5://b:2", "no_proxy": "", "NO_PROXY": "example.com"}, RELAY, None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "10.1.2.3"}, "10.1.2.3", None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "10.1.2.3"}, "10.1.2.30", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "1.2.3"}, "10.1.2.3", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "10.0.0.0/8"}, "10.1.2.3", None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "10.0.0.0/16"}, "10.1.2.3", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "10.1.2.3:7835"}, "10.1.2.3", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "::1"}, "::1", None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "[::1]:7835"}, "::1", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "[::1]"}, "::1", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "2001:db8::/32"}, "2001:db8::5", None),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "2001:db8::/32"}, "2001:db9::5", "socks5://b:2"),
        # A name never matches an IP literal, and the reverse: curl does not resolve.
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "localhost"}, "127.0.0.1", "socks5://b:2"),
        ({"ALL_PROXY": "socks5://b:2", "NO_PROXY": "127.0.0.1"}, "localhost", "socks5://b:2"),
    ],
)
def test_proxy_from_environment(env: dict[str, str], host: str, expected: str | None) -> None:
    found = proxy_from_environment(host, 7835, env)
    assert found == (parse_proxy_url(expected) if expected else None)


def test_proxy_from_environment_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks5h://127.0.0.1:9050")
    assert proxy_from_environment(RELAY, 443) == ProxyURL("socks5", "127.0.0.1", 9050, None, None)


def test_proxy_from_environment_names_bad_variable() -> None:
    with pytest.raises(ValueError) as info:
        proxy_from_environment(RELAY, 443, {"https_proxy": f"https://{USER}:{PASSWORD}@h"})
    assert str(info.value).startswith("$https_proxy: proxy URL https://***@h:")
    assert_no_secret(str(info.value))


# --- in-memory handshakes -------------------------------------------------------------


class Recorder(Protocol):
    """The caller's protocol: records what arrives and when the connection ends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Failure | None = None
        self.waiting: list[tuple[int, Deferred[bytes]]] = []
        self.on_lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for size, d in list(self.waiting):
            if len(self.data) >= size:
                self.waiting.remove((size, d))
                d.callback(bytes(self.data))

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        self.on_lost.callback(None)  # a Failure passed to callback() would errback

    def received(self, size: int) -> Deferred[bytes]:
        """Fires with everything received once at least `size` bytes are here."""
        d: Deferred[bytes] = Deferred()
        if len(self.data) >= size:
            d.callback(bytes(self.data))
        else:
            self.waiting.append((size, d))
        return d


@implementer(IPushProducer)
class FlowRecorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class FakeResolver:
    """IHostnameResolver answering from a table; records what was asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[tuple[str, object]] = []

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        self.asked.append((hostName, addressTypes))
        receiver.resolutionBegan(None)
        for host in self.table.get(hostName, [hostName] if _is_ip(hostName) else []):
            receiver.addressResolved(IPv4Address("TCP", host, portNumber))
        receiver.resolutionComplete()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Harness:
    """ProxyClientEndpoint on a MemoryReactorClock; plays the proxy through a StringTransport."""

    def __init__(
        self,
        url: str,
        host: str = RELAY,
        port: int = 443,
        resolver: FakeResolver | None = None,
        factory: Factory | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.installNameResolver(resolver or FakeResolver({}))
        endpoint = ProxyClientEndpoint(self.reactor, parse_proxy_url(url), host, port)
        self.deferred = endpoint.connect(factory or Factory.forProtocol(Recorder))
        self.results: list[object] = []
        self.deferred.addBoth(self.results.append)
        self.transport: StringTransport | None = None

    def proxy_accepts(self) -> None:
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        assert (host, port) == ("127.0.0.1", 1080)
        self.proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.proto.makeConnection(self.transport)

    def sent(self) -> bytes:
        assert self.transport is not None
        data = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data: bytes, bytewise: bool = False) -> None:
        for chunk in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
            self.proto.dataReceived(chunk)

    def proxy_closes(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))

    @property
    def pending(self) -> bool:
        return not self.results

    def protocol(self) -> Recorder:
        [result] = self.results
        assert isinstance(result, Recorder), result
        return result

    def error(self) -> str:
        """The ProxyError the connect failed with; also checks it leaks no credential."""
        [result] = self.results
        assert isinstance(result, Failure), result
        assert result.check(ProxyError), result
        text = str(result.value)
        assert_no_secret(text)
        assert_no_secret(repr(result.value))
        if self.transport is not None:
            assert self.transport.disconnecting  # the connection to the proxy is aborted
        return text


def port_bytes(port: int) -> bytes:
    return port.to_bytes(2, "big")


SOCKS5_OK_V4 = b"\x05\x00\x00\x01" + bytes([10, 0, 0, 1]) + port_bytes(5555)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("192.0.2.1", b"\x01" + bytes([192, 0, 2, 1])),
        ("2001:db8::1", b"\x04" + ipaddress.IPv6Address("2001:db8::1").packed),
        (RELAY, b"\x03" + bytes([len(RELAY)]) + RELAY.encode()),
    ],
)
def test_socks5_without_auth(host: str, address: bytes) -> None:
    h = Harness("socks5://127.0.0.1:1080", host=host)
    assert h.reactor.tcpClients and h.pending
    h.proxy_accepts()
    assert h.sent() == b"\x05\x01\x00"
    h.reply(b"\x05\x00")
    assert h.sent() == b"\x05\x01\x00" + address + port_bytes(443)
    assert h.pending
    h.reply(SOCKS5_OK_V4 + b"from relay")
    app = h.protocol()
    assert app.data == b"from relay"
    assert app.transport is h.transport


def test_socks5_with_auth() -> None:
    h = Harness(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    h.proxy_accepts()
    assert h.sent() == b"\x05\x01\x02"  # only username/password is offered
    h.reply(b"\x05\x02")
    assert h.sent() == b"\x01\x0a" + USER.encode() + b"\x09" + PASSWORD.encode()
    assert h.sent() == b""
    h.reply(b"\x01\x00")
    assert h.sent() == b"\x05\x01\x00\x03\x11" + RELAY.encode() + port_bytes(443)
    h.reply(SOCKS5_OK_V4)
    assert h.protocol().data == b""


@pytest.mark.parametrize(
    "bound",
    [
        b"\x01" + bytes(4) + port_bytes(1),
        b"\x04" + bytes(16) + port_bytes(1),
        b"\x03\x0bproxy.local" + port_bytes(1),
        b"\x03\x00" + port_bytes(1),
    ],
    ids=["ipv4", "ipv6", "domain", "empty-domain"],
)
def test_socks5_reply_framing_byte_at_a_time(bound: bytes) -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00", bytewise=True)
    reply = b"\x05\x00\x00" + bound
    for i in range(len(reply)):
        assert h.pending, f"fired after {i} of {len(reply)} reply bytes"
        h.reply(reply[i : i + 1])
    app = h.protocol()
    assert app.data == b""
    h.reply(b"\x16\x03\x01 tls bytes")
    assert app.data == b"\x16\x03\x01 tls bytes"


def test_socks5_extra_bytes_in_the_same_read_reach_the_protocol() -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00")
    h.reply(b"\x05\x00\x00\x03\x01x" + port_bytes(1) + b"\x16\x03\x01" + b"\x05\x00")
    assert h.protocol().data == b"\x16\x03\x01\x05\x00"


@pytest.mark.parametrize("code", [*SOCKS5_REPLIES, 0x09, 0xFF])
def test_socks5_reply_codes(code: int) -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00")
    h.reply(bytes([5, code, 0, 1]) + bytes(6))
    reason = SOCKS5_REPLIES.get(code, "unknown error")
    assert (
        h.error()
        == f"proxy socks5://127.0.0.1:1080 cannot reach {RELAY}:443: {reason} (SOCKS5 reply {code})"
    )


def test_socks5_refused_message_reads_well() -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00" + b"\x05\x05\x00\x01" + bytes(6))
    assert (
        h.error()
        == f"proxy socks5://127.0.0.1:1080 cannot reach {RELAY}:443: connection refused (SOCKS5 reply 5)"
    )


def test_socks5_credentials_rejected() -> None:
    h = Harness(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x02")
    h.reply(b"\x01\x01")
    assert h.error() == "proxy socks5://***@127.0.0.1:1080 rejected the username/password"


def test_socks5_credentials_required() -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\xff")
    assert "requires credentials" in h.error()


def test_socks5_username_password_not_accepted() -> None:
    h = Harness(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\xff")
    assert (
        h.error()
        == "proxy socks5://***@127.0.0.1:1080 does not accept username/password authentication"
    )


@pytest.mark.parametrize(
    ("url", "replies", "message"),
    [
        (
            "socks5://127.0.0.1:1080",
            [b"HTTP/1.1 400 Bad"],
            "is not a SOCKS5 proxy (reply version 72)",
        ),
        (
            "socks5://127.0.0.1:1080",
            [b"\x05\x02"],
            "chose SOCKS5 authentication method 2, which was not offered",
        ),
        (
            "socks5://127.0.0.1:1080",
            [b"\x05\x00", b"\x04\x00\x00\x01"],
            "is not a SOCKS5 proxy (reply version 4)",
        ),
        ("socks5://127.0.0.1:1080", [b"\x05\x00", b"\x05\x00\x00\x07"], "unknown address type 7"),
    ],
)
def test_socks5_protocol_errors(url: str, replies: list[bytes], message: str) -> None:
    h = Harness(url)
    h.proxy_accepts()
    for reply in replies:
        h.reply(reply)
    assert message in h.error()


@pytest.mark.parametrize(
    ("url", "replies", "message"),
    [
        (
            "socks5://127.0.0.1:1080",
            [],
            "proxy socks5://127.0.0.1:1080 closed the connection when offered no authentication; "
            "it probably requires a username and password",
        ),
        (
            f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080",
            [],
            f"proxy socks5://***@127.0.0.1:1080 closed the connection during the SOCKS5 handshake for {RELAY}:443",
        ),
        (
            f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080",
            [b"\x05\x02"],
            "proxy socks5://***@127.0.0.1:1080 closed the connection on receiving the username/password; "
            "it probably rejected them",
        ),
        (
            "socks5://127.0.0.1:1080",
            [b"\x05\x00", b"\x05\x00\x00\x01\x00"],
            f"proxy socks5://127.0.0.1:1080 closed the connection during the SOCKS5 handshake for {RELAY}:443",
        ),
        (
            "socks4a://127.0.0.1:1080",
            [b"\x00"],
            f"proxy socks4a://127.0.0.1:1080 closed the connection during the SOCKS4a handshake for {RELAY}:443",
        ),
        (
            "http://127.0.0.1:1080",
            [b"HTTP/1.1 200 OK\r\n"],
            f"proxy http://127.0.0.1:1080 closed the connection during the HTTP CONNECT handshake for {RELAY}:443",
        ),
    ],
)
def test_proxy_closes_during_handshake(url: str, replies: list[bytes], message: str) -> None:
    h = Harness(url)
    h.proxy_accepts()
    for reply in replies:
        h.reply(reply)
    assert h.pending
    h.proxy_closes()
    assert h.error() == message


def test_socks4_resolves_the_name_locally_to_ipv4() -> None:
    resolver = FakeResolver({RELAY: ["203.0.113.5", "203.0.113.6"]})
    h = Harness(f"socks4://{USER}@127.0.0.1:1080", resolver=resolver)
    assert resolver.asked[0] == (RELAY, [IPv4Address])
    h.proxy_accepts()
    assert (
        h.sent() == b"\x04\x01" + port_bytes(443) + bytes([203, 0, 113, 5]) + USER.encode() + b"\0"
    )
    h.reply(b"\x00\x5a" + bytes(6) + b"relay", bytewise=True)
    assert h.protocol().data == b"relay"


def test_socks4_ipv4_literal_is_not_resolved() -> None:
    resolver = FakeResolver({})
    h = Harness("socks4://127.0.0.1:1080", host="192.0.2.9", port=7835, resolver=resolver)
    assert ("192.0.2.9", [IPv4Address]) not in resolver.asked
    h.proxy_accepts()
    assert h.sent() == b"\x04\x01" + port_bytes(7835) + bytes([192, 0, 2, 9]) + b"\0"


def test_socks4_name_that_does_not_resolve() -> None:
    h = Harness("socks4://127.0.0.1:1080", resolver=FakeResolver({}))
    assert h.reactor.tcpClients == []
    assert h.error() == (
        f"cannot resolve {RELAY} to an IPv4 address for proxy socks4://127.0.0.1:1080 "
        "(socks4a:// or socks5:// let the proxy resolve it)"
    )


@pytest.mark.parametrize("scheme", ["socks4", "socks4a"])
def test_socks4_cannot_reach_ipv6(scheme: str) -> None:
    h = Harness(f"{scheme}://{USER}@127.0.0.1:1080", host="2001:db8::1")
    assert h.reactor.tcpClients == []
    assert h.error() == (
        f"proxy {scheme}://***@127.0.0.1:1080 is {scheme}, which cannot reach the IPv6 address [2001:db8::1]:443"
    )


def test_socks4a_sends_the_name() -> None:
    h = Harness(f"socks4a://{USER}@127.0.0.1:1080")
    h.proxy_accepts()
    expected = (
        b"\x04\x01"
        + port_bytes(443)
        + b"\0\0\0\x01"
        + USER.encode()
        + b"\0"
        + RELAY.encode()
        + b"\0"
    )
    assert h.sent() == expected
    h.reply(b"\x00\x5a" + bytes(6))
    assert h.protocol().data == b""


def test_socks4a_sends_an_ipv4_literal_as_an_address() -> None:
    h = Harness("socks4a://127.0.0.1:1080", host="192.0.2.9")
    h.proxy_accepts()
    assert h.sent() == b"\x04\x01" + port_bytes(443) + bytes([192, 0, 2, 9]) + b"\0"


@pytest.mark.parametrize("code", [*SOCKS4_REPLIES, 0x5E])
def test_socks4_reply_codes(code: int) -> None:
    h = Harness("socks4a://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(bytes([0, code]) + bytes(6))
    reason = SOCKS4_REPLIES.get(code, "unknown error")
    assert (
        h.error()
        == f"proxy socks4a://127.0.0.1:1080 cannot reach {RELAY}:443: {reason} (SOCKS4 reply {code})"
    )


def test_socks4_wrong_reply_version() -> None:
    h = Harness("socks4a://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00" + bytes(6))
    assert "is not a SOCKS4 proxy (reply version 5)" in h.error()


@pytest.mark.parametrize(
    ("url", "host", "expected"),
    [
        (
            "http://127.0.0.1:1080",
            RELAY,
            f"CONNECT {RELAY}:443 HTTP/1.1\r\nHost: {RELAY}:443\r\n\r\n",
        ),
        (
            f"http://{USER}:{PASSWORD}@127.0.0.1:1080",
            RELAY,
            f"CONNECT {RELAY}:443 HTTP/1.1\r\nHost: {RELAY}:443\r\n"
            f"Proxy-Authorization: Basic {base64.b64encode(f'{USER}:{PASSWORD}'.encode()).decode()}\r\n\r\n",
        ),
        (
            "http://127.0.0.1:1080",
            "2001:db8::1",
            "CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
        ),
        (
            "http://127.0.0.1:1080",
            "192.0.2.1",
            "CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n",
        ),
    ],
)
def test_http_connect_request(url: str, host: str, expected: str) -> None:
    h = Harness(url, host=host)
    h.proxy_accepts()
    assert h.sent() == expected.encode()
    h.reply(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert h.protocol().data == b""


def test_http_reply_byte_at_a_time_with_extra_bytes() -> None:
    h = Harness("http://127.0.0.1:1080")
    h.proxy_accepts()
    head = b"HTTP/1.0 200 OK\r\nVia: 1.1 squid\r\n\r\n"
    for i in range(len(head)):
        assert h.pending, f"fired after {i} of {len(head)} bytes"
        h.reply(head[i : i + 1])
    assert h.protocol().data == b""
    h2 = Harness("http://127.0.0.1:1080")
    h2.proxy_accepts()
    h2.reply(head + b"relay\r\n\r\nbytes")
    assert h2.protocol().data == b"relay\r\n\r\nbytes"


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        (
            "http://127.0.0.1:1080",
            b"HTTP/1.1 407 Proxy Authentication Required",
            "proxy http://127.0.0.1:1080 requires authentication; give http://USER:PASSWORD@ in the proxy URL "
            "(HTTP 407 Proxy Authentication Required)",
        ),
        (
            f"http://{USER}:{PASSWORD}@127.0.0.1:1080",
            b"HTTP/1.1 407 Proxy Authentication Required",
            "proxy http://***@127.0.0.1:1080 rejected the username/password (HTTP 407 Proxy Authentication Required)",
        ),
        (
            "http://127.0.0.1:1080",
            b"HTTP/1.1 403 Forbidden",
            f"proxy http://127.0.0.1:1080 does not allow a connection to {RELAY}:443 (HTTP 403 Forbidden)",
        ),
        (
            "http://127.0.0.1:1080",
            b"HTTP/1.1 502 Bad Gateway",
            f"proxy http://127.0.0.1:1080 cannot reach {RELAY}:443 (HTTP 502 Bad Gateway)",
        ),
        (
            "http://127.0.0.1:1080",
            b"HTTP/1.1 500 Internal \x1b[31mError",
            f"proxy http://127.0.0.1:1080 refused CONNECT {RELAY}:443 (HTTP 500 Internal ?[31mError)",
        ),
        (
            "http://127.0.0.1:1080",
            b"HTTP/1.1 405",
            f"proxy http://127.0.0.1:1080 refused CONNECT {RELAY}:443 (HTTP 405)",
        ),
        (
            "http://127.0.0.1:1080",
            b"SSH-2.0-OpenSSH_9.6",
            "proxy http://127.0.0.1:1080 sent a malformed answer to CONNECT (not HTTP)",
        ),
    ],
)
def test_http_statuses(url: str, status: bytes, message: str) -> None:
    h = Harness(url)
    h.proxy_accepts()
    h.reply(status + b"\r\nContent-Length: 0\r\n\r\n")
    assert h.error() == message


@pytest.mark.parametrize(("size", "accepted"), [(MAX_HTTP_HEAD, True), (MAX_HTTP_HEAD + 1, False)])
def test_http_reply_head_is_capped(size: int, accepted: bool) -> None:
    h = Harness("http://127.0.0.1:1080")
    h.proxy_accepts()
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    h.reply(start + b"a" * (size - len(start) - 4) + b"\r\n\r\n")
    if accepted:
        h.protocol()
    else:
        assert h.error() == "proxy http://127.0.0.1:1080 sent a reply header larger than 16 KiB"


def test_http_reply_head_without_end_is_capped() -> None:
    h = Harness("http://127.0.0.1:1080")
    h.proxy_accepts()
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    h.reply(start + b"a" * (MAX_HTTP_HEAD - len(start)))
    assert h.pending
    h.reply(b"a")
    assert h.error() == "proxy http://127.0.0.1:1080 sent a reply header larger than 16 KiB"


@pytest.mark.parametrize(
    "host", ["relay.example.com\r\nX-Evil: 1", "a b", "", "x" * 256, "ü" * 64 + ".example"]
)
def test_unusable_relay_host_name_is_refused_before_connecting(host: str) -> None:
    h = Harness("http://127.0.0.1:1080", host=host)
    assert h.reactor.tcpClients == []
    assert "cannot be sent to a proxy" in h.error()


def test_idna_host_name() -> None:
    h = Harness("socks5://127.0.0.1:1080", host="bücher.example")
    h.proxy_accepts()
    assert h.sent() == b"\x05\x01\x00"
    h.reply(b"\x05\x00")
    name = b"xn--bcher-kva.example"
    assert h.sent() == b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port_bytes(443)


# --- endpoint mechanics -------------------------------------------------------------


def test_wrapped_protocol_gets_the_real_transport() -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00" + SOCKS5_OK_V4)
    h.sent()
    app = h.protocol()
    app.transport.write(b"to relay")
    assert h.sent() == b"to relay"
    producer = object()
    app.transport.registerProducer(producer, True)
    assert h.transport.producer is producer
    app.transport.loseConnection()
    assert h.transport.disconnecting
    assert app.lost is None
    h.proxy_closes()
    assert app.lost is not None and app.lost.check(ConnectionDone)


def test_timer_is_cancelled_once_connected() -> None:
    h = Harness("socks5://127.0.0.1:1080")
    h.proxy_accepts()
    h.reply(b"\x05\x00" + SOCKS5_OK_V4)
    app = h.protocol()
    assert not [c for c in h.reactor.getDelayedCalls() if c.active()]
    h.reactor.advance(3600)
    assert not h.transport.disconnecting
    assert app.lost is None


def test_timeout_during_handshake() -> None:
    h = Harness(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    h.proxy_accepts()
    h.reactor.advance(29.9)
    assert h.pending and not h.transport.disconnecting
    h.reactor.advance(0.1)
    assert h.error() == (
        f"proxy socks5://***@127.0.0.1:1080 did not answer within 30 s (connecting to {RELAY}:443)"
    )
    h.proxy_closes()  # the aborted connection ends later: the result must not change
    assert len(h.results) == 1


def test_timeout_while_connecting_to_the_proxy() -> None:
    h = Harness(f"http://{USER}:{PASSWORD}@127.0.0.1:1080")
    h.reactor.advance(29.9)
    assert h.pending
    h.reactor.advance(0.1)
    assert h.error() == "cannot connect to proxy http://***@127.0.0.1:1080 within 30 s"
    assert h.reactor.connectors[-1].stoppedConnecting


def test_timeout_while_resolving_for_socks4() -> None:
    class Silent(FakeResolver):
        def resolveHostName(self, receiver, hostName, *args, **kwargs):
            receiver.resolutionBegan(None)  # and never completes

    h = Harness("socks4://127.0.0.1:1080", resolver=Silent({}))
    h.reactor.advance(30)
    assert h.error() == f"cannot resolve {RELAY} for proxy socks4://127.0.0.1:1080 within 30 s"
    assert h.reactor.tcpClients == []


def test_proxy_refuses_the_connection() -> None:
    h = Harness(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080")
    _, _, factory, _, _ = h.reactor.tcpClients[-1]
    factory.clientConnectionFailed(h.reactor.connectors[-1], Failure(ConnectionRefusedError()))
    h.reactor.advance(1)  # HostnameEndpoint gives up at its next attempt tick
    assert h.error() == "cannot connect to proxy socks5://***@127.0.0.1:1080: connection refused"


def test_cancel_during_handshake_aborts() -> None:
    h = Harness("http://127.0.0.1:1080")
    h.proxy_accepts()
    h.deferred.cancel()
    [result] = h.results
    assert isinstance(result, Failure) and result.check(CancelledError)
    assert h.transport.disconnecting
    h.proxy_closes()
    h.reactor.advance(60)
    assert len(h.results) == 1


def test_cancel_while_connecting_stops_the_attempt() -> None:
    h = Harness("http://127.0.0.1:1080")
    h.deferred.cancel()
    [result] = h.results
    assert isinstance(result, Failure) and result.check(CancelledError)
    assert h.reactor.connectors[-1].stoppedConnecting
    h.reactor.advance(60)
    assert len(h.results) == 1


def test_factory_that_builds_no_protocol() -> None:
    factory = Factory()
    factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    h = Harness("socks5://127.0.0.1:1080", factory=factory)
    h.proxy_accepts()
    h.reply(b"\x05\x00" + SOCKS5_OK_V4)
    [result] = h.results
    assert isinstance(result, Failure) and result.check(NoProtocol)
    assert h.transport.disconnecting


class ProxyConnections:
    """Stands in for HostnameEndpoint (whose own connects leave garbage of Twisted's: a
    class per call): the connection to the proxy is made at once, or, with `hang`, never."""

    def __init__(self) -> None:
        self.made: list[tuple[Protocol, StringTransport]] = []
        self.hang = False

    def __call__(self, reactor, host, port):
        self.address = IPv4Address("TCP", host, port)
        return self

    def connect(self, factory):
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(self.address)
        transport = StringTransport(peerAddress=self.address)
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        return succeed(protocol)

    def end(self) -> None:
        """The connection to the proxy ends (it was aborted, or the proxy closed it)."""
        protocol, _ = self.made.pop()
        protocol.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize(
    ("url", "replies", "wait", "outcome"),
    [
        ("socks5://127.0.0.1:1080", [b"\x05\x00", SOCKS5_OK_V4], 0, Recorder),
        ("http://127.0.0.1:1080", [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"], 0, ProxyError),
        ("socks5://127.0.0.1:1080", [b"\x05\x00", b"\x05\x05\x00\x01" + bytes(6)], 0, ProxyError),
        ("socks5://127.0.0.1:1080", [b"\x05\x00", None], 0, ProxyError),
        ("socks5://127.0.0.1:1080", [], 30, ProxyError),
        ("http://127.0.0.1:1080", None, 30, ProxyError),
    ],
    ids=["established", "refused-by-the-proxy", "socks-reply-error", "proxy-hangs-up", "no-answer", "no-connection"],
)
def test_a_connect_through_a_proxy_is_freed_without_the_garbage_collector(monkeypatch, url, replies, wait, outcome):
    """The attempt and its handshake protocol referred to each other, and a deadline that
    fired kept the attempt: each connection through a proxy, made or failed, was a
    reference cycle, with the tunnel's protocol in it."""
    from relay import proxy

    from .inmemory import garbage_left_by

    connections = ProxyConnections()
    connections.hang = replies is None
    monkeypatch.setattr(proxy, "HostnameEndpoint", connections)
    reactor = MemoryReactorClock()
    endpoint = ProxyClientEndpoint(reactor, parse_proxy_url(url), RELAY, 443)

    def connect():
        seen = []
        endpoint.connect(Factory.forProtocol(Recorder)).addBoth(lambda result: seen.append(type(result)))  # consumed, as AgentService does
        for reply in replies or []:
            if reply is None:
                connections.end()  # the proxy hangs up
            else:
                connections.made[-1][0].dataReceived(reply)
        reactor.advance(wait)
        assert seen == [Failure if outcome is ProxyError else outcome]
        if connections.made:
            connections.end()  # aborted by the attempt, or the tunnel over it ends

    assert garbage_left_by(connect) == 0


# --- real proxies: pproxy on loopback -----------------------------------------------

DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The pproxy fixture (start a real proxy on loopback) is in tests/conftest.py.


@pytest.fixture
def echo_port():
    port = global_reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    yield port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


def connect_via(url: str, host: str, port: int) -> Deferred[Recorder]:
    endpoint = ProxyClientEndpoint(
        global_reactor, parse_proxy_url(url), host, port, timeout=DEADLINE
    )
    return endpoint.connect(Factory.forProtocol(Recorder))


def within_deadline(d: Deferred) -> Deferred:
    return d.addTimeout(DEADLINE, global_reactor)


@inlineCallbacks
def round_trip(url: str, host: str, port: int):
    app = yield within_deadline(connect_via(url, host, port))
    payload = bytes(range(256)) * 64
    app.transport.write(payload)
    echoed = yield within_deadline(app.received(len(payload)))
    assert echoed == payload
    app.transport.loseConnection()
    yield within_deadline(app.on_lost)


@pytest.mark.parametrize(
    ("listen", "url", "host"),
    [
        ("socks5://127.0.0.1:{port}", "socks5://127.0.0.1:{port}", "127.0.0.1"),
        ("socks5://127.0.0.1:{port}", "socks5h://127.0.0.1:{port}", "localhost"),
        (
            f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"socks5://{USER}:{PASSWORD}@127.0.0.1:{{port}}",
            "127.0.0.1",
        ),
        ("socks4://127.0.0.1:{port}", "socks4://127.0.0.1:{port}", "127.0.0.1"),
        ("socks4://127.0.0.1:{port}", "socks4://127.0.0.1:{port}", "localhost"),
        (f"socks4://127.0.0.1:{{port}}#{USER}", f"socks4://{USER}@127.0.0.1:{{port}}", "127.0.0.1"),
        # pproxy has no SOCKS4a (it would connect to 0.0.0.1): only the IP-literal form.
        (
            f"socks4://127.0.0.1:{{port}}#{USER}",
            f"socks4a://{USER}@127.0.0.1:{{port}}",
            "127.0.0.1",
        ),
        ("http://127.0.0.1:{port}", "http://127.0.0.1:{port}", "127.0.0.1"),
        ("http://127.0.0.1:{port}", "http://127.0.0.1:{port}", "localhost"),
        (
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"http://{USER}:{PASSWORD}@127.0.0.1:{{port}}",
            "127.0.0.1",
        ),
    ],
)
@pytest_twisted.inlineCallbacks
def test_real_proxy_round_trip(pproxy, echo_port: int, listen: str, url: str, host: str):
    port = pproxy(listen)
    yield round_trip(url.format(port=port), host, echo_port)


@inlineCallbacks
def failure_of(d: Deferred):
    try:
        yield within_deadline(d)
    except ProxyError as e:
        assert_no_secret(str(e))
        return str(e)
    pytest.fail("connected, but a ProxyError was expected")


@pytest.mark.parametrize(
    ("listen", "url", "message"),
    [
        (
            f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"socks5://{USER}:wrong@127.0.0.1:{{port}}",
            # pproxy hangs up instead of sending the RFC 1929 failure status.
            "proxy socks5://***@127.0.0.1:{port} closed the connection on receiving the username/password; "
            "it probably rejected them",
        ),
        (
            f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            "socks5://127.0.0.1:{port}",
            "proxy socks5://127.0.0.1:{port} closed the connection when offered no authentication; "
            "it probably requires a username and password",
        ),
        (
            f"socks4://127.0.0.1:{{port}}#{USER}",
            "socks4://mallory@127.0.0.1:{port}",
            # pproxy hangs up instead of replying 0x5B.
            "proxy socks4://***@127.0.0.1:{port} closed the connection during the SOCKS4 handshake for 127.0.0.1:",
        ),
        (
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            f"http://{USER}:wrong@127.0.0.1:{{port}}",
            "proxy http://***@127.0.0.1:{port} rejected the username/password (HTTP 407 Proxy Authentication Required)",
        ),
        (
            f"http://127.0.0.1:{{port}}#{USER}:{PASSWORD}",
            "http://127.0.0.1:{port}",
            "proxy http://127.0.0.1:{port} requires authentication; give http://USER:PASSWORD@ in the proxy URL "
            "(HTTP 407 Proxy Authentication Required)",
        ),
    ],
)
@pytest_twisted.inlineCallbacks
def test_real_proxy_wrong_credentials(pproxy, echo_port: int, listen: str, url: str, message: str):
    port = pproxy(listen)
    text = yield failure_of(connect_via(url.format(port=port), "127.0.0.1", echo_port))
    assert text.startswith(message.format(port=port))


@pytest_twisted.inlineCallbacks
def test_real_http_proxy_cannot_reach_destination(pproxy, closed_port: int):
    port = pproxy("http://127.0.0.1:{port}")
    text = yield failure_of(connect_via(f"http://127.0.0.1:{port}", "127.0.0.1", closed_port))
    # pproxy hangs up without a status line when its connection fails.
    assert text == (
        f"proxy http://127.0.0.1:{port} closed the connection during the HTTP CONNECT handshake "
        f"for 127.0.0.1:{closed_port}"
    )


@pytest.mark.parametrize("scheme", ["socks5", "socks4"])
@pytest_twisted.inlineCallbacks
def test_real_socks_proxy_cannot_reach_destination(pproxy, closed_port: int, scheme: str):
    # pproxy sends its SOCKS success reply *before* it connects onwards, so no proxy
    # can report this failure: the connection is established and then closed at once,
    # which the TLS layer above sees as a failed handshake.
    port = pproxy(f"{scheme}://127.0.0.1:{{port}}")
    app = yield within_deadline(
        connect_via(f"{scheme}://127.0.0.1:{port}", "127.0.0.1", closed_port)
    )
    yield within_deadline(app.on_lost)
    assert app.data == b""


@pytest.mark.parametrize("scheme", ["socks5", "socks4", "http"])
@pytest_twisted.inlineCallbacks
def test_real_proxy_not_listening(closed_port: int, scheme: str):
    text = yield failure_of(
        connect_via(f"{scheme}://{USER}@127.0.0.1:{closed_port}", "127.0.0.1", 1)
    )
    assert (
        text
        == f"cannot connect to proxy {scheme}://***@127.0.0.1:{closed_port}: connection refused"
    )


# Twisted's PrivateCertificate.options() still hands pyOpenSSL objects to pyOpenSSL.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_real_tls_through_proxy(pproxy):
    """The production composition: wrapClientTLS around the proxy endpoint."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    server_options = PrivateCertificate.loadPEM(
        server_cert.private_key_and_cert_chain_pem.bytes()
    ).options()
    listening = global_reactor.listenSSL(
        0, Factory.forProtocol(Echo), server_options, interface="127.0.0.1"
    )
    try:
        port = pproxy(f"socks5://127.0.0.1:{{port}}#{USER}:{PASSWORD}")
        proxy = parse_proxy_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{port}")
        inner = ProxyClientEndpoint(
            global_reactor, proxy, "localhost", listening.getHost().port, timeout=DEADLINE
        )
        creator = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes())
        )
        app = yield within_deadline(
            wrapClientTLS(creator, inner).connect(Factory.forProtocol(Recorder))
        )
        # The TLS layer registers a producer on our transport when the application
        # registers one on TLS: writing far more than the socket buffer must pause it,
        # and draining must resume it.
        flow = FlowRecorder()
        app.transport.registerProducer(flow, True)
        payload = bytes(range(256)) * 4096  # 1 MiB
        app.transport.write(payload)
        assert flow.events == ["pause"]
        echoed = yield within_deadline(app.received(len(payload)))
        assert echoed == payload
        assert flow.events[:2] == ["pause", "resume"]
        app.transport.unregisterProducer()
        app.transport.loseConnection()
        yield within_deadline(app.on_lost)
    finally:
        yield listening.stopListening()


def test_a_proxied_connection_attempt_logs_no_factory_lines(logs):
    """Twisted logs 'Starting factory' and 'Stopping factory' for a noisy factory: one pair
    per attempt through the proxy, at info level, in the agent's log."""
    from relay.proxy import _HandshakeFactory

    factory = _HandshakeFactory(None)
    factory.doStart()
    factory.doStop()
    assert not [line for line in logs if "factory" in line.lower()]
