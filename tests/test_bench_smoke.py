"""A short run of the benchmark harness (bench/): relay, direct TCP and two relay processes
sharing the public ports, ~1 s per workload, so the harness cannot rot: every workload must
produce positive figures in the JSON.

Needs iperf3, wrk and nginx (Debian: apt-get install -y iperf3 wrk nginx-light); skipped with
the reason when they are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NEEDED = {"iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx-light"}


def _missing() -> list[str]:
    return [t for t in NEEDED if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]


@pytest.mark.e2e
def test_bench_quick_relay_direct_and_two_relay_processes(tmp_path):
    missing = _missing()
    if missing:
        pytest.skip(
            f"benchmark tools not installed: {', '.join(missing)} "
            f"(apt-get install -y {' '.join(NEEDED[t] for t in missing)})"
        )
    out = tmp_path / "bench.json"
    argv = [
        sys.executable, "-m", "bench", "--only", "relay,direct,relay2", "--quick",
        "--streams", "200", "--json", str(out), "--no-plot",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"bench exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    report = json.loads(out.read_text())
    results = report["results"]

    both = [
        "bulk1_fwd_MBps",
        "bulk1_rev_MBps",
        "bulk4_MBps",
        "keepalive_rps",
        "keepalive_p99_ms",
        "newconn_rps",
        "newconn_p99_ms",
        "echo_idle_p50_ms",
        "echo_idle_p99_ms",
        "echo_load_p50_ms",
        "echo_load_p99_ms",
        "echo_load_bulk_MBps",
        "rtt40_MBps",
    ]
    relay_only = [
        "bulk1_fwd_cpu_s_per_GB",
        "bulk1_rev_cpu_s_per_GB",
        "bulk4_cpu_s_per_GB",
        "mem_kib_per_stream",
    ]
    for variant, keys in (("direct", both), ("relay", both + relay_only)):
        figures = results[variant]
        assert not figures.get("errors"), f"{variant}: {figures.get('errors')}"
        for key in keys:
            value = figures.get(key)
            assert isinstance(value, (int, float)) and value > 0, f"{variant} {key} = {value!r}"
    two = results["relay2"]  # two relay processes sharing the public ports: many-connection loads only
    assert not two.get("errors"), f"relay2: {two.get('errors')}"
    for key in ("bulk4_MBps", "bulk4_cpu_s_per_GB", "keepalive_rps", "newconn_rps"):
        assert isinstance(two.get(key), (int, float)) and two[key] > 0, f"relay2 {key} = {two.get(key)!r}"
    assert "bulk1_fwd_MBps" not in two and "mem_kib_per_stream" not in two
    assert "relay2/relay" in proc.stdout
    memory = results["relay"]["memory_detail"]
    assert memory["streams"] == 200
    assert all(v > 0 for v in memory["pss_kib_with_streams"].values())
    # the relay tunnel over the delay line must at least move data at a sane rate
    assert results["relay"]["rtt40_MBps"] > 1
    assert {t["target"] for t in report["targets"]}, "no targets evaluated"
    assert "| workload" in proc.stdout  # the table was printed


def test_rounds_are_combined_by_their_median_and_keep_the_spread():
    from bench.harness import median_of_rounds

    rounds = [
        {"bulk1_fwd_MBps": 500.0, "newconn_rps": 10.0, "bulk1_fwd_detail": {"n": 1}},
        {"bulk1_fwd_MBps": 700.0, "errors": {"newconn": "wrk failed"}, "bulk1_fwd_detail": {"n": 2}},
        {"bulk1_fwd_MBps": 600.0, "newconn_rps": 30.0, "bulk1_fwd_detail": {"n": 3}},
    ]
    out = median_of_rounds(rounds)
    assert out["bulk1_fwd_MBps"] == 600.0  # the middle one, not the mean or the last
    assert out["newconn_rps"] == 20.0  # two rounds produced it: the mean of those two
    assert out["errors"] == {"round 2: newconn": "wrk failed"}
    assert [r["bulk1_fwd_MBps"] for r in out["rounds"]] == [500.0, 700.0, 600.0]
    assert out["bulk1_fwd_detail"] == {"n": 3}
    assert median_of_rounds(rounds[:1]) is rounds[0]


def _descendants(pid: int) -> set[int]:
    from bench.harness import children_of

    found, todo = set(), [pid]
    for _ in range(1000):  # a bounded walk of the process tree
        if not todo:
            break
        kids = children_of(todo.pop())
        found.update(kids)
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_a_killed_bench_stops_what_it_started(tmp_path):
    """SIGTERM (a kill, a closed terminal) leaves no iperf3, echo server or relay behind."""
    import contextlib
    import os
    import signal
    import time

    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 not installed (apt-get install -y iperf3)")
    argv = [
        sys.executable, "-m", "bench", "--only", "direct", "--workloads", "bulk1",
        "--seconds", "60", "--json", str(tmp_path / "bench.json"), "--no-plot",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(started) < 2:  # the iperf3 and echo servers
            started = _descendants(proc.pid)
            time.sleep(0.2)
        assert len(started) >= 2, f"the bench started {started} within 60 s"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    survivors = [p for p in started if _alive(p)]
    for pid in survivors:  # do not leave them to the rest of the suite
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, "processes the bench started outlived it"


@pytest.mark.e2e
def test_tls_modes_measures_both_ways_of_driving_openssl(tmp_path):
    """bench.tls_modes (docs/performance.md: why the tunnel's TLS goes through memory BIOs)
    moves every byte both ways and reports CPU per GB for each."""
    out = tmp_path / "tls.json"
    argv = [sys.executable, "-m", "bench.tls_modes", "--gib", "0.02", "--rounds", "2", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"tls_modes exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert set(report["rounds"]) == {"memory-bio", "socket"}
    for mode, rounds in report["rounds"].items():
        assert len(rounds) == 2, mode
        for figures in rounds:
            assert figures["MBps"] > 0 and figures["receiver_cpu_s_per_GB"] > 0, (mode, figures)
            assert figures["total_cpu_s_per_GB"] == pytest.approx(
                figures["sender_cpu_s_per_GB"] + figures["receiver_cpu_s_per_GB"]
            )
    assert "socket / memory-bio, total CPU per GB:" in proc.stdout
