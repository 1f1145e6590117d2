"""SOCKS4a against a real server that speaks it: OpenSSH's dynamic forwarding (`ssh -D`).

pproxy, used for the other schemes, has no SOCKS4a. With --relay given as a host name, the
agent sends the name in the SOCKS4a request and the proxy resolves it, so the agent
itself never resolves the relay's name nor connects to it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.harness import Procs, SshD, tool

from .conftest import HOST, connect, echo_roundtrip, free_ports, port_accepts, wait_until
from .netutil import tcp_connections

pytestmark = pytest.mark.e2e


def _have_openssh() -> bool:
    return bool((tool("sshd") or Path("/usr/sbin/sshd").exists()) and shutil.which("ssh"))


@pytest.mark.skipif(not _have_openssh(), reason="needs openssh-server and openssh-client (run-tests installs them as root)")
def test_socks4a_with_a_host_name_through_openssh(harness, tmp_path):
    sshd_port, socks_port = free_ports(2)
    procs = Procs(tmp_path)
    harness.on_stop(procs.stop_all)
    sshd = SshD(procs, tmp_path, sshd_port)
    sshd.start()
    ssh = procs.start(
        "ssh-D",
        [
            "ssh", "-F", "/dev/null", "-T", "-N", "-i", str(sshd.key), "-p", str(sshd_port),
            "-l", sshd.user, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            "-D", f"{HOST}:{socks_port}", HOST,
        ],
    )  # fmt: skip
    wait_until(lambda: port_accepts(socks_port), 15, "ssh -D to listen")
    assert ssh.poll() is None, procs.logfile("ssh-D").read_text()

    state = harness.state()  # its server certificate names localhost (relay init's default)
    relay = harness.relay(state)
    echo = harness.echo()
    (public,) = free_ports(1)
    agent = harness.agent(
        f"localhost:{relay.tunnel_port}",
        state.token("behind-socks4a"),
        {public: echo.port},
        ca=state.ca,
        extra=["--proxy", f"socks4a://{HOST}:{socks_port}", "--connect-timeout", "5"],
    )
    agent.wait_for_log(r"reaching the relay through the proxy socks4a://127\.0\.0\.1:")
    agent.wait_listening()

    payload = os.urandom(128 * 1024)
    with connect(public) as client:
        assert echo_roundtrip(client, payload) == payload
        wait_until(lambda: echo.active == 1, 5, "the agent's connection to the echo target")
        remotes = {remote for _, remote, _ in tcp_connections(agent.pid)}
        assert remotes == {(HOST, socks_port), (HOST, echo.port)}, remotes
    # The relay's name was checked against its certificate (--ca), and passed.
    agent.assert_not_logged(r"cannot connect to the relay")
