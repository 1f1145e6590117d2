"""Tests for the `relay` console script, called as relay.cli.main([...])."""

import re

import pytest

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
