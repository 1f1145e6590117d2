"""Tests for relay.state: port sets, the CA and server certificate, agent tokens."""

import hashlib
import ipaddress
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from relay import defaults, state
from relay.state import Agent, PortSet, State, StateError, cert_pin, default_hostnames, init_state

NAMES = ["relay.example.com", "203.0.113.7", "2001:db8::1", "localhost"]


def load_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans_of(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch):
    # No DNS lookups in tests, and a known default name.
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "relay.example.net")


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    init_state(path, ["localhost", "127.0.0.1"])
    return path


# --- PortSet ---


def test_portset_parse_contains_and_canonical_str():
    ports = PortSet.parse("8080,2000-2007")
    assert str(ports) == "2000-2007,8080"
    assert [p for p in (1999, 2000, 2003, 2007, 2008, 8079, 8080, 8081) if p in ports] == [
        2000,
        2003,
        2007,
        8080,
    ]


def test_portset_extremes_and_whitespace():
    ports = PortSet.parse(" 1 , 65535 ")
    assert str(ports) == "1,65535"
    assert 1 in ports and 65535 in ports and 2 not in ports
    assert "80" not in PortSet.parse("80")  # only ints are ports


def test_portset_merges_overlaps_and_neighbours():
    assert str(PortSet.parse("5-10,1-6,11,20-20")) == "1-11,20"


def test_portset_equality_and_hash_by_value():
    a, b = PortSet.parse("8080-8081,9000"), PortSet.parse("9000,8081,8080")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != PortSet.parse("8080,9000")
    with pytest.raises(AttributeError):
        a.ranges = ()  # frozen


@pytest.mark.parametrize(
    "spec, bad",
    [
        ("", "empty item"),
        (",", "empty item"),
        ("8080,", "empty item"),
        (",8080", "empty item"),
        ("8080,,9090", "empty item"),
        ("abc", "'abc'"),
        ("80,http", "'http'"),
        ("0", "port 0"),
        ("65536", "port 65536"),
        ("99999999999999999999", "'99999999999999999999'"),
        ("10-5", "'10-5' is reversed"),
        ("1-2-3", "'1-2-3'"),
        ("-5", "'-5'"),
        ("5-", "'5-'"),
        ("1.5", "'1.5'"),
        ("+80", "'+80'"),
        ("\u0668\u0660", "'\u0668\u0660'"),  # Arabic-Indic "80": int() would accept it
        ("0-10", "port 0"),
    ],
)
def test_portset_rejects_bad_specs(spec, bad):
    with pytest.raises(ValueError) as excinfo:
        PortSet.parse(spec)
    assert bad in str(excinfo.value)
    assert str(excinfo.value).startswith("bad port spec")


# --- init_state: files, modes, certificates ---


def test_init_creates_files_with_private_modes(tmp_path):
    path = tmp_path / "state"
    init_state(path, ["localhost"])
    assert mode_of(path) == 0o700
    assert mode_of(path / "ca.key") == 0o600
    assert mode_of(path / "server.key") == 0o600
    assert sorted(p.name for p in path.iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]


def test_init_tightens_an_existing_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    init_state(path, ["localhost"])
    assert mode_of(path) == 0o700


def test_ca_certificate(tmp_path):
    init_state(tmp_path, NAMES)
    ca = load_cert(tmp_path / "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.subject.rfc4514_string() == "CN=relay CA relay.example.com"
    assert ca.subject == ca.issuer
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_server_certificate_names_and_usage(tmp_path):
    init_state(tmp_path, NAMES)
    cert = load_cert(tmp_path / "server.pem")
    sans = sans_of(cert)
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example.com", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.7"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 4.9 < years < 5.1
    assert cert.public_key().curve.name == "secp256r1"
    # What an agent's --ca check will do with these names:
    verify_certificate_hostname(cert, "relay.example.com")
    verify_certificate_ip_address(cert, "2001:db8::1")
    verify_certificate_ip_address(cert, "203.0.113.7")
    with pytest.raises(VerificationError):
        verify_certificate_hostname(cert, "other.example.com")


def test_server_key_matches_certificate(tmp_path):
    init_state(tmp_path, ["localhost"])
    key = serialization.load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    cert = load_cert(tmp_path / "server.pem")
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_server_certificate_chains_to_ca(tmp_path):
    init_state(tmp_path, ["localhost"])
    ca, cert = load_cert(tmp_path / "ca.pem"), load_cert(tmp_path / "server.pem")
    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject

    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca))
    server = crypto.X509.from_cryptography(cert)
    crypto.X509StoreContext(store, server).verify_certificate()


def test_server_certificate_does_not_chain_to_another_ca(tmp_path):
    init_state(tmp_path / "a", ["localhost"])
    init_state(tmp_path / "b", ["localhost"])
    other_ca = load_cert(tmp_path / "b" / "ca.pem")
    cert = load_cert(tmp_path / "a" / "server.pem")
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(other_ca)
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(other_ca))
    with pytest.raises(crypto.X509StoreContextError):
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert)).verify_certificate()


def test_pin_is_sha256_of_ca_der(tmp_path):
    pin = init_state(tmp_path, ["localhost"])
    der = load_cert(tmp_path / "ca.pem").public_bytes(serialization.Encoding.DER)
    assert pin == "sha256:" + hashlib.sha256(der).hexdigest()
    assert cert_pin(der) == pin
    assert cert_pin((tmp_path / "ca.pem").read_bytes()) == pin
    assert State(tmp_path).ca_pin() == pin
    assert cert_pin((tmp_path / "server.pem").read_bytes()) != pin


def test_init_is_idempotent(tmp_path):
    pin = init_state(tmp_path, NAMES)
    before = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in tmp_path.iterdir()}
    assert init_state(tmp_path, list(reversed(NAMES))) == pin  # order does not matter
    assert init_state(tmp_path, ["2001:0db8::0001", *NAMES]) == pin  # same address, other spelling
    after = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before


def test_init_with_new_hostnames_reissues_server_cert_under_same_ca(tmp_path):
    pin = init_state(tmp_path, ["localhost"])
    ca_before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    server_before = (tmp_path / "server.pem").read_bytes()
    key_before = (tmp_path / "server.key").read_bytes()

    assert init_state(tmp_path, ["relay.example.com", "::1"]) == pin
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    assert (tmp_path / "server.pem").read_bytes() != server_before
    assert (tmp_path / "server.key").read_bytes() != key_before
    assert mode_of(tmp_path / "server.key") == 0o600
    cert = load_cert(tmp_path / "server.pem")
    assert sans_of(cert).get_values_for_type(x509.DNSName) == ["relay.example.com"]
    assert sans_of(cert).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    cert.verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))


def test_init_without_hostnames_keeps_existing_server_cert(tmp_path):
    init_state(tmp_path, ["relay.example.com"])
    before = (tmp_path / "server.pem").read_bytes()
    init_state(tmp_path)
    assert (tmp_path / "server.pem").read_bytes() == before


def test_init_reissues_missing_or_mismatched_server_files(tmp_path):
    pin = init_state(tmp_path, ["localhost"])
    (tmp_path / "server.pem").unlink()
    assert init_state(tmp_path, ["localhost"]) == pin
    assert sans_of(load_cert(tmp_path / "server.pem")).get_values_for_type(x509.DNSName) == [
        "localhost"
    ]
    # A key that does not belong to the certificate (an interrupted re-issue) is repaired.
    (tmp_path / "server.key").write_bytes((tmp_path / "ca.key").read_bytes())
    init_state(tmp_path, ["localhost"])
    key = serialization.load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    cert = load_cert(tmp_path / "server.pem")
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_init_never_overwrites_a_lone_ca_key(tmp_path):
    init_state(tmp_path, ["localhost"])
    key = (tmp_path / "ca.key").read_bytes()
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(StateError, match="ca.key exists but .*ca.pem does not"):
        init_state(tmp_path, ["localhost"])
    assert (tmp_path / "ca.key").read_bytes() == key


def test_init_needs_ca_key_only_to_issue(tmp_path):
    pin = init_state(tmp_path, ["localhost"])
    (tmp_path / "ca.key").unlink()  # kept offline by a careful operator
    assert init_state(tmp_path, ["localhost"]) == pin
    assert State(tmp_path).ca_pin() == pin
    with pytest.raises(StateError, match="ca.key is missing"):
        init_state(tmp_path, ["relay.example.com"])


@pytest.mark.parametrize("bad", ["", " ", "relay example", "relay.example.com ", "h\u00e9", "a..b"])
def test_init_rejects_bad_hostnames(tmp_path, bad):
    with pytest.raises(ValueError, match="bad hostname"):
        init_state(tmp_path / "state", ["localhost", bad])
    assert not (tmp_path / "state").exists()


def test_default_hostnames(monkeypatch):
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "Relay.Example.NET")
    assert default_hostnames() == ["localhost", "127.0.0.1", "::1", "relay.example.net"]
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "localhost")
    assert default_hostnames() == ["localhost", "127.0.0.1", "::1"]
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "bad name")
    assert default_hostnames() == ["localhost", "127.0.0.1", "::1"]


def test_init_defaults_cover_loopback_and_fqdn(tmp_path, monkeypatch):
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "relay.example.net")
    init_state(tmp_path)
    sans = sans_of(load_cert(tmp_path / "server.pem"))
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "relay.example.net"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert State(tmp_path).server_hostnames() == [
        "localhost",
        "127.0.0.1",
        "::1",
        "relay.example.net",
    ]


# --- State ---


def test_state_on_missing_dir_says_to_run_init(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StateError) as excinfo:
        State(missing)
    assert str(excinfo.value) == (
        f"state dir {missing} does not exist; run `relay init --state {missing}` first"
    )


def test_state_on_incomplete_dir_says_to_run_init(state_dir):
    (state_dir / "server.key").unlink()
    with pytest.raises(StateError, match=r"incomplete \(no server.key\); run `relay init --state "):
        State(state_dir)


def test_state_paths(state_dir):
    st = State(str(state_dir))
    assert st.path == state_dir
    assert st.ca_cert_path == state_dir / "ca.pem"
    assert st.server_cert_path == state_dir / "server.pem"
    assert st.server_key_path == state_dir / "server.key"


# --- tokens ---


def test_issue_then_authenticate(state_dir):
    st = State(state_dir)
    token = st.issue_token("web", PortSet.parse("8080,2000-2007"))
    name, _, secret = token.partition(".")
    assert name == "web" and len(secret) >= 43
    assert st.authenticate(token) == Agent("web", PortSet.parse("2000-2007,8080"))
    any_port = st.issue_token("db")
    assert st.authenticate(any_port) == Agent("db", None)
    assert st.agents() == {
        "web": Agent("web", PortSet.parse("8080,2000-2007")),
        "db": Agent("db", None),
    }


def test_tokens_are_random(state_dir):
    st = State(state_dir)
    assert len({st.issue_token(f"a{i}") for i in range(5)}) == 5


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # wrong secret
        lambda t: "other" + t[t.index(".") :],  # unknown name, right secret
        lambda t: t.replace(".", ""),  # no separator
        lambda t: t.split(".")[0] + ".",  # empty secret
        lambda t: "." + t.split(".", 1)[1],  # empty name
        lambda t: "",
        lambda t: ".",
        lambda t: t + "\n",
        lambda t: t + "\u00e9",  # non-ASCII
        lambda t: t + "\ud800",  # lone surrogate: would not even encode
        lambda t: t + "x" * 10_000_000,  # huge
        lambda t: t.encode(),  # not a str
        lambda t: None,
    ],
)
def test_bad_tokens_are_refused(state_dir, make_bad):
    st = State(state_dir)
    token = st.issue_token("web")
    assert st.authenticate(token) is not None
    assert st.authenticate(make_bad(token)) is None


def test_overlong_token_is_refused_before_any_lookup(state_dir, monkeypatch):
    st = State(state_dir)
    token = st.issue_token("web")
    looked_up = []
    monkeypatch.setattr(st, "_current_agents", lambda: looked_up.append(1) or {})
    assert st.authenticate("web." + "x" * (defaults.MAX_TOKEN_LENGTH - 4)) is None
    assert looked_up == [1]  # 512 characters: still looked up
    assert st.authenticate(token + "x" * defaults.MAX_TOKEN_LENGTH) is None
    assert st.authenticate("web." + "x" * 10_000_000) is None
    assert looked_up == [1]


def test_agents_json_holds_no_secret(state_dir):
    token = State(state_dir).issue_token("web", PortSet.parse("8080"))
    secret = token.split(".", 1)[1]
    path = state_dir / "agents.json"
    text = path.read_text()
    assert secret not in text
    assert json.loads(text) == {
        "agents": {
            "web": {"secret_sha256": hashlib.sha256(secret.encode()).hexdigest(), "ports": "8080"}
        }
    }
    assert mode_of(path) == 0o600
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_rotation_invalidates_old_token_and_replaces_ports(state_dir):
    st = State(state_dir)
    old = st.issue_token("web", PortSet.parse("8080"))
    new = st.issue_token("web", PortSet.parse("9090"))
    assert st.authenticate(old) is None
    assert st.authenticate(new) == Agent("web", PortSet.parse("9090"))
    assert list(st.agents()) == ["web"]


def test_running_relay_sees_new_and_rotated_tokens_without_restart(state_dir):
    relay = State(state_dir)
    assert relay.agents() == {}  # loaded (no file yet) before the CLI runs
    first = State(state_dir).issue_token("web")  # `relay agent-token` in another process
    assert relay.authenticate(first) == Agent("web", None)
    second = State(state_dir).issue_token("web")  # same size, maybe same mtime: rotation
    assert relay.authenticate(first) is None
    assert relay.authenticate(second) == Agent("web", None)


def test_malformed_agents_json_is_a_state_error(state_dir):
    (state_dir / "agents.json").write_text('{"agents": {"web": {"secret_sha256": "nope"}}}')
    with pytest.raises(StateError, match="agents.json is malformed"):
        State(state_dir).agents()


def test_an_agents_json_that_cannot_be_read_is_not_called_malformed(state_dir):
    """A read that fails (permissions, no descriptors left) is no reason to delete the file,
    which the advice for a malformed one says: that would revoke every agent."""
    (state_dir / "agents.json").mkdir()  # as root, a directory is what cannot be read
    with pytest.raises(StateError) as raised:
        State(state_dir).agents()
    assert "cannot read" in str(raised.value) and "agents.json" in str(raised.value)
    assert "delete" not in str(raised.value) and "malformed" not in str(raised.value)


def test_secret_never_in_exceptions_or_repr(state_dir):
    st = State(state_dir)
    token = st.issue_token("web")
    secret = token.split(".", 1)[1]
    assert secret not in repr(st.authenticate(token))
    assert secret not in repr(st) + repr(st.agents())


@pytest.mark.parametrize("bad", ["", "-web", "_web", "a.b", "a b", "x" * 65, "w\u00e9b", "web\n"])
def test_issue_token_rejects_bad_names(state_dir, bad):
    with pytest.raises(ValueError, match="bad agent name"):
        State(state_dir).issue_token(bad)
    assert not (state_dir / "agents.json").exists()


def test_issue_token_accepts_edge_names(state_dir):
    st = State(state_dir)
    for name in ("a", "0", "A-b_9", "x" * 64):
        assert st.authenticate(st.issue_token(name)).name == name


def test_longest_accepted_token_fits_a_control_frame():
    assert defaults.MAX_TOKEN_LENGTH < defaults.MAX_CONTROL_PAYLOAD


# --- private files (relay agent-cert --out) ---


def test_write_private_file_is_0600_and_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "agent.pem"
    state.write_private_file(path, b"first")
    assert path.read_bytes() == b"first" and mode_of(path) == 0o600
    with pytest.raises(FileExistsError):
        state.write_private_file(path, b"second")
    assert path.read_bytes() == b"first"
    state.write_private_file(path, b"third", overwrite=True)
    assert path.read_bytes() == b"third" and mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.pem"]  # no temp files left


def test_write_private_file_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(state.os, "link", no_links)
    path = tmp_path / "agent.pem"
    state.write_private_file(path, b"first")
    with pytest.raises(FileExistsError):
        state.write_private_file(path, b"second")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.pem"]


def test_issue_token_keeps_an_agents_certificate(state_dir):
    st = State(state_dir)
    issued = st.issue_certificate("web")
    st.record_certificate("web", issued, None)
    st.issue_token("web", PortSet.parse("8080"))
    entry = json.loads((state_dir / "agents.json").read_text())["agents"]["web"]
    assert entry["cert_sha256"] == issued.fingerprint.removeprefix("sha256:")
    assert entry["ports"] == "8080" and len(entry["secret_sha256"]) == 64
