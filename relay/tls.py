"""TLS for the tunnel: the relay's server options, and the agent's three ways to verify the relay.

Every mode verifies; there is deliberately no option that does not. TLS 1.3 only, and the
ALPN id relay/1 on both sides, so a firewall can see exactly what this connection is.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import VerifyError  # not re-exported by twisted.internet.ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.compat import nativeString
from zope.interface import implementer

from . import defaults

TLS_MINIMUM = ssl.TLSVersion.TLSv1_3
# The relay's order of preference among OpenSSL's default TLS 1.3 suites (it chooses:
# Twisted sets OP_CIPHER_SERVER_PREFERENCE). All three stay allowed. OpenSSL's default
# order puts AES-256 first, whose AES work costs a fifth to a quarter more than
# AES-128's (the suite every TLS 1.3 implementation must have); preferring AES-128 took
# 4-10 % off a bulk tunnel's CPU per byte: docs/performance.md, docs/security.md.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


class TLSConfigError(Exception):
    """A certificate, key or pin could not be used; the message says which file and why."""


def server_options(cert_path: Path, key_path: Path, ca_path: Path) -> ssl.CertificateOptions:
    """The relay's TLS options: its certificate, the CA in the chain (so pins on the CA work).

    The relay asks every agent for a client certificate but does not require one (token
    agents send none): verify=True with requireCertificate=False is OpenSSL's VERIFY_PEER
    without VERIFY_FAIL_IF_NO_PEER_CERT, so a certificate that is presented must chain to
    our CA (and be valid for client use), or the handshake fails. Twisted's trustRoot=
    would force requireCertificate=True, hence the older caCerts= spelling. Which agent
    the certificate belongs to, and whether it is still its current one, the relay
    decides after the handshake (State.verify_certificate).
    """
    try:
        cert = ssl.PrivateCertificate.loadPEM(cert_path.read_bytes() + key_path.read_bytes())
        ca = ssl.Certificate.loadPEM(ca_path.read_bytes())
    except (OSError, SSL.Error, crypto.Error, ValueError) as e:
        raise TLSConfigError(f"cannot load the relay certificate from {cert_path.parent}: {e}") from e
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        extraCertChain=[ca.original],
        verify=True,
        caCerts=[ca.original],
        requireCertificate=False,
        raiseMinimumTo=TLS_MINIMUM,
        acceptableProtocols=[defaults.ALPN],
    )
    options.getContext().set_tls13_ciphersuites(TLS13_SUITES)
    return options


def load_client_certificate(path: Path) -> ssl.PrivateCertificate:
    """The agent's key and client certificate from one PEM file (as `relay agent-cert` writes it)."""
    try:
        data = Path(path).read_bytes()
        return ssl.PrivateCertificate.loadPEM(data)
    except OSError as e:
        raise TLSConfigError(f"cannot read --cert {path}: {e.strerror or e}") from e
    except (SSL.Error, crypto.Error, ValueError) as e:
        raise TLSConfigError(
            f"--cert {path} is not a PEM file with a private key and its certificate "
            f"(as `relay agent-cert` writes it): {e}"
        ) from e
    except VerifyError as e:
        raise TLSConfigError(f"--cert {path}: the private key does not belong to the certificate") from e


def _client_certificate_options(client_certificate: ssl.PrivateCertificate | None) -> dict:
    if client_certificate is None:
        return {}
    return {
        "privateKey": client_certificate.privateKey.original,
        "certificate": client_certificate.original,
    }


def client_options_for_ca(
    host: str, ca_file: Path, client_certificate: ssl.PrivateCertificate | None = None
) -> IOpenSSLClientConnectionCreator:
    """Trust the relay's CA file and check that the relay's certificate names `host`;
    present CLIENT_CERTIFICATE (from load_client_certificate) if given."""
    try:
        ca = ssl.Certificate.loadPEM(Path(ca_file).read_bytes())
    except (OSError, SSL.Error, crypto.Error, ValueError) as e:
        raise TLSConfigError(f"cannot read the CA certificate {ca_file}: {e}") from e
    return ssl.optionsForClientTLS(
        host,
        trustRoot=ssl.trustRootFromCertificates([ca]),
        clientCertificate=client_certificate,
        acceptableProtocols=[defaults.ALPN],
        extraCertificateOptions={"raiseMinimumTo": TLS_MINIMUM},
    )


def client_options_for_system_trust(
    host: str, client_certificate: ssl.PrivateCertificate | None = None
) -> IOpenSSLClientConnectionCreator:
    """The platform's trust store plus a hostname check, as a browser would."""
    return ssl.optionsForClientTLS(
        host,
        trustRoot=ssl.platformTrust(),
        clientCertificate=client_certificate,
        acceptableProtocols=[defaults.ALPN],
        extraCertificateOptions={"raiseMinimumTo": TLS_MINIMUM},
    )


def parse_pin(pin: str) -> bytes:
    """`sha256:HEX` as 32 raw bytes; ValueError with the expected form otherwise."""
    prefix, _, digest = pin.partition(":")
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if prefix.lower() != "sha256" or len(raw) != 32:
        raise ValueError(f"a pin looks like sha256:<64 hex digits>, not {pin!r}")
    return raw


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientOptions:
    """Accept a relay whose certificate, or a CA certificate it chains to, has the pinned SHA-256.

    The pin is the identity, so no hostname check (SPEC). A CA pin is honoured only if
    the leaf really chains to that CA: a CA certificate is public, so "the pinned
    certificate appears somewhere in the chain" alone would be forgeable.
    """

    def __init__(self, host: str, pin: str, client_certificate: ssl.PrivateCertificate | None = None) -> None:
        self._pin = parse_pin(pin)
        self._sni = _sni_name(host)
        self._options = ssl.CertificateOptions(
            raiseMinimumTo=TLS_MINIMUM,
            acceptableProtocols=[defaults.ALPN],
            **_client_certificate_options(client_certificate),
        )
        self._options.getContext().set_verify(SSL.VERIFY_PEER, self._verify)
        self._chains: dict[int, dict[int, crypto.X509]] = {}

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:  # noqa: N802 (Twisted's name)
        # Twisted's own options set ALPN per connection; we add SNI and the pin check.
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        connection.set_connect_state()
        return connection

    def _verify(self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        # OpenSSL calls this once per certificate, from the top of the chain down to the
        # leaf at depth 0. OpenSSL's own verdict is replaced by the pin check at the leaf.
        chain = self._chains.setdefault(id(connection), {})
        chain[depth] = cert
        if depth != 0:
            return True
        del self._chains[id(connection)]
        return pin_matches(self._pin, [chain[d] for d in sorted(chain)])


def pin_matches(pin: bytes, chain: list[crypto.X509]) -> bool:
    """True if chain[0] (the leaf) has the pin, or is a server certificate that chains up to a
    certificate that has it.

    The relay's CA also signs agents' client certificates (`relay agent-cert`): without the
    server-purpose check, anyone holding one could pose as the relay to agents that pin the CA.
    """
    digests = [hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, c)).digest() for c in chain]
    if hmac.compare_digest(digests[0], pin):
        return True
    if not _is_server_certificate(chain[0]):
        return False
    for index, digest in enumerate(digests[1:], start=1):
        if hmac.compare_digest(digest, pin):
            store = crypto.X509Store()
            store.add_cert(chain[index])
            context = crypto.X509StoreContext(store, chain[0], chain=chain[1:index])
            try:
                context.verify_certificate()
            except crypto.X509StoreContextError:
                return False
            return True
    return False


def _is_server_certificate(cert: crypto.X509) -> bool:
    """The certificate says it is for TLS servers: an extendedKeyUsage with serverAuth, as
    `relay init` issues. No EKU at all (any purpose) is not enough from a CA pin."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        usage = cert.to_cryptography().extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


def _sni_name(host: str) -> bytes | None:
    """SNI carries DNS names only, never IP literals (RFC 6066)."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return nativeString(host).encode("idna")
    return None
