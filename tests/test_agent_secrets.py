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


# --- what stops startup, as a usage error (one line from twistd), before anything runs ---


def test_a_bad_proxy_url_in_the_environment_is_a_usage_error(tmp_path, monkeypatch, logs):
    """It was read in makeService, where twistd prints a usage error as a traceback."""
    import pytest
    from twisted.python import usage

    monkeypatch.setenv("https_proxy", "ftp://alice:hunter2@127.0.0.1:1")
    with pytest.raises(usage.UsageError) as raised:
        options("--token-file", str(token_file(tmp_path)))
    message = str(raised.value)
    assert message.startswith("$https_proxy: ") and message.endswith("(or run with --no-proxy)")
    assert "hunter2" not in message
    parsed = options("--token-file", str(token_file(tmp_path)), "--no-proxy")
    assert parsed["env-proxy-url"] is None


def test_the_proxy_from_the_environment_is_read_with_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert str(options("--token-file", str(token_file(tmp_path)))["env-proxy-url"]) == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "relay.example.com")
    assert options("--token-file", str(token_file(tmp_path)))["env-proxy-url"] is None


def test_an_empty_or_binary_token_file_says_what_is_wrong_with_it(tmp_path):
    import pytest
    from twisted.python import usage

    path = tmp_path / "agent.token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(usage.UsageError, match=rf"^--token-file {path} is empty; "):
        options("--token-file", str(path))
    path.write_bytes(b"\x00\xff\n")
    with pytest.raises(usage.UsageError, match=rf"^--token-file {path} is not text; "):
        options("--token-file", str(path))
