"""Smoke test of the benchmark script (bench/transfer_bench.py)."""
