"""Replays tests/fuzz_corpus/ (inputs kept from tests/fuzz_frames.py runs, and hand-made ones)
through the fuzz targets: each must still meet every invariant of tests/fuzz_targets.py."""

from pathlib import Path

import pytest

from relay.protocol.frames import HEADER, Control, Data, Open, OpenOk, Ping, Window, encode

from .fuzz_targets import PREAMBLES, TARGETS

CORPUS = Path(__file__).parent / "fuzz_corpus"
FILES = sorted(p for p in CORPUS.glob("*/*.bin") if p.parent.name in TARGETS)

# Hand-made inputs: (target, bytes). Byte 0 picks the preamble (relay, agent), byte 1 the piece size.
HELLO_CLIENT = bytes([PREAMBLES.index("hello+client")])
INLINE = [
    ("decoder", b"\x00\x00" + HEADER.pack(1, 0, 0, 1, 0xFFFFFFFF)),  # a lying length costs nothing
    ("decoder", b"\x00\x05" + HEADER.pack(1, 7, 0, 0, 2) + b"{}"),  # JSON without "type"
    ("relay", HELLO_CLIENT + b"\x00" + encode(OpenOk(1)) + encode(Window(1, 2**31 - 1))),
    ("relay", HELLO_CLIENT + b"\x00" + encode(OpenOk(1)) + encode(Data(1, b"x" * 65536)) * 5),
    ("relay", HELLO_CLIENT + b"\x00" + encode(Control({"type": "listen", "ports": list(range(1024, 1100))}))),
    ("relay", b"\x00\x00" + encode(Control({"type": "hello", "version": 1, "token": "x" * 600, "ports": [8080]}))),
    ("relay", HELLO_CLIENT + b"\x00" + encode(Open(1, 8080, "h", 1))),
    ("relay", bytes([PREAMBLES.index("bad-token")]) + b"\x00" + encode(Ping(1)) * 100),
    ("agent", b"\x02\x00" + encode(Open(1, 22, "h", 1)) + encode(Open(3, 8080, "h", 1)) + encode(Data(3, b"x" * 65536)) * 5),
    ("agent", b"\x02\x00" + encode(Open(1, 8080, "h", 1)) + encode(Open(1, 9000, "h", 1))),
    ("agent", b"\x00\x00" + encode(Control({"type": "listen_fail", "port": [8080]})) + encode(Control({"type": "listen_ok", "port": {}}))),
    ("agent", b"\x00\x00" + encode(Control({"type": "listen_fail", "port": 8080, "reason": "x"})) * 300),
]


def test_the_corpus_is_there():
    assert {p.parent.name for p in FILES} == set(TARGETS)


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_corpus_file(path):
    TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("name, data", INLINE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INLINE)])
def test_inline_input(name, data):
    TARGETS[name](data)


def test_the_targets_can_fail():
    """An invariant break is reported: a target that never raised would replay nothing."""
    import relay.server

    original = relay.server.Relay.release_ports
    relay.server.Relay.release_ports = lambda self, tunnel: None  # ports leak when a tunnel goes
    try:
        with pytest.raises(AssertionError):
            TARGETS["relay"](bytes([PREAMBLES.index("hello")]) + b"\x00")
    finally:
        relay.server.Relay.release_ports = original
