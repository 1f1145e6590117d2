"""Agents authenticated by a client certificate from the relay's CA (`relay agent-cert`, `--cert`):
in memory over real TLS with iosim, like test_tunnel.py, plus the agent's options."""

from __future__ import annotations

import datetime
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.python import usage

from relay import agent_tap
from relay.agent import Target
from relay.protocol import ErrorCode
from relay.state import CERTIFICATE, TOKEN, Agent, PortSet, State, StateError, init_state
from relay.tls import (
    PinnedClientOptions,
    TLSConfigError,
    client_options_for_ca,
    load_client_certificate,
)

from .inmemory import World, stream

EXPOSE = {8080: Target("127.0.0.1", 80)}


@pytest.fixture
def world(state):
    return World(state)


def issue(state, tmp_path, name="a1", ports="8080,9000-9001"):
    """`relay agent-cert`: a PEM file for the agent, recorded in agents.json."""
    portset = PortSet.parse(ports) if ports else None
    issued = state.issue_certificate(name, portset)
    path = tmp_path / f"{name}-{issued.fingerprint[7:15]}.pem"
    path.write_bytes(issued.pem)
    state.record_certificate(name, issued, portset)
    return path


def with_cert(state, pem_path, pin=False):
    client = load_client_certificate(pem_path)
    if pin:
        return PinnedClientOptions("localhost", state.ca_pin(), client)
    return client_options_for_ca("localhost", state.ca_cert_path, client)


def cert_agent(world, state, pem_path, token=None, expose=None, pin=False):
    agent = world.agent(token, expose or EXPOSE, creator=with_cert(state, pem_path, pin))
    agent.flush()
    return agent


def goaways(agent):
    seen = []
    agent.service.go_away_received = lambda code, reason: seen.append((code, reason))
    return seen


def foreign_ca_pem(tmp_path, name="a1"):
    """A key and client certificate for NAME from another relay's CA."""
    init_state(tmp_path / "other", ["localhost"])
    other = State(tmp_path / "other")
    path = tmp_path / "foreign.pem"
    path.write_bytes(other.issue_certificate(name).pem)
    return path


# --- the relay accepts a certificate instead of a token ---------------------------------


@pytest.mark.parametrize("pin", [False, True], ids=["ca", "pin"])
def test_certificate_agent_without_token_is_welcomed_and_served(world, state, tmp_path, logs, pin):
    pem = issue(state, tmp_path, ports="8080,9000")
    agent = cert_agent(world, state, pem, expose={8080: Target("127.0.0.1", 80), 9000: Target("h", 1)}, pin=pin)
    assert agent.tunnel.welcomed
    assert world.relay.tunnels["a1"] is agent.relay_tunnel
    assert agent.relay_tunnel.agent == Agent("a1", PortSet.parse("8080,9000"))
    assert agent.relay_tunnel.credential.method == CERTIFICATE
    assert sorted(world.relay.public) == [8080, 9000]
    client, client_sock, target, target_sock = stream(world, agent)
    client.dataReceived(b"over mTLS")
    agent.flush()
    assert target_sock.value() == b"over mTLS"
    assert any("agent a1 connected" in line and "authenticated by certificate" in line for line in logs)


def test_token_agents_still_work_beside_certificate_agents(world, state, tmp_path, logs):
    pem = issue(state, tmp_path, name="c1", ports="9000")
    token = state.issue_token("t1", PortSet.parse("8080"))
    by_cert = cert_agent(world, state, pem, expose={9000: Target("h", 1)})
    by_token = world.agent(token, EXPOSE)
    by_token.flush()
    assert by_cert.tunnel.welcomed and by_token.tunnel.welcomed
    assert by_token.relay_tunnel.credential.method == TOKEN
    assert sorted(world.relay.public) == [8080, 9000]
    assert any("agent t1 connected" in line and "authenticated by token" in line for line in logs)
    secret = token.split(".", 1)[1]
    assert not any(secret in line for line in logs)


def test_token_and_certificate_of_one_agent_are_both_valid(world, state, tmp_path):
    token = state.issue_token("a1", PortSet.parse("8080"))
    pem = issue(state, tmp_path, ports="8080")
    first = world.agent(token, EXPOSE)
    first.flush()
    assert first.tunnel.welcomed
    second = cert_agent(world, state, pem)  # same agent by its other credential: takes over
    first.flush()
    assert second.tunnel.welcomed
    assert world.relay.tunnels["a1"] is second.relay_tunnel
    assert not first.tunnel.connected_tunnel


def test_a_presented_certificate_decides_alone(world, state, tmp_path):
    """A valid certificate with a wrong token works; a replaced one with a valid token does not."""
    old_pem = issue(state, tmp_path)
    new_pem = issue(state, tmp_path)
    token = state.issue_token("a1", PortSet.parse("8080"))  # keeps the current certificate
    good = cert_agent(world, state, new_pem, token="a1.wrong")
    assert good.tunnel.welcomed and good.relay_tunnel.credential.method == CERTIFICATE
    world.relay.tunnels.clear()
    bad = world.agent(token, EXPOSE, creator=with_cert(state, old_pem))
    seen = goaways(bad)
    bad.flush()
    assert not bad.tunnel.welcomed
    assert seen and seen[0][0] == ErrorCode.AUTH_FAILED
    assert "client certificate (CN=a1) is not an agent's current certificate" in seen[0][1]


def test_replaced_certificate_is_refused(world, state, tmp_path, logs):
    old_pem = issue(state, tmp_path)
    new_pem = issue(state, tmp_path)  # `relay agent-cert` again: the old one stops working
    old = world.agent(None, EXPOSE, creator=with_cert(state, old_pem))
    seen = goaways(old)
    old.flush()
    assert not old.tunnel.welcomed
    assert [code for code, _ in seen] == [ErrorCode.AUTH_FAILED]
    assert world.relay.tunnels == {} and world.relay.public == {}
    assert any("authentication failed" in line and "replaced or revoked" in line for line in logs)
    new = cert_agent(world, state, new_pem)
    assert new.tunnel.welcomed


def test_revoked_certificate_is_refused(world, state, tmp_path):
    pem = issue(state, tmp_path)
    state.revoke("a1")
    agent = world.agent(None, EXPOSE, creator=with_cert(state, pem))
    seen = goaways(agent)
    agent.flush()
    assert not agent.tunnel.welcomed
    assert [code for code, _ in seen] == [ErrorCode.AUTH_FAILED]


def test_certificate_from_another_ca_fails_the_tls_handshake(world, state, tmp_path):
    """Refused by TLS itself: the hello (even with a valid token in it) is never read."""
    token = state.issue_token("a1", PortSet.parse("8080"))
    agent = world.agent(token, EXPOSE, creator=with_cert(state, foreign_ca_pem(tmp_path)))
    hellos = []
    agent.relay_tunnel.control_received = hellos.append
    agent.flush()
    assert hellos == []
    assert not agent.tunnel.welcomed
    assert world.relay.tunnels == {} and world.relay.public == {}
    assert "unknown ca" in str(agent.tunnel.lost_reason.value)


def test_failed_tls_handshakes_log_one_line_per_address_per_interval(world, state, tmp_path, logs):
    """A stranger can fail handshakes as fast as it connects: the relay's log must not grow with them."""
    from relay.logs import GROUP_LINES

    pem = foreign_ca_pem(tmp_path)
    for _ in range(5):
        world.agent("x.y", EXPOSE, creator=with_cert(state, pem)).flush()
    for i in range(GROUP_LINES + 5):
        world.agent("x.y", EXPOSE, creator=with_cert(state, pem), peer_host=f"203.0.113.{i}").flush()
    closed = [line for line in logs if "closed before authenticating" in line]
    assert len(closed) == GROUP_LINES  # the first address once, then nine more addresses
    assert all("certificate verify failed" in line for line in closed)
    world.clock.advance(10)
    world.agent("x.y", EXPOSE, creator=with_cert(state, pem)).flush()
    last = [line for line in logs if "closed before authenticating" in line][-1]
    assert last.startswith("tunnel 198.51.100.1:5000:")
    assert last.endswith("(6 more of this kind were not logged) (4 more like this in the last 10 s)")
    good = world.agent(state.issue_token("a1", PortSet.parse("8080")), EXPOSE)
    good.flush()
    assert good.tunnel.welcomed and world.relay.tunnels.keys() == {"a1"}


def test_relay_server_certificate_is_no_client_certificate(world, state, tmp_path):
    """Signed by the same CA but for serverAuth only: OpenSSL's purpose check refuses it."""
    token = state.issue_token("a1", PortSet.parse("8080"))
    pem = tmp_path / "server-as-client.pem"
    pem.write_bytes(state.server_key_path.read_bytes() + state.server_cert_path.read_bytes())
    agent = world.agent(token, EXPOSE, creator=with_cert(state, pem))
    hellos = []
    agent.relay_tunnel.control_received = hellos.append
    agent.flush()
    assert hellos == [] and not agent.tunnel.welcomed


def test_expired_certificate_fails_the_tls_handshake(world, state, tmp_path):
    ca_cert = x509.load_pem_x509_certificate(state.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((state.path / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = tmp_path / "expired.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    # Recorded as current, so only the validity dates can refuse it.
    record = {"ports": None, "cert_sha256": cert.fingerprint(hashes.SHA256()).hex()}
    state.agents_path.write_text(json.dumps({"agents": {"a1": record}}))
    agent = world.agent(None, EXPOSE, creator=with_cert(state, pem))
    agent.flush()
    assert not agent.tunnel.welcomed
    assert "expired" in str(agent.tunnel.lost_reason.value)


def test_no_certificate_and_no_token_is_refused(world, state):
    state.issue_token("a1")
    agent = world.agent(None, EXPOSE)
    seen = goaways(agent)
    agent.flush()
    assert not agent.tunnel.welcomed
    assert seen == [(ErrorCode.AUTH_FAILED, "authentication failed: no client certificate and no token")]


def test_broken_agents_json_refuses_with_internal_error_and_the_relay_carries_on(world, state, tmp_path):
    pem = issue(state, tmp_path)
    (state.path / "agents.json").write_text("{not json")
    agent = world.agent(None, EXPOSE, creator=with_cert(state, pem))
    seen = goaways(agent)
    agent.flush()
    assert [code for code, _ in seen] == [ErrorCode.INTERNAL_ERROR]
    assert world.relay.unauthenticated == 0


# --- State: issuing and checking certificates ------------------------------------------


def test_issued_certificate_is_a_client_certificate_from_the_ca(state):
    issued = state.issue_certificate("web", PortSet.parse("8080"))
    key = serialization.load_pem_private_key(issued.pem, None)
    cert = x509.load_pem_x509_certificate(issued.pem)
    ca = x509.load_pem_x509_certificate(state.ca_cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.subject.rfc4514_string() == "CN=web"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 364 <= days <= 366
    assert issued.not_after == cert.not_valid_after_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    assert issued.fingerprint == "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    assert "PRIVATE KEY" not in repr(issued)
    assert state.authenticate_certificate(der) is None  # not recorded yet
    state.record_certificate("web", issued, PortSet.parse("8080"))
    assert state.authenticate_certificate(der) == Agent("web", PortSet.parse("8080"))


def test_certificate_authentication_needs_the_current_fingerprint(state):
    first = state.issue_certificate("web")
    state.record_certificate("web", first, None)
    first_der = x509.load_pem_x509_certificate(first.pem).public_bytes(serialization.Encoding.DER)
    second = state.issue_certificate("web")
    assert state.record_certificate("web", second, None) is True  # replaced one
    second_der = x509.load_pem_x509_certificate(second.pem).public_bytes(serialization.Encoding.DER)
    assert state.authenticate_certificate(first_der) is None
    assert state.authenticate_certificate(second_der) == Agent("web", None)
    for garbage in (b"", b"\x30\x00", second_der[:-1], "text", None):
        assert state.authenticate_certificate(garbage) is None


def test_certificate_of_one_agent_does_not_authenticate_another(state):
    """The CN picks the record; the fingerprint must be that record's."""
    web = state.issue_certificate("web")
    state.record_certificate("web", web, None)
    db = state.issue_certificate("db")
    state.record_certificate("db", db, None)
    web_der = x509.load_pem_x509_certificate(web.pem).public_bytes(serialization.Encoding.DER)
    found = state.verify_certificate(web_der)
    assert found[0].name == "web"
    # Hand-edited agents.json that gives web's fingerprint to db: the CN still says web.
    doc = json.loads(state.agents_path.read_text())
    doc["agents"]["db"]["cert_sha256"] = doc["agents"]["web"]["cert_sha256"]
    del doc["agents"]["web"]
    state.agents_path.write_text(json.dumps(doc))
    state.refresh(force=True)
    assert state.verify_certificate(web_der) is None


def test_token_and_certificate_coexist_and_keep_each_other(state):
    token = state.issue_token("web", PortSet.parse("8080"))
    issued = state.issue_certificate("web")
    state.record_certificate("web", issued, PortSet.parse("9000"))
    der = x509.load_pem_x509_certificate(issued.pem).public_bytes(serialization.Encoding.DER)
    assert state.authenticate(token) == Agent("web", PortSet.parse("9000"))  # ports: the latest
    assert state.authenticate_certificate(der) == Agent("web", PortSet.parse("9000"))
    assert state.credentials("web") == (TOKEN, CERTIFICATE)
    new_token = state.issue_token("web")  # rotating the token keeps the certificate
    assert state.authenticate(token) is None
    assert state.authenticate(new_token) == Agent("web", None)
    assert state.authenticate_certificate(der) == Agent("web", None)


def test_still_valid_follows_rotation_replacement_and_revocation(state):
    token = state.issue_token("web")
    _, by_token = state.verify_token(token)
    issued = state.issue_certificate("web")
    state.record_certificate("web", issued, None)
    der = x509.load_pem_x509_certificate(issued.pem).public_bytes(serialization.Encoding.DER)
    _, by_cert = state.verify_certificate(der)
    assert state.still_valid("web", by_token) and state.still_valid("web", by_cert)
    assert not state.still_valid("other", by_token)
    state.issue_token("web")
    assert not state.still_valid("web", by_token) and state.still_valid("web", by_cert)
    state.record_certificate("web", state.issue_certificate("web"), None)
    assert not state.still_valid("web", by_cert)
    state.revoke("web")
    assert state.credentials("web") == ()


def test_revoke_removes_the_agent(state):
    state.issue_token("web")
    state.record_certificate("web", state.issue_certificate("web"), None)
    state.issue_token("db")
    revoked = state.revoke("web")
    assert (revoked.name, revoked.token, revoked.certificate) == ("web", True, True)
    assert list(state.agents()) == ["db"]
    assert state.revoke("db").certificate is False
    assert state.agents() == {}
    with pytest.raises(KeyError):
        state.revoke("db")


def test_generation_changes_only_when_the_agents_change(state):
    g0 = state.refresh()
    state.issue_token("web")
    g1 = state.refresh()
    assert g1 != g0
    assert state.refresh() == g1
    assert state.refresh(force=True) == g1  # re-read, same contents
    state.revoke("web")
    assert state.refresh() != g1


def test_certificate_needs_the_ca_key(state):
    (state.path / "ca.key").rename(state.path / "offline.key")
    with pytest.raises(StateError, match="ca.key is missing"):
        state.issue_certificate("web")


def test_agents_json_with_a_certificate_only_agent(state):
    issued = state.issue_certificate("web")
    state.record_certificate("web", issued, PortSet.parse("8080"))
    assert json.loads(state.agents_path.read_text()) == {
        "agents": {"web": {"cert_sha256": issued.fingerprint[7:], "ports": "8080"}}
    }
    assert stat.S_IMODE(os.stat(state.agents_path).st_mode) == 0o600


@pytest.mark.parametrize(
    "entry",
    [
        {"ports": None},
        {"ports": None, "cert_sha256": "xyz"},
        {"ports": None, "cert_sha256": "A" * 64},
        {"ports": None, "secret_sha256": None, "cert_sha256": None},
    ],
)
def test_malformed_certificate_entries_are_a_state_error(state, entry):
    state.agents_path.write_text(json.dumps({"agents": {"web": entry}}))
    with pytest.raises(StateError, match="bad entry for agent 'web'"):
        state.agents()


# --- TLS helpers and the agent's options -------------------------------------------------


def test_load_client_certificate_errors(state, tmp_path):
    issued = state.issue_certificate("web")
    only_cert = tmp_path / "cert-only.pem"
    only_cert.write_bytes(issued.pem[issued.pem.index(b"-----BEGIN CERTIFICATE") :])
    with pytest.raises(TLSConfigError, match="private key and its certificate"):
        load_client_certificate(only_cert)
    mismatch = tmp_path / "mismatch.pem"
    other = state.issue_certificate("db")
    mismatch.write_bytes(other.pem[: other.pem.index(b"-----BEGIN CERTIFICATE")] + only_cert.read_bytes())
    with pytest.raises(TLSConfigError, match="does not belong"):
        load_client_certificate(mismatch)
    with pytest.raises(TLSConfigError, match="cannot read --cert"):
        load_client_certificate(tmp_path / "missing.pem")
    good = tmp_path / "good.pem"
    good.write_bytes(issued.pem)
    assert load_client_certificate(good).getSubject().commonName == b"web"


def agent_options(*argv):
    options = agent_tap.Options()
    options.parseOptions(["--relay", "relay.example.com:7835", "--expose", "8080=127.0.0.1:80", *argv])
    return options


def test_agent_with_cert_needs_no_token(state, tmp_path, monkeypatch):
    monkeypatch.delenv("RELAY_TOKEN", raising=False)
    pem = tmp_path / "web.pem"
    pem.write_bytes(state.issue_certificate("web").pem)
    pem.chmod(0o600)
    options = agent_options("--cert", str(pem), "--ca", str(state.ca_cert_path))
    assert options["token-value"] is None
    assert options["client-certificate"].getSubject().commonName == b"web"
    monkeypatch.setenv("RELAY_TOKEN", "web.from-the-environment")
    assert agent_options("--cert", str(pem))["token-value"] is None  # ignored with --cert


def test_agent_without_any_credential_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("RELAY_TOKEN", raising=False)
    with pytest.raises(usage.UsageError, match="--cert FILE"):
        agent_options()


@pytest.mark.parametrize("token_option", [["--token", "web.x"], ["--token-file", "/dev/null"]])
def test_agent_with_cert_and_token_is_a_usage_error(state, tmp_path, token_option):
    pem = tmp_path / "web.pem"
    pem.write_bytes(state.issue_certificate("web").pem)
    with pytest.raises(usage.UsageError, match="--cert or a token"):
        agent_options("--cert", str(pem), *token_option)


def test_agent_with_a_bad_cert_file_is_a_usage_error(tmp_path):
    (tmp_path / "bad.pem").write_text("not a pem")
    with pytest.raises(usage.UsageError, match="--cert .*bad.pem"):
        agent_options("--cert", str(tmp_path / "bad.pem"))
    with pytest.raises(usage.UsageError, match="cannot read --cert"):
        agent_options("--cert", str(tmp_path / "missing.pem"))


@pytest.mark.parametrize("trust", ["ca", "pin", "system"])
def test_agent_service_with_cert_sends_no_token(state, tmp_path, trust):
    pem = tmp_path / "web.pem"
    pem.write_bytes(state.issue_certificate("web").pem)
    pem.chmod(0o600)
    extra = {"ca": ["--ca", str(state.ca_cert_path)], "pin": ["--pin", state.ca_pin()], "system": []}[trust]
    service = agent_tap.makeService(agent_options("--cert", str(pem), "--no-proxy", *extra))
    assert service.settings.token is None
