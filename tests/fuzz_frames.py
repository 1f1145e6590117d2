"""The long fuzz run, outside the normal suite (tests/test_fuzz_corpus.py replays its corpus there).

    .venv/bin/python -m tests.fuzz_frames --budget 200000 --minutes 5 [--target relay] [--save-corpus]

Hypothesis drives each target of tests/fuzz_targets.py with inputs built from valid frames,
plausible headers (right version and type, lying lengths) and raw bytes, for --budget
examples or --minutes, whichever comes first, per target. A failing input is shrunk by
Hypothesis, written to tests/fuzz_corpus/<target>/crash-<hash>.bin and reported; exit status 1.
With --save-corpus, the first input of every new kind of outcome (up to --per-kind, small
ones only) is written to tests/fuzz_corpus/<target>/ so that the suite replays it.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from relay.protocol.frames import (
    Control,
    Data,
    GoAway,
    Open,
    OpenOk,
    Ping,
    Reset,
    Window,
    encode,
)

from .fuzz_targets import TARGETS

CORPUS = Path(__file__).parent / "fuzz_corpus"
ROUND = 2000
_corpus = CORPUS

stream_ids = st.one_of(st.integers(1, 9), st.sampled_from([0, 2**31 - 1, 2**31, 2**32 - 1]))
u32 = st.integers(0, 2**32 - 1)
ports = st.one_of(st.sampled_from([8080, 9000, 9001, 7835, 80, 1023, 1024, 65535, 0, -1]), st.integers(-5, 70000))
control_messages = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["hello", "listen", "welcome", "listen_ok", "listen_fail", "x", ""])},
        optional={
            "version": st.one_of(st.just(1), st.integers(-2, 3), st.none(), st.text(max_size=3), st.booleans()),
            "token": st.one_of(st.none(), st.just("fz.x"), st.text(max_size=40), st.integers()),
            "ports": st.one_of(st.lists(ports, max_size=12), st.lists(st.booleans(), max_size=3), st.text(max_size=5), st.none()),
            "port": st.one_of(ports, st.just([8080]), st.just(8080.0), st.none(), st.just("8080"), st.just(True)),
            "reason": st.text(max_size=30),
            "agent": st.text(max_size=10),
        },
    ),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()), max_size=4).map(
        lambda d: {**d, "type": "hello"}
    ),
)
valid_frames = st.one_of(
    st.builds(Data, stream_ids.filter(lambda i: 1 <= i < 2**31), st.binary(max_size=300), st.booleans()),
    st.builds(lambda sid, n: Data(sid, b"d" * n), st.integers(1, 9), st.integers(0, 65536)),
    st.builds(Window, stream_ids.filter(lambda i: 1 <= i < 2**31), st.integers(1, 2**32 - 1)),
    st.builds(
        Open,
        st.sampled_from([1, 3, 5, 7, 9, 2]),
        st.one_of(st.sampled_from([8080, 9000]), st.integers(1, 65535)),  # the agent target exposes 8080, 9000
        st.text(max_size=20),
        st.integers(0, 65535),
    ),
    st.builds(OpenOk, stream_ids.filter(lambda i: 1 <= i < 2**31)),
    st.builds(Reset, stream_ids.filter(lambda i: 1 <= i < 2**31), u32),
    st.builds(Ping, st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(GoAway, u32, u32, st.text(max_size=40)),
    st.builds(Control, control_messages),
)
plausible_header = st.builds(
    lambda kind, flags, sid, length, tail: struct.pack("!BBHII", 1, kind, flags, sid, length) + tail,
    st.integers(0, 8),
    st.sampled_from([0, 1, 2, 0x8000, 0xFFFF]),
    stream_ids,
    st.sampled_from([0, 1, 3, 4, 7, 8, 9, 259, 260, 1032, 1033, 16384, 16385, 65536, 65537, 2**32 - 1]),
    st.binary(max_size=40),
)
segments = st.lists(
    st.one_of(valid_frames.map(encode), valid_frames.map(encode), plausible_header, st.binary(min_size=1, max_size=64)),
    max_size=16,
)
inputs = st.builds(lambda head, parts: bytes(head) + b"".join(parts), st.binary(min_size=2, max_size=2), segments)


def run(name: str, budget: int, seconds: float, save_corpus: bool, per_kind: int) -> int:
    target = TARGETS[name]
    seen: dict[str, int] = {}
    count = 0
    started = time.monotonic()
    failure: list[bytes] = []

    def fuzz(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            kind = target(data)
        except Exception:
            failure[:] = [data]  # the last failing input: after shrinking, the smallest
            raise
        seen[kind] = seen.get(kind, 0) + 1
        if save_corpus and seen[kind] <= per_kind and len(data) <= 4096:
            _save(name, data, "")

    # Rounds of ROUND examples, each with fresh randomness, until the budget or the time is up.
    while count < budget and time.monotonic() - started < seconds:
        examples = min(ROUND, budget - count)
        test = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
        )(given(data=inputs)(fuzz))
        try:
            test()
        except Exception:
            data = failure[0] if failure else b""
            path = _save(name, data, "crash-")
            traceback.print_exc()
            print(f"{name}: FAILED after {count} inputs; shrunk input saved to {path}", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started
    print(f"{name}: {count} inputs in {elapsed:.0f} s, no failure; {len(seen)} kinds of outcome")
    for kind, n in sorted(seen.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {n:8d}  {kind}")
    return 0


def _save(name: str, data: bytes, prefix: str) -> Path:
    folder = _corpus / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_frames", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=100_000, help="examples per target (default 100000)")
    parser.add_argument("--minutes", type=float, default=5.0, help="time limit per target (default 5)")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    parser.add_argument("--save-corpus", action="store_true", help="add new kinds of outcome to tests/fuzz_corpus/")
    parser.add_argument("--per-kind", type=int, default=1, help="with --save-corpus: inputs kept per kind (default 1)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="where inputs are written (default tests/fuzz_corpus)")
    args = parser.parse_args(argv)
    global _corpus
    _corpus = args.corpus
    status = 0
    for name in args.target or sorted(TARGETS):
        status |= run(name, args.budget, args.minutes * 60, args.save_corpus, args.per_kind)
    return status


if __name__ == "__main__":
    sys.exit(main())
