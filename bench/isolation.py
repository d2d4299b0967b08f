"""Neighbour isolation: one model's p99 alone, and while another model on the same server is saturated.

Issue 13 asks that a saturated model not push another model's p99 above 2x its solo p99. The measurement must
not disturb itself: the saturating load comes from wrk (a separate, efficient process), and the probe is one
sequential client (httpx, this process) that sends ``--probes`` requests to the neighbour, solo first, then
while wrk saturates the other model. A probe sharing its interpreter with load threads would time its own
wait for the GIL, not the server's (the first version of this measurement, inside a test, did exactly that).

Both models are copies of one bundle in a temporary repository (``alpha`` saturated, ``beta`` probed), served
by ``python -m service --model-repository``; ``BERTSERVE_*`` variables pass through.

CLI: ``python -m bench.isolation [--model-dir DIR] [--concurrency 8,64] [--probes 400] [--json PATH]``
(default bundle: the tiny one, built on the fly). Needs wrk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.frontend import build_tiny, run_wrk, wrk_available
from bench.procs import Server, free_port, running

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
    return {"p50_ms": float(np.percentile(times, 50)) * 1000, "p99_ms": float(np.percentile(times, 99)) * 1000}


def measure(url: str, body: Path, concurrency: int, probes: int) -> dict[str, Any]:
    """Solo probe, then the probe again while wrk saturates alpha for the probe's duration (and a margin)."""
    probe(url, 30)  # warm the connection path
    solo = probe(url, probes)
    duration = max(5.0, probes * (solo["p50_ms"] / 1000 + 0.005) * 4 + 5)
    load: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: load.update(run_wrk(url + "/v2/models/alpha/infer", body, concurrency, duration, 10))
    )
    thread.start()
    time.sleep(2)  # wrk connected and the queue full before the first probe
    loaded = probe(url, probes)
    thread.join()
    alpha_rps = load["requests"] / (load["duration_us"] / 1e6) if load.get("duration_us") else None
    return {
        "concurrency": concurrency,
        "solo": solo,
        "saturated": loaded,
        "p99_ratio": loaded["p99_ms"] / solo["p99_ms"],
        "p50_ratio": loaded["p50_ms"] / solo["p50_ms"],
        "alpha_requests_per_s": alpha_rps,
        "alpha_errors": load.get("errors"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="bundle served as both models (default: the tiny one)")
    parser.add_argument("--concurrency", default="8,64", help="wrk connections saturating alpha (comma list)")
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not wrk_available():
        parser.error("needs wrk (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="bertserve-isolation-") as tmp:
        work = Path(tmp)
        bundle = args.model_dir or build_tiny(work)
        for name in ("alpha", "beta"):
            shutil.copytree(bundle, work / "repo" / name / "1")
        body = work / "alpha.json"
        body.write_text(json.dumps(v2_body(LOAD_TEXT)))
        port = free_port()
        argv_ = [sys.executable, "-m", "service", "--model-repository", str(work / "repo")]
        argv_ += ["--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
        server = Server("bertserve", argv_, port, work / "server.log")
        results = []
        with running(server, ready_timeout=300):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                result = measure(server.base_url, body, concurrency, args.probes)
                results.append(result)
                print(
                    f"alpha saturated by wrk c={concurrency} ({result['alpha_requests_per_s'] or 0:.0f} req/s): "
                    f"beta p99 {result['saturated']['p99_ms']:.2f} ms vs {result['solo']['p99_ms']:.2f} ms solo "
                    f"= {result['p99_ratio']:.2f}x (p50 {result['p50_ratio']:.2f}x)",
                    flush=True,
                )
    report = {"tool": "bench.isolation", "model_dir": str(args.model_dir or "tiny"), "runs": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
