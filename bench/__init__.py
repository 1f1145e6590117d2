"""Benchmark harness for relay: see docs/performance.md. Run with bench/run."""
