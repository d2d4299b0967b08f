"""Benchmark suite: workload, load generator, in-process ceiling, naive baseline server and the runner.

Run everything with ``python -m bench.run --model-dir DIR`` from the repository root (see bench/NOTES.md).
"""
