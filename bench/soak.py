"""Soak: hold the service at saturation for a long time and report how it holds up.

wrk (:mod:`bench.load`, ``--concurrency`` connections, default 32: far more than one batch, so the queue never runs
dry) sends ``POST /v1/predict`` with the workload's texts for ``--duration`` seconds (default 600; not run in CI),
as back-to-back wrk runs of ``--interval`` seconds. Each interval gives one row: requests per second, latency p50 / p99,
errors, the server's resident memory and CPU (psutil, whole process tree) and its queue depth from /metrics, read
halfway through. At the end: totals, 5xx and 429 answers as the server counted them (``bertserve_requests_total``),
memory at start / end / peak and the first and last intervals' throughput, so a slow leak or slow-down shows as a
drift. The server is ``python -m service`` on ``--model-dir``, started on a free loopback port (settings with
``--set NAME=VALUE``) and stopped with SIGTERM at the end, its exit status and drain time recorded.

Output: the summary as JSON (``--json``, default ``bench/results/soak-UTC.json``), one line per interval on
stderr. Exit status 1 when the server died, answered 5xx or dropped connections; 0 otherwise (429s are reported,
not failures: shedding load at saturation is correct behaviour).

Example (10 s smoke): ``python -m bench.soak --model-dir models/bbc --duration 10 --interval 2``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load, procs, tables
from bench.procs import Server, ServerError
from bench.workload import load_texts, make_texts, workload_bodies


def scrape(base_url: str) -> dict[str, float]:
    """Queue depth, and the answers with status 5xx and 429, from the server's /metrics."""
    out = dict.fromkeys(("queue_depth", "5xx", "429"), 0.0)
    for sample in procs.metric_samples(base_url):
        status = sample.labels.get("status", "")
        kind = "5xx" if status.startswith("5") else status
        if sample.name == "bertserve_queue_depth" or (sample.name == "bertserve_requests_total" and kind in out):
            out["queue_depth" if sample.name == "bertserve_queue_depth" else kind] += sample.value
    return out


def soak(url: str, pid: int, bodies: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Back-to-back wrk runs of ``args.interval`` seconds until ``args.duration``; one row per run."""
    start = time.monotonic()
    first = scrape(url)
    rss_start, cpu_prev = procs.rss_bytes(pid), procs.tree_cpu_seconds(pid)
    rows: list[dict[str, Any]] = []
    for _ in range(max(1, round(args.duration / args.interval))):
        t0 = time.monotonic()
        proc = load.start_wrk(url + "/v1/predict", bodies, args.concurrency, args.interval, args.timeout)
        time.sleep(args.interval / 2)
        depth = scrape(url)["queue_depth"]
        wrk = load.finish_wrk(proc, args.interval + args.timeout + 30)
        elapsed = time.monotonic() - t0
        rss, cpu = procs.rss_bytes(pid), procs.tree_cpu_seconds(pid)
        seconds = wrk["duration_us"] / 1e6
        rows.append(
            {
                "t_s": round(time.monotonic() - start, 1),
                "rps": round((wrk["requests"] - wrk["errors"]["status"]) / seconds, 1),
                "latency_ms": {k: round(wrk["latency_us"][k] / 1000, 2) for k in ("p50", "p99")},
                "errors": {k: v for k, v in wrk["errors"].items() if v},
                "rss_mib": round(rss / 2**20, 1) if rss else None,
                "server_cores": round((cpu - cpu_prev) / elapsed, 2),
                "queue_depth": depth,
            }
        )
        cpu_prev = cpu
        procs.log(f"soak {rows[-1]}")
        if rss is None:
            break  # the server is gone
    last = scrape(url)
    peak = max((r["rss_mib"] or 0 for r in rows), default=0)
    return {
        "duration_s": round(time.monotonic() - start, 1),
        "answers": {k: last[k] - first[k] for k in ("5xx", "429")},
        "transport_errors": sum(v for r in rows for k, v in r["errors"].items() if k != "status"),
        "rps_first_last": [rows[0]["rps"], rows[-1]["rps"]] if rows else None,
        "rss_mib": {
            "start": round(rss_start / 2**20, 1) if rss_start else None,
            "end": rows[-1]["rss_mib"] if rows else None,
            "peak": peak or None,
        },
        "intervals": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="the bundle to serve")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a bertserve setting")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds at saturation (default 600)")
    parser.add_argument("--interval", type=int, default=10, help="seconds per report row (default 10)")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="summary file (default: bench/results/soak-UTC.json)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval < 1 or args.concurrency < 1:
        parser.error("duration must be > 0, interval and concurrency >= 1")
    started = datetime.now(UTC)
    texts = load_texts(args.texts) if args.texts else make_texts(args.n_texts, 0)
    with tempfile.TemporaryDirectory(prefix="bertserve-soak-") as tmp:
        bodies = load.write_bodies(Path(tmp) / "bodies.jsonl", workload_bodies(texts, args.inputs_per_request))
        port = procs.free_port()
        argv_ = procs.service_argv(port, "--model-dir", str(args.model_dir), "--grpc-port", "0")
        server = Server("bertserve", argv_, port, Path(tmp) / "server.log", procs.settings_env(args.set))
        server.start()
        try:
            server.wait_ready(args.ready_timeout)
            result = soak(server.base_url, server.pid, bodies, args)
        except ServerError as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        finally:
            died, drain_start = not server.alive(), time.monotonic()
            exit_status = server.stop(grace=60)
            drain_s = round(time.monotonic() - drain_start, 2)
            if died:
                print(f"soak: the server died:\n{server.log_tail()}", file=sys.stderr)
    summary = {
        "tool": "bench.soak",
        "created": started.isoformat(timespec="seconds"),
        "settings": procs.settings_env(args.set),
        "concurrency": args.concurrency,
        **result,
        "shutdown": {"died": died, "exit_status": exit_status, "drain_s": drain_s},
    }
    path = tables.write_summary(summary, args.json, "soak")
    print(
        f"soak: {result['duration_s']} s, req/s first/last {result['rps_first_last']}, 5xx/429 {result['answers']}, "
        f"transport errors {result['transport_errors']}, RSS {result['rss_mib']} MiB; summary {path}",
        file=sys.stderr,
    )
    return 1 if died or result["answers"]["5xx"] or result["transport_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
