"""`twistd relay-server` options that are checked before anything is made: the tunnel
endpoint and the public interface. A bad value is a usage error (one line from twistd,
naming the option or the config file and key) and leaves no state dir behind; the tunnel
port, however the endpoint spells it, is never handed to an agent."""

from __future__ import annotations

import pytest
from twisted.python import usage

from relay import server_tap
from relay.state import init_state


def parse(argv):
    options = server_tap.Options()
    options.parseOptions(argv)
    return options


@pytest.mark.parametrize("tunnel", ["tcp:notaport", "bogus:1", "tcp:7835:nosuchoption=1"])
def test_a_bad_tunnel_endpoint_stops_startup_before_the_state_dir_is_made(tmp_path, tunnel):
    state = tmp_path / "relay-state"
    with pytest.raises(usage.UsageError) as raised:
        parse(["--state", str(state), "--tunnel", tunnel])
    message = str(raised.value)
    assert message.startswith(f"option --tunnel: {tunnel!r} is not a Twisted server endpoint")
    assert message.endswith("try tcp:7835") and "\n" not in message
    assert not state.exists()


def test_a_bad_tunnel_endpoint_in_the_config_file_names_the_file_and_key(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('tunnel = "bogus:1"\n')
    with pytest.raises(usage.UsageError, match=rf"^config file {config}: key 'tunnel': 'bogus:1' is not"):
        parse(["--state", str(tmp_path / "st"), "--config", str(config)])
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("interface", ["not-an-ip", "1.2.3.x", "localhost", "::g"])
def test_a_public_interface_that_is_not_an_address_stops_startup(tmp_path, interface):
    with pytest.raises(usage.UsageError, match=rf"^option --public-interface: {interface!r} is not an IP address"):
        parse(["--state", str(tmp_path / "st"), "--public-interface", interface])
    config = tmp_path / "relay.toml"
    config.write_text(f'public-interface = "{interface}"\n')
    with pytest.raises(usage.UsageError, match=rf"^config file {config}: key 'public-interface': "):
        parse(["--state", str(tmp_path / "st"), "--config", str(config)])
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("interface", ["", "0.0.0.0", "::", "127.0.0.1", "::1", "fe80::1%lo"])
def test_addresses_are_accepted_as_the_public_interface(tmp_path, interface):
    assert parse(["--state", str(tmp_path / "st"), "--public-interface", interface])["public-interface"] == interface


@pytest.mark.parametrize(
    ("tunnel", "port"),
    [
        ("tcp:7900", 7900),
        ("tcp:port=7901:interface=127.0.0.1", 7901),
        ("tcp:interface=127.0.0.1:port=7902", 7902),
        (r"tcp6:7903:interface=\:\:1", 7903),
        (r"tcp6:port=7904:interface=\:\:1", 7904),
        ("7905", 7905),
    ],
)
def test_the_relays_own_port_is_read_from_every_spelling_of_the_endpoint(
    tmp_path, no_listen_server_tap, logs, tunnel, port
):
    """An agent may not be given the tunnel's port (it could listen there on another
    interface); port= was not read, so it could, and the first-run hint named 7835."""
    init_state(tmp_path / "st", ["localhost"])
    options = parse(["--state", str(tmp_path / "st"), "--tunnel", tunnel])
    relay = no_listen_server_tap.makeService(options).relay
    assert relay.settings.tunnel_port == port
    (hint,) = [line for line in logs if "no agents yet" in line]
    assert f"--relay relay.example.net:{port} " in hint


def test_an_endpoint_with_no_tcp_port_keeps_the_default_in_the_hint(tmp_path, no_listen_server_tap, logs):
    init_state(tmp_path / "st", ["localhost"])
    options = parse(["--state", str(tmp_path / "st"), "--tunnel", f"unix:{tmp_path}/tunnel.sock"])
    relay = no_listen_server_tap.makeService(options).relay
    assert relay.settings.tunnel_port is None
    (hint,) = [line for line in logs if "no agents yet" in line]
    assert "--relay relay.example.net:7835 " in hint
