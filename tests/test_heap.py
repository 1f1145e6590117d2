"""glibc's heap thresholds are fixed by both twistd services (relay/heap.py), where glibc is."""

from __future__ import annotations

import ctypes
import platform

import pytest

from relay import agent_tap, heap, server_tap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_thresholds_are_set_on_glibc():
    assert heap.keep_buffers_on_the_heap() is True
    assert heap.MMAP_THRESHOLD > 1024 * 1024  # above the tunnel's 1 MiB read


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert heap.keep_buffers_on_the_heap() is False


def test_both_services_set_them(state, tmp_path, monkeypatch, no_listen_server_tap):
    calls = []
    for tap in (agent_tap, server_tap):
        monkeypatch.setattr(tap, "keep_buffers_on_the_heap", lambda tap=tap: calls.append(tap.__name__))

    token = tmp_path / "token"
    token.write_text(state.issue_token("a1", None))
    token.chmod(0o600)
    options = agent_tap.Options()
    options.parseOptions(
        ["--relay", "relay.example.com:7835", "--expose", "8080=127.0.0.1:80", "--token-file", str(token),
         "--ca", str(state.ca_cert_path), "--no-proxy"]
    )  # fmt: skip
    agent_tap.makeService(options)

    options = server_tap.Options()
    options.parseOptions(["--state", str(state.path), "--tunnel", "tcp:7835"])
    server_tap.makeService(options)
    assert calls == ["relay.agent_tap", "relay.server_tap"]
