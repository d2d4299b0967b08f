"""Neighbour isolation: one model's p99 alone, and while another model on the same server is saturated.

Two copies of one bundle in a temporary repository (``alpha`` saturated, ``beta`` probed) are served by
``python -m service --model-repository``; ``BERTSERVE_*`` variables pass through. The saturating load comes from wrk
(a separate, efficient process) and the probe is one sequential client (httpx, in this process) that sends
``--probes`` requests to beta, first alone, then while wrk saturates alpha. A probe sharing its interpreter with
load threads would time its own wait for the GIL, not the server's.

CLI: ``python -m bench.isolation [--model-dir DIR] [--concurrency 8,64] [--probes 400] [--json PATH]`` (default
bundle: the tiny one, built on the fly). Needs wrk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import load, procs, tables
from bench.procs import Server, ints

PROBE_TEXT = "a fairly ordinary sentence about a film"
LOAD_TEXT = PROBE_TEXT + " that goes on for a while, as reviews do, before it says what it thought" * 2


def v2_body(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def probe(url: str, n: int, pause_s: float = 0.005) -> dict[str, float]:
    """``n`` sequential requests to beta: p50 and p99 in ms (every answer must be a 200)."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = client.post("/v2/models/beta/infer", json=v2_body(PROBE_TEXT))
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"probe got {response.status_code}: {response.text}")
            time.sleep(pause_s)
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def measure(url: str, body: Path, concurrency: int, probes: int) -> dict[str, Any]:
    """Solo probe, then the probe again while wrk saturates alpha for the probe's duration (and a margin)."""
    probe(url, 30)  # warm the connection path
    solo = probe(url, probes)
    duration = max(5.0, probes * (solo["p50_ms"] / 1000 + 0.005) * 4 + 5)
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(load.run_wrk(url + "/v2/models/alpha/infer", body, concurrency, duration, 10))
    )
    thread.start()
    time.sleep(2)  # wrk connected and the queue full before the first probe
    loaded = probe(url, probes)
    thread.join()
    return {
        "concurrency": concurrency,
        "solo": solo,
        "saturated": loaded,
        "p99_ratio": round(loaded["p99_ms"] / solo["p99_ms"], 3),
        "p50_ratio": round(loaded["p50_ms"] / solo["p50_ms"], 3),
        "alpha_requests_per_s": round(result["requests"] / (result["duration_us"] / 1e6), 1),
        "alpha_errors": sum(result["errors"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="bundle served as both models (default: the tiny one)")
    parser.add_argument("--concurrency", type=ints, default=[8, 64], help="wrk connections saturating alpha")
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--json", type=Path, help="summary file (default: bench/results/isolation-UTC.json)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        parser.error("needs wrk (Debian: apt-get install wrk)")
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bertserve-isolation-") as tmp:
        work = Path(tmp)
        bundle = args.model_dir or procs.build_tiny(work)
        for name in ("alpha", "beta"):
            shutil.copytree(bundle, work / "repo" / name / "1")
        body = load.write_bodies(work / "alpha.jsonl", [v2_body(LOAD_TEXT)])
        port = procs.free_port()
        argv_ = procs.service_argv(port, "--model-repository", str(work / "repo"), "--grpc-port", "0")
        server = Server("bertserve", argv_, port, work / "server.log")
        runs = []
        with procs.running(server, ready_timeout=300):
            for concurrency in args.concurrency:
                runs.append(measure(server.base_url, body, concurrency, args.probes))
                procs.log(f"alpha saturated by wrk c={concurrency}: {runs[-1]}")
    summary = {
        "tool": "bench.isolation",
        "created": started.isoformat(timespec="seconds"),
        "git_commit": procs.git_commit(),
        "model": "tiny" if args.model_dir is None else args.model_dir.name,
        "probes": args.probes,
        "runs": runs,
    }
    path = tables.write_summary(summary, args.json, "isolation")
    print(tables.isolation_table(summary))
    print(f"\nsummary: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
