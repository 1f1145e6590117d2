"""Tests for the `relay` console script, called as relay.cli.main([...])."""

import os
import re
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import defaults, state
from relay.cli import main
from relay.state import Agent, PortSet, State, cert_pin


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch):
    # No DNS lookups in tests, and a known default name.
    monkeypatch.setattr(state.socket, "getfqdn", lambda: "relay.example.net")


@pytest.fixture
def state_dir(tmp_path, capsys):
    path = tmp_path / "state"
    assert main(["init", "--state", str(path), "--hostname", "localhost"]) == 0
    capsys.readouterr()
    return path


def one_error_line(err, prefix):
    """Check the SPEC's error format: one line, starting with PREFIX, containing error:."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), err
    return lines[0]


def test_init_prints_pin_and_hints(tmp_path, capsys):
    path = tmp_path / "state"
    assert main(["init", "--state", str(path)]) == 0
    out, err = capsys.readouterr()
    pin = cert_pin((path / "ca.pem").read_bytes())
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pin)
    assert out.splitlines()[0] == f"CA pin: {pin}"
    assert f"--ca {path / 'ca.pem'}" in out
    assert f"--pin {pin}" in out
    assert "localhost, 127.0.0.1, ::1, relay.example.net" in out
    assert err == ""


def test_init_twice_keeps_pin_and_new_hostname_reissues(tmp_path, capsys):
    path = str(tmp_path / "state")
    assert main(["init", "--state", path]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main(["init", "--state", path, "--hostname", "a.example", "--hostname", "::1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == first
    assert "(names: a.example, ::1)" in out
    assert State(path).server_hostnames() == ["a.example", "::1"]


def test_init_default_state_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / defaults.STATE_DIR / "ca.pem").is_file()


def test_agent_token_prints_only_the_token(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.endswith("\n")
    token = out.strip()
    assert token.startswith("web.")
    assert State(state_dir).authenticate(token) == Agent("web", None)
    assert "created" in err and token.split(".", 1)[1] not in err


def test_agent_token_stores_ports(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "--ports", "8080,2000-2007", "web"]) == 0
    token = capsys.readouterr().out.strip()
    assert State(state_dir).authenticate(token).ports == PortSet.parse("2000-2007,8080")


def test_agent_token_rotates(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 0
    old = capsys.readouterr().out.strip()
    assert main(["agent-token", "--state", str(state_dir), "web", "--ports", "9000"]) == 0
    out, err = capsys.readouterr()
    st = State(state_dir)
    assert st.authenticate(old) is None
    assert st.authenticate(out.strip()) == Agent("web", PortSet.parse("9000"))
    assert "rotated" in err


def test_agent_token_on_missing_state_dir_exits_1(tmp_path, capsys):
    missing = tmp_path / "x"
    assert main(["agent-token", "--state", str(missing), "web"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    line = one_error_line(err, "relay agent-token")
    assert f"relay init --state {missing}" in line
    assert not missing.exists()


def test_bad_ports_is_a_usage_error(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "--ports", "8080,http", "web"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "'http'" in one_error_line(err, "relay agent-token")
    assert not (state_dir / "agents.json").exists()


@pytest.mark.parametrize(
    "ports, bad", [("70000", "port 70000"), ("9-1", "'9-1'"), ("80,", "empty")]
)
def test_bad_ports_names_the_problem(state_dir, capsys, ports, bad):
    assert main(["agent-token", "--state", str(state_dir), "--ports", ports, "web"]) == 2
    line = one_error_line(capsys.readouterr().err, "relay agent-token")
    assert bad in line


def test_bad_name_is_a_usage_error(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "we.b"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "bad agent name 'we.b'" in one_error_line(err, "relay agent-token")


def test_bad_name_is_a_usage_error_even_without_state_dir(tmp_path, capsys):
    assert main(["agent-token", "--state", str(tmp_path / "x"), "-"]) == 2
    one_error_line(capsys.readouterr().err, "relay agent-token")


def test_bad_hostname_is_a_usage_error(tmp_path, capsys):
    assert main(["init", "--state", str(tmp_path / "s"), "--hostname", "a b"]) == 2
    assert "bad hostname 'a b'" in one_error_line(capsys.readouterr().err, "relay init")
    assert not (tmp_path / "s").exists()


def test_unknown_subcommand(capsys):
    assert main(["frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "'frobnicate'" in one_error_line(err, "relay")


def test_no_subcommand(capsys):
    assert main([]) == 2
    assert "see 'relay --help'" in one_error_line(capsys.readouterr().err, "relay")


def test_missing_name(capsys):
    assert main(["agent-token"]) == 2
    assert "NAME" in one_error_line(capsys.readouterr().err, "relay agent-token")


def test_unwritable_state_dir_is_a_runtime_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["init", "--state", str(tmp_path / "file" / "state")]) == 1
    line = one_error_line(capsys.readouterr().err, "relay init")
    assert "file" in line and "check the path" in line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--help"], ["init", "agent-token"]),
        (["init", "--help"], ["--state", "--hostname", defaults.STATE_DIR]),
        (["agent-token", "--help"], ["--state", "--ports", "NAME", "1024-65535"]),
    ],
)
def test_help(argv, words, capsys):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: relay {' '.join(argv[:-1])}".rstrip())
    assert all(word in out for word in words), out
    assert err == ""


def test_error_stays_one_line_for_a_path_with_a_newline(tmp_path, capsys):
    missing = tmp_path / "new\nline"
    assert main(["agent-token", "--state", str(missing), "web"]) == 1
    assert "run `relay init --state" in one_error_line(capsys.readouterr().err, "relay agent-token")


class BrokenStdout:
    """A standard output that takes nothing: a closed pipe (`| head -1`) or a full disk."""

    def __init__(self, error):
        self.error = error

    def write(self, text):
        raise self.error

    def flush(self):
        raise self.error


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), OSError(28, "No space left on device")])
def test_an_unwritable_stdout_after_agent_token_says_the_token_is_lost(state_dir, capsys, monkeypatch, error):
    """The credential is stored before the token is printed: say so, and what to do, not
    'cannot use STATE' (the state dir is fine)."""
    monkeypatch.setattr("sys.stdout", BrokenStdout(error))
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 1
    line = one_error_line(capsys.readouterr().err, "relay agent-token")
    assert f"cannot write to standard output: {error.strerror}" in line
    assert "run relay agent-token again" in line and "cannot use" not in line
    assert "web" in State(state_dir).agents()


def test_an_unwritable_stdout_after_init_says_the_state_dir_is_set_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout", BrokenStdout(BrokenPipeError(32, "Broken pipe")))
    assert main(["init", "--state", str(tmp_path / "st")]) == 1
    line = one_error_line(capsys.readouterr().err, "relay init")
    assert "cannot write to standard output: Broken pipe; the state dir is set up all the same" in line
    assert State(tmp_path / "st").ca_pin().startswith("sha256:")


# --- agent-cert and agent-revoke ---


def cert_der(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def test_agent_cert_writes_a_private_pem_and_records_it(state_dir, tmp_path, capsys):
    out = tmp_path / "web.pem"
    assert main(["agent-cert", "--state", str(state_dir), "web", "--ports", "8080", "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert err == ""
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    pem = out.read_bytes()
    assert b"-----BEGIN PRIVATE KEY-----" in pem and b"-----BEGIN CERTIFICATE-----" in pem
    st = State(state_dir)
    assert st.authenticate_certificate(cert_der(out)) == Agent("web", PortSet.parse("8080"))
    assert cert_pin(pem) in stdout  # the fingerprint, as "sha256:..."
    assert "created" in stdout and f"--cert {out.name}" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert "PRIVATE KEY" not in stdout


def test_agent_cert_refuses_to_overwrite_without_force(state_dir, tmp_path, capsys):
    out = tmp_path / "web.pem"
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 0
    before, agents_before = out.read_bytes(), (state_dir / "agents.json").read_bytes()
    capsys.readouterr()
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 1
    stdout, err = capsys.readouterr()
    assert stdout == ""
    assert "--force" in one_error_line(err, "relay agent-cert")
    assert out.read_bytes() == before
    assert (state_dir / "agents.json").read_bytes() == agents_before  # the old one still works
    assert State(state_dir).authenticate_certificate(cert_der(out)) is not None


def test_agent_cert_force_replaces_file_and_certificate(state_dir, tmp_path, capsys):
    out = tmp_path / "web.pem"
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 0
    old = cert_der(out)
    capsys.readouterr()
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out), "--force"]) == 0
    assert "previous certificate no longer works" in capsys.readouterr().out
    st = State(state_dir)
    assert st.authenticate_certificate(old) is None
    assert st.authenticate_certificate(cert_der(out)) == Agent("web", None)


def test_agent_cert_keeps_the_token_and_says_so(state_dir, tmp_path, capsys):
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(tmp_path / "w.pem")]) == 0
    assert "token stays valid" in capsys.readouterr().out
    assert State(state_dir).authenticate(token) == Agent("web", None)


def test_agent_cert_without_ca_key_exits_1_and_writes_nothing(state_dir, tmp_path, capsys):
    (state_dir / "ca.key").unlink()
    out = tmp_path / "web.pem"
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 1
    assert "ca.key is missing" in one_error_line(capsys.readouterr().err, "relay agent-cert")
    assert not out.exists() and not (state_dir / "agents.json").exists()


def test_agent_cert_into_a_missing_dir_exits_1_and_records_nothing(state_dir, tmp_path, capsys):
    out = tmp_path / "no-such-dir" / "web.pem"
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err, "relay agent-cert")
    assert f"cannot write --out {out}" in line
    assert not (state_dir / "agents.json").exists()


def test_agent_cert_on_missing_state_dir_exits_1(tmp_path, capsys):
    missing = tmp_path / "x"
    out = tmp_path / "web.pem"
    assert main(["agent-cert", "--state", str(missing), "web", "--out", str(out)]) == 1
    assert "relay init --state" in one_error_line(capsys.readouterr().err, "relay agent-cert")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["web"], "--out"),
        (["we.b", "--out", "x.pem"], "bad agent name 'we.b'"),
        (["web", "--out", "x.pem", "--ports", "http"], "'http'"),
    ],
)
def test_agent_cert_usage_errors(state_dir, tmp_path, monkeypatch, capsys, argv, bad):
    monkeypatch.chdir(tmp_path)
    assert main(["agent-cert", "--state", str(state_dir), *argv]) == 2
    assert bad in one_error_line(capsys.readouterr().err, "relay agent-cert")
    assert not (tmp_path / "x.pem").exists()


def test_agent_revoke_removes_token_and_certificate(state_dir, tmp_path, capsys):
    out = tmp_path / "web.pem"
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["agent-cert", "--state", str(state_dir), "web", "--out", str(out)]) == 0
    assert main(["agent-token", "--state", str(state_dir), "db"]) == 0
    capsys.readouterr()
    assert main(["agent-revoke", "--state", str(state_dir), "web"]) == 0
    stdout, err = capsys.readouterr()
    assert err == ""
    assert "agent 'web' removed with its token and certificate" in stdout
    st = State(state_dir)
    assert st.authenticate(token) is None
    assert st.authenticate_certificate(cert_der(out)) is None
    assert list(st.agents()) == ["db"]
    assert "web" not in (state_dir / "agents.json").read_text()


def test_agent_revoke_of_an_unknown_agent_exits_1(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "db"]) == 0
    capsys.readouterr()
    before = (state_dir / "agents.json").read_bytes()
    assert main(["agent-revoke", "--state", str(state_dir), "web"]) == 1
    stdout, err = capsys.readouterr()
    assert stdout == ""
    line = one_error_line(err, "relay agent-revoke")
    assert "no agent 'web'" in line and "known agents: db" in line
    assert (state_dir / "agents.json").read_bytes() == before


def test_agent_revoke_twice_exits_1_the_second_time(state_dir, capsys):
    assert main(["agent-token", "--state", str(state_dir), "web"]) == 0
    assert main(["agent-revoke", "--state", str(state_dir), "web"]) == 0
    capsys.readouterr()
    assert main(["agent-revoke", "--state", str(state_dir), "web"]) == 1
    assert "known agents: none" in one_error_line(capsys.readouterr().err, "relay agent-revoke")


def test_agent_revoke_bad_name_is_a_usage_error(state_dir, capsys):
    assert main(["agent-revoke", "--state", str(state_dir), "we.b"]) == 2
    assert "bad agent name" in one_error_line(capsys.readouterr().err, "relay agent-revoke")


def test_agent_revoke_on_missing_state_dir_exits_1(tmp_path, capsys):
    assert main(["agent-revoke", "--state", str(tmp_path / "x"), "web"]) == 1
    assert "relay init --state" in one_error_line(capsys.readouterr().err, "relay agent-revoke")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--help"], ["agent-cert", "agent-revoke"]),
        (["agent-cert", "--help"], ["--state", "--ports", "--out", "--force", "NAME", "ca.key"]),
        (["agent-revoke", "--help"], ["--state", "NAME", "SIGHUP"]),
    ],
)
def test_help_of_the_credential_commands(argv, words, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(word in " ".join(out.split()) for word in words), out
