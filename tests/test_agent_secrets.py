"""Secrets on the agent's command line are visible to every local user: the agent says so,
and only when they really came from the command line (not from the --config file)."""

from __future__ import annotations

from relay import agent_tap


def options(*argv):
    parsed = agent_tap.Options()
    parsed.parseOptions(["--relay", "relay.example.com:7835", "--expose", "8080=127.0.0.1:80", *argv])
    return parsed


def token_file(tmp_path):
    path = tmp_path / "agent.token"
    path.write_text("a1.secret\n")
    path.chmod(0o600)
    return path


def warned(logs, what):
    return [line for line in logs if f"the {what} was given on the command line" in line]


def test_proxy_password_on_argv_is_warned_without_showing_it(logs):
    parsed = options("--token", "a1.secret", "--proxy", "http://alice:hunter2@proxy.example:3128")
    assert parsed["proxy-url"].password == "hunter2"
    assert warned(logs, "proxy password")
    assert not any("hunter2" in line for line in logs)


def test_proxy_without_password_or_from_the_config_file_is_not_warned(logs, tmp_path):
    options("--token-file", str(token_file(tmp_path)), "--proxy", "socks5://proxy.example:1080")
    assert not warned(logs, "proxy password")
    config = tmp_path / "agent.toml"
    config.write_text('proxy = "http://alice:hunter2@proxy.example:3128"\ntoken = "a1.secret"\n')
    parsed = options("--config", str(config))
    assert parsed["proxy-url"].password == "hunter2"
    assert parsed["token-value"] == "a1.secret"
    assert not warned(logs, "proxy password")
    assert not warned(logs, "token")


def test_token_on_argv_is_warned(logs):
    assert options("--token", "a1.secret")["token-value"] == "a1.secret"
    assert warned(logs, "token")
    assert not any("a1.secret" in line for line in logs)
