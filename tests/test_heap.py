"""Both twistd services fix glibc's heap thresholds (where glibc is) and take their start-up
objects out of the garbage collector's walk (relay/heap.py)."""

from __future__ import annotations

import ctypes
import gc
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


def build_both_services(state, tmp_path) -> None:
    """makeService of the agent, then of the relay (whose tunnel endpoint the
    no_listen_server_tap fixture fakes)."""
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


def test_both_services_set_them(state, tmp_path, monkeypatch, no_listen_server_tap):
    calls = []
    for tap in (agent_tap, server_tap):
        monkeypatch.setattr(tap, "keep_buffers_on_the_heap", lambda tap=tap: calls.append(tap.__name__))
    build_both_services(state, tmp_path)
    assert calls == ["relay.agent_tap", "relay.server_tap"]


def test_start_up_objects_are_frozen_after_a_collection():
    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # unreachable once deleted, only a collection frees it
    import weakref

    gone = weakref.ref(garbage)
    del garbage
    try:
        count = heap.freeze_startup_objects()
        assert count == gc.get_freeze_count() > 10_000  # Twisted, OpenSSL, relay, pytest
        assert gone() is None  # collected first, not frozen for good
        gc.collect()  # walks only what came after: fast, and the frozen are still frozen
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def test_both_services_freeze_once_the_reactor_runs(state, tmp_path, monkeypatch, no_listen_server_tap, frozen_startup):
    from twisted.internet import reactor

    scheduled = []
    monkeypatch.setattr(reactor, "callWhenRunning", lambda f, *a, **kw: scheduled.append(f))
    build_both_services(state, tmp_path)
    assert len(scheduled) == 2 and frozen_startup == []  # not yet: when the reactor runs
    for f in scheduled:
        f()
    assert frozen_startup == ["relay.agent_tap", "relay.server_tap"]
