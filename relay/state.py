"""The relay's state directory: its CA, its server certificate and its agents' credentials.

`relay init` creates it (init_state), `relay agent-token` and `relay agent-cert` add agents
to it, `relay agent-revoke` removes them, and the running relay reads it (State). Layout of
DIR (mode 0700):

    ca.pem, ca.key          the CA agents trust (--ca DIR/ca.pem or --pin sha256:...); it
                            also signs agent client certificates
    server.pem, server.key  the relay's TLS certificate, signed by the CA
    agents.json             per agent: the ports it may use, and its credentials: the
                            SHA-256 of its token's secret and/or of its current client
                            certificate's DER bytes
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shlex
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay import defaults

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
AGENTS_FILE = "agents.json"

_AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DNS_NAME_RE = re.compile(r"[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
# Compared against when the agent name is unknown, so that answering "no" takes as
# long for an unknown name as for a wrong secret.
_NO_SUCH_AGENT = "0" * 64
AGENT_CERT_VALIDITY_DAYS = 365

# How an agent proved who it is (Credential.method).
TOKEN = "token"
CERTIFICATE = "certificate"


class StateError(Exception):
    """The state dir is missing or broken; str() tells the user what to do."""


@dataclass(frozen=True)
class PortSet:
    """Ports an agent may ask the relay to listen on, as sorted, merged, inclusive ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        # Normalise so that equality and hashing are by value ("80,81" == "80-81").
        merged: list[tuple[int, int]] = []
        for low, high in sorted(self.ranges):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        object.__setattr__(self, "ranges", tuple(merged))

    @classmethod
    def parse(cls, spec: str) -> PortSet:
        """Parse "8080,2000-2007"; ValueError naming the bad item otherwise."""
        return cls(tuple(_parse_port_item(item.strip(), spec) for item in spec.split(",")))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(low <= port <= high for low, high in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)


def _parse_port_item(item: str, spec: str) -> tuple[int, int]:
    if not item:
        raise ValueError(f"bad port spec {spec!r}: empty item (stray comma?)")
    bounds = item.split("-")
    if len(bounds) > 2 or not all(_PORT_RE.fullmatch(b) for b in bounds):
        raise ValueError(
            f"bad port spec {spec!r}: {item!r} is neither a port nor a range like 2000-2007"
        )
    low, high = int(bounds[0]), int(bounds[-1])
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise ValueError(f"bad port spec {spec!r}: port {port} is not in 1-65535")
    if low > high:
        raise ValueError(f"bad port spec {spec!r}: range {item!r} is reversed; write {high}-{low}")
    return low, high


@dataclass(frozen=True)
class Agent:
    """An agent the relay knows; ports=None means any port in defaults.AGENT_PORT_RANGE."""

    name: str
    ports: PortSet | None


@dataclass(frozen=True)
class Credential:
    """What a tunnel authenticated with: TOKEN or CERTIFICATE, and the SHA-256 (hex) that
    agents.json holds for it. The relay keeps it to notice rotation and revocation."""

    method: str
    digest: str = field(repr=False)


@dataclass(frozen=True)
class _Record:
    """One agent in agents.json: at least one of the two digests is set."""

    agent: Agent
    secret_sha256: str | None = field(default=None, repr=False)
    cert_sha256: str | None = None

    def to_json(self) -> dict:
        entry: dict = {"ports": _ports_text(self.agent.ports)}
        if self.secret_sha256 is not None:
            entry["secret_sha256"] = self.secret_sha256
        if self.cert_sha256 is not None:
            entry["cert_sha256"] = self.cert_sha256
        return entry


@dataclass(frozen=True)
class Revoked:
    """What `State.revoke` removed."""

    name: str
    token: bool
    certificate: bool


@dataclass(frozen=True)
class IssuedCertificate:
    """A new agent certificate: the PEM (key, then certificate) to hand to the agent."""

    pem: bytes = field(repr=False)
    fingerprint: str  # "sha256:<hex>" of the certificate's DER, as cert_pin() prints it
    not_after: datetime.datetime


def validate_agent_name(name: str) -> str:
    """Return NAME if it may name an agent (it becomes the token's prefix); ValueError if not."""
    if not _AGENT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad agent name {name!r}: use 1-64 ASCII letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def validate_hostname(name: str) -> str:
    """Return NAME as it goes into the server certificate (canonical IP or lower-case DNS name)."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad hostname {name!r}: give a DNS name (ASCII letters, digits, '-', '.';"
            " punycode for others) or an IP address"
        )
    return name.lower()


def default_hostnames() -> list[str]:
    """The names `relay init` certifies when given none: loopback and this machine's FQDN."""
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        names.append(validate_hostname(socket.getfqdn()))
    except ValueError:
        pass  # a misconfigured machine name must not break `relay init`; --hostname fixes it
    return list(dict.fromkeys(names))


def cert_pin(pem_or_der: bytes) -> str:
    """The pin of a certificate (the first one, if PEM): "sha256:" + hex SHA-256 of its DER."""
    if b"-----BEGIN" in pem_or_der:
        cert = x509.load_pem_x509_certificate(pem_or_der)
    else:
        cert = x509.load_der_x509_certificate(pem_or_der)
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def init_state(path: str | os.PathLike, hostnames: Sequence[str] | None = None) -> str:
    """Create or update the state dir at PATH and return the CA pin.

    Keeps an existing CA, so agents keep trusting the relay; (re-)issues the server
    certificate when it is missing, broken or expired, or when HOSTNAMES are given and
    differ from the names it certifies. Without HOSTNAMES an existing server
    certificate is kept as it is: re-running `relay init`, or a relay initialising on
    start, must not undo an earlier `--hostname`.
    """
    names = [
        validate_hostname(n) for n in (default_hostnames() if hostnames is None else hostnames)
    ]
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("give at least one hostname for the server certificate")
    root = Path(path)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # mkdir honours the umask and leaves an existing dir alone
    ca_cert, ca_key = _ensure_ca(root, names[0])
    sans = [_general_name(n) for n in names]
    if not _server_cert_is_current(root, ca_cert, None if hostnames is None else sans):
        if ca_key is None:
            raise StateError(
                f"cannot re-issue {root / SERVER_CERT}: {root / CA_KEY} is missing; "
                f"put the CA key back and run `{_init_command(root)}` again"
            )
        _issue_server_cert(root, ca_cert, ca_key, names[0], sans)
    return cert_pin(ca_cert.public_bytes(serialization.Encoding.DER))


def _init_command(path: str | os.PathLike) -> str:
    return f"relay init --state {shlex.quote(str(path))}"


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _ensure_ca(
    root: Path, first_name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None]:
    """Load the CA, or create it if there is none; the key may be absent (kept offline)."""
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = _load_key(key_path) if key_path.exists() else None
        except (ValueError, TypeError) as exc:
            raise StateError(
                f"{cert_path} or {key_path} is not a readable PEM ({exc}); restore them from "
                f"a backup, or delete {root} and run `{_init_command(root)}` again (agents "
                "must then trust the new CA)"
            ) from exc
        if key is not None and _public_der(key) != _public_der(cert):
            raise StateError(
                f"{key_path} does not belong to {cert_path}; restore the matching pair"
            )
        return cert, key
    if key_path.exists():
        # Never overwrite a CA key: without its certificate it may still be recoverable.
        raise StateError(
            f"{key_path} exists but {cert_path} does not; restore {cert_path}, "
            f"or remove {key_path} to create a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())  # P-256: small and fast handshakes
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"relay CA {first_name}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=defaults.CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between then leaves the "key without certificate" case
    # above, which refuses to guess, rather than a certificate nobody can sign with.
    _write_atomic(key_path, _private_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _server_cert_is_current(
    root: Path, ca_cert: x509.Certificate, sans: list[x509.GeneralName] | None
) -> bool:
    """Whether server.pem/.key are a valid pair from this CA (certifying SANS, if given)."""
    try:
        cert = x509.load_pem_x509_certificate((root / SERVER_CERT).read_bytes())
        key = _load_key(root / SERVER_KEY)
        cert.verify_directly_issued_by(ca_cert)
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (
        (sans is None or set(have) == set(sans))
        and _public_der(key) == _public_der(cert)
        and cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    )


def _issue_server_cert(
    root: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    first_name: str,
    sans: list[x509.GeneralName],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    # A certificate outliving its CA would only fail later and more confusingly.
    not_after = min(
        now + datetime.timedelta(days=defaults.SERVER_CERT_VALIDITY_DAYS),
        ca_cert.not_valid_after_utc,
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # Key first: a new key beside the old certificate fails the key check above, so
    # an interrupted run is repaired by the next `relay init`.
    _write_atomic(root / SERVER_KEY, _private_pem(key), 0o600)
    _write_atomic(root / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _key_usage(
    digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC key")
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_der(key_or_cert: ec.EllipticCurvePrivateKey | x509.Certificate) -> bytes:
    return key_or_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_atomic(path: Path, data: bytes, mode: int, overwrite: bool = True) -> None:
    """Replace PATH with DATA so that readers see the old or the new file, never a part.

    mkstemp creates the file 0600 (os.open with O_EXCL), so a key is never readable
    by others, not even for a moment; MODE may only widen that, for certificates.
    With overwrite=False an existing PATH is left alone (FileExistsError), decided
    atomically by link(2) where the file system has hard links.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # still there unless it was renamed into place


def write_private_file(
    path: str | os.PathLike, data: bytes, overwrite: bool = False
) -> None:
    """Write DATA to PATH atomically, mode 0600; FileExistsError if it exists and not OVERWRITE."""
    _write_atomic(Path(path), data, 0o600, overwrite=overwrite)


def _place_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # EEXIST if PATH exists, with no window for a race
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


class State:
    """An initialised state dir, as the running relay and the `relay` agent commands use it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.ca_cert_path = self.path / CA_CERT
        self.ca_key_path = self.path / CA_KEY
        self.server_cert_path = self.path / SERVER_CERT
        self.server_key_path = self.path / SERVER_KEY
        self.agents_path = self._agents_path = self.path / AGENTS_FILE
        init_hint = f"run `{_init_command(path)}`"
        if not self.path.is_dir():
            raise StateError(f"state dir {path} does not exist; {init_hint} first")
        # ca.key is not needed here: an operator may keep it offline.
        needed = (self.ca_cert_path, self.server_cert_path, self.server_key_path)
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise StateError(
                f"state dir {path} is incomplete (no {', '.join(missing)}); {init_hint} to complete it"
            )
        self._agents_stamp: tuple[int, ...] | None = None
        self._agents_read = False  # agents.json has been read: its disappearance is an error
        self._agents: dict[str, _Record] = {}
        # Bumped whenever agents.json is (re-)read with other contents: the relay's
        # revocation watcher compares it, however the re-read was triggered.
        self.generation = 0

    def server_hostnames(self) -> list[str]:
        """The DNS names and IP addresses the server certificate is valid for."""
        cert = x509.load_pem_x509_certificate(self.server_cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(name.value) for name in sans]

    def ca_pin(self) -> str:
        """The pin agents may use instead of --ca: "sha256:<hex of the CA's DER>"."""
        return cert_pin(self.ca_cert_path.read_bytes())

    # issuing and revoking (the `relay` commands)

    def issue_token(self, name: str, ports: PortSet | None = None) -> str:
        """Create agent NAME, or rotate its secret and ports; return its new token.

        Only a hash of the secret is stored, so this is the one time it can be shown.
        An existing client certificate of the agent stays valid.
        """
        validate_agent_name(name)
        secret = secrets.token_urlsafe(32)
        records = dict(self._current_agents())
        old = records.get(name)
        records[name] = _Record(
            Agent(name, ports),
            secret_sha256=_secret_hash(secret),
            cert_sha256=old.cert_sha256 if old else None,
        )
        self._write_agents(records)
        return f"{name}.{secret}"

    def issue_certificate(self, name: str, ports: PortSet | None = None) -> IssuedCertificate:
        """A new EC P-256 key and client certificate for agent NAME, signed by the CA.

        Does not record it: call record_certificate() once the PEM is safely written,
        so that a failed write does not revoke the certificate the agent has now.
        """
        validate_agent_name(name)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        try:
            ca_key = _load_key(self.ca_key_path)
        except FileNotFoundError:
            raise StateError(
                f"{self.ca_key_path} is missing; agent certificates are signed with the CA "
                "key: put it back for this command (it may stay offline otherwise)"
            ) from None
        except (ValueError, TypeError) as exc:
            raise StateError(f"{self.ca_key_path} is not a readable EC key ({exc})") from exc
        if _public_der(ca_key) != _public_der(ca_cert):
            raise StateError(
                f"{self.ca_key_path} does not belong to {self.ca_cert_path}; restore the matching pair"
            )
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(
            now + datetime.timedelta(days=AGENT_CERT_VALIDITY_DAYS), ca_cert.not_valid_after_utc
        )
        if not_after <= now:
            raise StateError(f"the CA {self.ca_cert_path} has expired; agents cannot get certificates")
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        return IssuedCertificate(
            pem=_private_pem(key) + cert.public_bytes(serialization.Encoding.PEM),
            fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
            not_after=cert.not_valid_after_utc,
        )

    def record_certificate(self, name: str, issued: IssuedCertificate, ports: PortSet | None) -> bool:
        """Make ISSUED agent NAME's one valid certificate (a previous one stops working) and
        set its ports; its token, if any, stays valid. True if it replaced a certificate."""
        validate_agent_name(name)
        records = dict(self._current_agents())
        old = records.get(name)
        records[name] = _Record(
            Agent(name, ports),
            secret_sha256=old.secret_sha256 if old else None,
            cert_sha256=issued.fingerprint.removeprefix("sha256:"),
        )
        self._write_agents(records)
        return old is not None and old.cert_sha256 is not None

    def revoke(self, name: str) -> Revoked:
        """Remove agent NAME and every credential it has; KeyError if there is no such agent."""
        records = dict(self._current_agents())
        old = records.pop(name)
        self._write_agents(records)
        return Revoked(name, old.secret_sha256 is not None, old.cert_sha256 is not None)

    def _write_agents(self, records: dict[str, _Record]) -> None:
        doc = {"agents": {name: record.to_json() for name, record in records.items()}}
        data = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        _write_atomic(self._agents_path, data.encode(), 0o600)

    # authenticating (the running relay)

    def authenticate(self, token: str) -> Agent | None:
        """The agent TOKEN belongs to, or None if it is unknown, wrong or malformed.

        Never raises for a bad token; raises StateError only if agents.json itself is
        broken, which is the operator's problem, not the client's.
        """
        found = self.verify_token(token)
        return found[0] if found else None

    def verify_token(self, token: str) -> tuple[Agent, Credential] | None:
        """Like authenticate(), and also the Credential to check later with still_valid()."""
        # Bounded before any work, so a huge token costs nothing; ASCII so encode() cannot fail.
        if not isinstance(token, str) or len(token) > defaults.MAX_TOKEN_LENGTH:
            return None
        if not token.isascii():
            return None
        name, dot, secret = token.partition(".")
        if not dot or not secret:
            return None
        record = self._current_agents().get(name)
        expected = record.secret_sha256 if record and record.secret_sha256 else _NO_SUCH_AGENT
        digest = _secret_hash(secret)
        if hmac.compare_digest(digest, expected) and record:
            return record.agent, Credential(TOKEN, digest)
        return None

    def authenticate_certificate(self, der: bytes) -> Agent | None:
        """The agent whose current client certificate is DER, or None.

        The TLS layer has already checked that it chains to our CA; here it must also be
        the one certificate agents.json records for the agent its CN names (a replaced
        or revoked certificate is still signed by the CA, so the signature is not enough).
        """
        found = self.verify_certificate(der)
        return found[0] if found else None

    def verify_certificate(self, der: bytes) -> tuple[Agent, Credential] | None:
        """Like authenticate_certificate(), and also the Credential for still_valid()."""
        if not isinstance(der, bytes):
            return None
        digest = hashlib.sha256(der).hexdigest()
        try:
            cert = x509.load_der_x509_certificate(der)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return None
        if len(names) != 1 or not isinstance(names[0].value, str):
            return None
        record = self._current_agents().get(names[0].value)
        expected = record.cert_sha256 if record and record.cert_sha256 else _NO_SUCH_AGENT
        if hmac.compare_digest(digest, expected) and record:
            return record.agent, Credential(CERTIFICATE, digest)
        return None

    def still_valid(self, name: str, credential: Credential) -> bool:
        """Whether agent NAME still has CREDENTIAL (not rotated, replaced or revoked)."""
        record = self._current_agents().get(name)
        if record is None:
            return False
        current = {TOKEN: record.secret_sha256, CERTIFICATE: record.cert_sha256}.get(credential.method)
        return current is not None and hmac.compare_digest(current, credential.digest)

    def agents(self) -> dict[str, Agent]:
        """Every agent with a credential, by name."""
        return {name: record.agent for name, record in self._current_agents().items()}

    def credentials(self, name: str) -> tuple[str, ...]:
        """Which kinds of credential agent NAME has: TOKEN and/or CERTIFICATE."""
        record = self._current_agents().get(name)
        if record is None:
            return ()
        have = ((TOKEN, record.secret_sha256), (CERTIFICATE, record.cert_sha256))
        return tuple(kind for kind, digest in have if digest is not None)

    def refresh(self, force: bool = False) -> int:
        """Re-read agents.json if it changed on disk (FORCE: in any case, for a stat that
        cannot tell, such as two writes within one timestamp tick); return the generation
        (see __init__)."""
        if force:
            self._agents_stamp = None
        self._current_agents()
        return self.generation

    def _current_agents(self) -> dict[str, _Record]:
        """agents.json by name, re-read only when the file changed.

        This is how a running relay picks up the `relay` agent commands without a restart.
        The inode is part of the stamp because every write replaces the file.
        """
        try:
            st = os.stat(self._agents_path)
        except FileNotFoundError:
            if self._agents_read:
                # It was there: a deletion (or the state dir moved away) is not how agents
                # are revoked, and taken as an empty table it cut every tunnel without a
                # word. Treated like an unreadable file: keep what we have, and say so.
                raise StateError(
                    f"{self._agents_path} has disappeared; restore it, or revoke agents with "
                    "`relay agent-revoke`"
                ) from None
            self._agents = {}
            return self._agents
        except OSError as exc:
            raise StateError(
                f"cannot read {self._agents_path} ({exc.strerror or exc}); check it and its permissions"
            ) from exc
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp != self._agents_stamp:
            agents = _read_agents(self._agents_path)
            if agents != self._agents:
                self.generation += 1
            self._agents, self._agents_stamp = agents, stamp
            self._agents_read = True
        return self._agents


def _secret_hash(secret: str) -> str:
    # The secret is 256 random bits, not a password: nothing to brute-force, so a
    # fast hash is right and a slow KDF would only slow every tunnel handshake.
    return hashlib.sha256(secret.encode()).hexdigest()


def _ports_text(ports: PortSet | None) -> str | None:
    return None if ports is None else str(ports)


def _digest_field(entry: dict, key: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256_HEX_RE.fullmatch(value):
        raise ValueError(f"{key} is not 64 lower-case hex digits")
    return value


def _read_agents(path: Path) -> dict[str, _Record]:
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or not isinstance(doc.get("agents"), dict):
            raise ValueError('no "agents" object')
        table = {}
        for name, entry in doc["agents"].items():
            try:
                if not isinstance(entry, dict) or not _AGENT_NAME_RE.fullmatch(name):
                    raise ValueError("not an object with a valid name")
                if not isinstance(entry.get("ports"), str | None):
                    raise ValueError("ports is not a string or null")
                secret = _digest_field(entry, "secret_sha256")
                cert = _digest_field(entry, "cert_sha256")
                if secret is None and cert is None:
                    raise ValueError("no secret_sha256 and no cert_sha256")
                ports = entry.get("ports")
                agent = Agent(name, None if ports is None else PortSet.parse(ports))
            except ValueError as exc:
                raise ValueError(f"bad entry for agent {name!r}: {exc}") from None
            table[name] = _Record(agent, secret, cert)
    except OSError as exc:
        # Not the file's fault (permissions, no descriptors left): nothing to delete.
        raise StateError(f"cannot read {path} ({exc.strerror or exc}); check it and its permissions") from exc
    except ValueError as exc:
        raise StateError(
            f"{path} is malformed ({exc}); fix it, or delete it and issue "
            "new credentials with `relay agent-token` or `relay agent-cert`"
        ) from exc
    return table
