"""The tunnel's socket options (keepalive, TCP_USER_TIMEOUT, TCP_NODELAY) and TLS 1.3 only."""

from __future__ import annotations

import socket
import ssl

import pytest

from relay.tls import server_options
from relay.tunnel import tune_socket


class Handle:
    def __init__(self, sock):
        self.sock = sock

    def getHandle(self):  # noqa: N802 (Twisted's name)
        return self.sock


@pytest.fixture
def tcp():
    with socket.socket() as s:
        yield s


def test_tunnel_socket_gets_nodelay_keepalive_and_user_timeout(tcp):
    tune_socket(Handle(tcp), keepalive=True, user_timeout=45.0)
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 45_000


def test_stream_sockets_get_nodelay_only(tcp):
    tune_socket(Handle(tcp))
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert not tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def _handshake(server_ctx_options, client_ctx: ssl.SSLContext) -> str | None:
    """A TLS handshake over a socketpair between the relay's OpenSSL options and a stdlib client;
    the negotiated version, or None if the handshake failed."""
    from OpenSSL import SSL

    a, b = socket.socketpair()
    a.setblocking(True)  # pyOpenSSL on a socket with a timeout raises WantReadError
    b.settimeout(5)
    server = SSL.Connection(server_ctx_options.getContext(), a)
    server.set_accept_state()
    client = client_ctx.wrap_socket(b, do_handshake_on_connect=False)
    import threading

    errors = []

    def serve():
        try:
            server.do_handshake()
        except SSL.Error as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client.do_handshake()
        version = client.version()
    except (ssl.SSLError, OSError):
        version = None
    client.close()
    thread.join(5)  # the client's close ends a server handshake still waiting
    a.close()
    return version


def test_the_relay_refuses_tls_1_2_and_speaks_1_3(state):
    options = server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this test is about the version, not identity or ALPN
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(options, ctx) is None
    ctx13 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx13.check_hostname = False
    ctx13.verify_mode = ssl.CERT_NONE
    assert _handshake(options, ctx13) == "TLSv1.3"


def _suite_chosen(server_ctx_options, offered: bytes | None) -> str | None:
    """A handshake in memory (two memory-BIO connections, no socket) between the relay's
    options and a pyOpenSSL client offering the TLS 1.3 suites `offered` (None: OpenSSL's
    default list, AES-256 first); the suite the relay chose, or None if it refused them."""
    from OpenSSL import SSL

    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if offered is not None:
        client_ctx.set_tls13_ciphersuites(offered)
    server = SSL.Connection(server_ctx_options.getContext(), None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way at most
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
            except SSL.WantReadError:
                pass
        if client.get_cipher_name() is not None and server.get_cipher_name() is not None:
            return server.get_cipher_name()
    raise AssertionError("the in-memory handshake did not finish in 10 rounds")


def test_the_relay_prefers_aes_128_gcm_over_the_default_aes_256(state):
    options = server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path)
    # OpenSSL's own default order, which every agent offers, puts AES-256 first.
    assert _suite_chosen(options, None) == "TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_the_relay_still_accepts_a_client_that_offers_only_another_suite(state, suite):
    options = server_options(state.server_cert_path, state.server_key_path, state.ca_cert_path)
    assert _suite_chosen(options, suite.encode()) == suite
