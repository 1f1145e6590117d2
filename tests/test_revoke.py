"""Revocation and rotation reach live tunnels without a restart: the relay polls agents.json
(every 2 s on its clock, at once on SIGHUP) and closes tunnels whose credential is gone.
In memory over real TLS (iosim) on a hand-advanced clock; the `relay` commands run as they
would in another process, on their own State."""

from __future__ import annotations

import signal

import pytest

from relay import server_tap
from relay.agent import Target
from relay.cli import _POLL, main
from relay.protocol import ErrorCode
from relay.server import CREDENTIAL_POLL_INTERVAL
from relay.state import PortSet, State
from relay.tls import client_options_for_ca, load_client_certificate

from .inmemory import World, stream, token, up

A1 = {8080: Target("127.0.0.1", 80)}
A2 = {9000: Target("127.0.0.1", 90)}


@pytest.fixture
def world(state):
    world = World(state)
    world.relay.startService()
    yield world
    if world.relay.running:
        world.relay.stopService()


def cli(state, *argv):
    assert main([argv[0], "--state", str(state.path), *argv[1:]]) == 0


def goaways(agent):
    seen = []
    agent.service.go_away_received = lambda code, reason: seen.append((code, reason))
    return seen


def cert_up(world, state, tmp_path, name, expose, ports):
    pem = tmp_path / f"{name}.pem"
    cli(state, "agent-cert", name, "--ports", ports, "--out", str(pem), "--force")
    creator = client_options_for_ca("localhost", state.ca_cert_path, load_client_certificate(pem))
    agent = world.agent(None, expose, creator=creator)
    agent.flush()
    assert agent.tunnel.welcomed
    return agent


def two_agents(world, state, tmp_path, first_by):
    """a1 (token or certificate) on 8080 and a2 (token) on 9000, each with a live stream."""
    if first_by == "token":
        a1 = up(world, state, A1, name="a1", ports="8080")
    else:
        a1 = cert_up(world, state, tmp_path, "a1", A1, "8080")
    a2 = up(world, state, A2, name="a2", ports="9000")
    s1 = stream(world, a1, 8080)
    s2 = stream(world, a2, 9000)
    return a1, a2, s1, s2


def poll(world, *agents):
    world.clock.advance(CREDENTIAL_POLL_INTERVAL)
    for agent in agents:
        agent.flush()


def assert_closed_for_revocation(world, agent, seen, port, client_sock):
    assert seen == [(ErrorCode.AUTH_FAILED, "credential revoked")]
    assert not agent.tunnel.connected_tunnel
    assert port not in world.relay.public
    assert "a1" not in world.relay.tunnels
    assert client_sock.aborted  # its streams go with it


def assert_still_serving(world, agent, stream_parts, port):
    client, client_sock, target, target_sock = stream_parts
    assert agent.tunnel.connected_tunnel
    assert world.relay.public[port].tunnel is agent.relay_tunnel
    client.dataReceived(b"still here")
    agent.flush()
    assert target_sock.value().endswith(b"still here")
    target.dataReceived(b"and back")
    agent.flush()
    assert client_sock.value().endswith(b"and back")


@pytest.mark.parametrize("first_by", ["token", "certificate"])
def test_revoke_closes_the_live_tunnel_within_one_poll_and_frees_its_ports(world, state, tmp_path, first_by):
    a1, a2, s1, s2 = two_agents(world, state, tmp_path, first_by)
    seen = goaways(a1)
    world.clock.advance(0.5)  # the revocation lands mid-interval
    cli(state, "agent-revoke", "a1")
    assert a1.tunnel.connected_tunnel and 8080 in world.relay.public  # nothing happens by itself
    world.clock.advance(1.5)  # the SPEC'd 2 s poll
    assert 8080 not in world.relay.public  # at once, not when the agent gets round to closing
    a1.flush()
    a2.flush()
    assert_closed_for_revocation(world, a1, seen, 8080, s1[1])
    assert a1.relay_tunnel.credential.method == first_by
    assert_still_serving(world, a2, s2, 9000)
    assert list(world.relay.tunnels) == ["a2"]


def test_freed_port_can_be_served_by_another_agent(world, state, tmp_path):
    a1, a2, s1, s2 = two_agents(world, state, tmp_path, "token")
    cli(state, "agent-revoke", "a1")
    poll(world, a1, a2)
    a3 = up(world, state, A1, name="a3", ports="8080")
    assert world.relay.public[8080].tunnel is a3.relay_tunnel


def test_revoked_agent_cannot_come_back(world, state, tmp_path):
    tok = token(state, "a1", "8080")
    a1 = world.agent(tok, A1)
    a1.flush()
    cli(state, "agent-revoke", "a1")
    poll(world, a1)
    again = world.agent(tok, A1)
    seen = goaways(again)
    again.flush()
    assert not again.tunnel.welcomed
    assert [code for code, _ in seen] == [ErrorCode.AUTH_FAILED]


def test_token_rotation_closes_the_tunnel_of_the_old_token(world, state, tmp_path, capsys):
    a1, a2, s1, s2 = two_agents(world, state, tmp_path, "token")
    seen = goaways(a1)
    capsys.readouterr()
    cli(state, "agent-token", "a1", "--ports", "8080")
    new_token = capsys.readouterr().out.strip()
    poll(world, a1, a2)
    assert_closed_for_revocation(world, a1, seen, 8080, s1[1])
    assert_still_serving(world, a2, s2, 9000)
    back = world.agent(new_token, A1)  # the agent, restarted with its new token
    back.flush()
    assert back.tunnel.welcomed and world.relay.public[8080].tunnel is back.relay_tunnel


def test_reissued_certificate_closes_the_tunnel_of_the_old_one(world, state, tmp_path):
    a1, a2, s1, s2 = two_agents(world, state, tmp_path, "certificate")
    seen = goaways(a1)
    cli(state, "agent-cert", "a1", "--ports", "8080", "--out", str(tmp_path / "new.pem"))
    poll(world, a1, a2)
    assert_closed_for_revocation(world, a1, seen, 8080, s1[1])
    assert_still_serving(world, a2, s2, 9000)


def test_the_other_credential_of_an_agent_keeps_its_tunnel(world, state, tmp_path, capsys):
    """A certificate for a token agent, or a new token for a certificate agent, adds a
    credential: the tunnel using the other one stays, ports and all."""
    by_token = up(world, state, A1, name="a1", ports="8080")
    by_cert = cert_up(world, state, tmp_path, "c1", A2, "9000")
    s1, s2 = stream(world, by_token, 8080), stream(world, by_cert, 9000)
    cli(state, "agent-cert", "a1", "--ports", "8081", "--out", str(tmp_path / "a1.pem"))
    cli(state, "agent-token", "c1", "--ports", "9001")
    seen1, seen2 = goaways(by_token), goaways(by_cert)
    poll(world, by_token, by_cert)
    poll(world, by_token, by_cert)
    assert seen1 == seen2 == []
    assert_still_serving(world, by_token, s1, 8080)  # the grant of its hello stands
    assert_still_serving(world, by_cert, s2, 9000)


def test_unrelated_changes_keep_every_tunnel(world, state, tmp_path):
    a1, a2, s1, s2 = two_agents(world, state, tmp_path, "certificate")
    cli(state, "agent-token", "a3")
    poll(world, a1, a2)
    assert_still_serving(world, a1, s1, 8080)
    assert_still_serving(world, a2, s2, 9000)


def test_forced_check_acts_at_once(world, state, tmp_path):
    """SIGHUP's path: no clock advance needed, and a stat that cannot tell is no excuse."""
    a1 = up(world, state, A1, name="a1", ports="8080")
    seen = goaways(a1)
    cli(state, "agent-revoke", "a1")
    world.relay._credentials_seen = state.refresh()  # as if the watcher had seen no change
    world.relay.check_credentials()
    a1.flush()
    assert seen == [] and a1.tunnel.connected_tunnel
    world.relay.check_credentials(force=True)
    a1.flush()
    assert seen == [(ErrorCode.AUTH_FAILED, "credential revoked")]
    assert world.relay.public == {}


def test_stopped_relay_stops_watching(world, state, tmp_path):
    a1 = up(world, state, A1, name="a1", ports="8080")
    watch = world.relay._credential_watch
    assert watch.running
    world.relay.stopService()
    assert not watch.running
    assert [c for c in world.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is watch] == []
    cli(state, "agent-revoke", "a1")
    poll(world, a1)
    assert a1.tunnel.connected_tunnel


def test_watcher_is_not_running_before_start(state):
    world = World(state)
    a1 = up(world, state, A1, name="a1", ports="8080")
    cli(state, "agent-revoke", "a1")
    poll(world, a1)
    assert a1.tunnel.connected_tunnel  # sanity: it is the started watcher that acts
    world.relay.startService()
    poll(world, a1)
    assert not a1.tunnel.connected_tunnel
    world.relay.stopService()


def test_broken_agents_json_keeps_tunnels_and_logs_once(world, state, tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        a1 = up(world, state, A1, name="a1", ports="8080")
        state.agents_path.write_text("{half written")
        poll(world, a1)
        poll(world, a1)
        assert a1.tunnel.connected_tunnel
        assert sum("cannot re-read the agents' credentials" in line for line in lines) == 1
        assert world.relay._credential_watch.running  # the LoopingCall survived
        state.agents_path.write_text('{"agents": {}}')  # repaired, without a1
        poll(world, a1)
        assert not a1.tunnel.connected_tunnel
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("forced", [False, True], ids=["poll", "sighup"])
def test_a_deleted_agents_json_keeps_the_tunnels_and_says_so(world, state, logs, forced):
    """Deleting the file is not how agents are revoked: taken as an empty table, it cut
    every tunnel, each logged as revoked, and the missing file was never mentioned."""
    a1 = up(world, state, A1, name="a1", ports="8080")
    client, client_sock, target, target_sock = stream(world, a1)
    a2 = token(state, "a2", "9000")
    saved = state.agents_path.read_bytes()
    state.agents_path.unlink()
    for _ in range(2):
        if forced:
            world.relay.check_credentials(force=True)
        poll(world, a1)
    assert a1.tunnel.connected_tunnel and 8080 in world.relay.public
    missing = [line for line in logs if "has disappeared" in line]
    assert len(missing) == 1 and "keeping the tunnels as they are" in missing[0]
    assert not [line for line in logs if "revoked or replaced" in line]
    client.dataReceived(b"still here")
    a1.flush()
    assert target_sock.value() == b"still here"
    newcomer = world.agent(a2, {9000: Target("127.0.0.1", 80)})
    newcomer.flush()
    assert not newcomer.tunnel.connected_tunnel  # refused until the file is back
    state.agents_path.write_bytes(saved)
    poll(world, a1)
    assert a1.tunnel.connected_tunnel


def test_sighup_schedules_one_forced_check_however_many_arrive(state):
    """`kill -HUP` asks the reactor for a forced check of the credentials. Thousands of signals before the reactor's next turn ask for one check, not one each
    (each queued call used to nest the handlers until RecursionError ended the main loop);
    a signal after the check began asks for another."""
    calls = []
    checks = []

    class FakeReactor:
        def callFromThread(self, f, *args, **kwargs):  # noqa: N802 (Twisted's name)
            calls.append((f, args, kwargs))

        def callWhenRunning(self, f, *args, **kwargs):  # noqa: N802 (Twisted's name)
            pass

    class FakeRelay:
        def check_credentials(self, force=False):
            checks.append(force)
            handler(signal.SIGHUP, None)  # one more signal while the check runs

    before = signal.getsignal(signal.SIGHUP)
    try:
        server_tap._reload_on_sighup(FakeReactor(), FakeRelay())
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler is not before
        for _ in range(5000):
            handler(signal.SIGHUP, None)
        assert len(calls) == 1
        f, args, kwargs = calls.pop()
        f(*args, **kwargs)
        assert checks == [True]
        assert len(calls) == 1  # the signal during the check: one more check
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_full_signal_wakeup_pipe_is_not_reported_from_the_signal_handler(monkeypatch):
    """CPython reports a full wake-up pipe from inside its C signal handler, taking a lock
    the main thread may hold: a SIGHUP storm hung the relay. The reactor wakes anyway."""
    calls = []

    def set_wakeup_fd(fd, **kwargs):
        calls.append((fd, kwargs))
        return 7 if len(calls) == 1 else -1

    monkeypatch.setattr(server_tap.signal, "set_wakeup_fd", set_wakeup_fd)
    server_tap._drop_signals_a_full_wakeup_pipe_holds()
    assert calls == [(-1, {}), (7, {"warn_on_full_buffer": False})]


def test_relay_service_tree_runs_the_watcher(state, no_listen_server_tap):
    """twistd's service tree starts the Relay (and so its watcher) and stops it. No socket:
    the tunnel endpoint is a fake."""
    from twisted.internet import reactor

    options = server_tap.Options()
    options.parseOptions(["--state", str(state.path), "--tunnel", "tcp:7835"])
    top = server_tap.makeService(options)
    relay = top.relay
    assert relay.parent is top
    top.startService()
    try:
        assert relay.running and relay._credential_watch.running
    finally:
        top.stopService()
    assert not relay.running and relay._credential_watch is None
    assert [c for c in reactor.getDelayedCalls() if "check_credentials" in repr(c)] == []


def test_cli_and_relay_agree_on_the_poll_interval():
    assert _POLL == CREDENTIAL_POLL_INTERVAL


def test_ports_of_a_rotated_grant_apply_from_the_next_hello(world, state):
    """Documented limit: a still-valid tunnel keeps the ports of its hello."""
    a1 = up(world, state, {8080: Target("h", 1), 9000: Target("h", 2)}, name="a1", ports="8080,9000")
    assert sorted(world.relay.public) == [8080, 9000]
    issued = State(state.path).issue_certificate("a1")
    State(state.path).record_certificate("a1", issued, PortSet.parse("8080"))  # fewer ports
    poll(world, a1)
    assert a1.tunnel.connected_tunnel and sorted(world.relay.public) == [8080, 9000]
