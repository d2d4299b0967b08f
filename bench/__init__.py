"""The benchmarks: workload, ceiling, baselines, wrk load and CPU accounting, runners, and the docs' tables."""
