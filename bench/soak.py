"""Soak test: hold the service at saturation for a long time and report how it holds up.

Closed-loop clients (``--concurrency``, default 32: far more than one batch, so the queue never runs dry) send
``POST /v1/predict`` back to back for ``--duration`` seconds (default 600, ten minutes; not run in CI). Every
``--interval`` seconds the report gets one row: requests and inputs per second, latency p50/p99, outcomes by status
(and transport errors by kind), the server's resident memory and CPU, and its queue depth from /metrics (a queue
that is rarely empty is what "saturated" means). At the end: totals, errors by status, RSS at start / end / peak,
and the throughput of the first and last intervals, so a slow leak or a slow-down shows as a drift.

Two ways to point it at a server, both loopback only:

- ``--model-dir DIR``: start ``python -m service`` on 127.0.0.1 and a free port (extra settings with
  ``--setting KEY=VALUE``, e.g. ``--setting max_batch_size=16``), wait until ready, soak, then SIGTERM it and
  record the exit status and drain time.
- ``--url http://127.0.0.1:PORT --pid PID``: soak a server that is already running (RSS and CPU need its pid).

Output: the JSON report on stdout (and ``--json FILE``), one progress line per interval on stderr. Exit status 1
when the server died, answered 5xx, or dropped connections during the soak; 0 otherwise (429s are reported, not
failures: shedding load at saturation is correct behaviour).

Example (10 s smoke): ``python -m bench.soak --model-dir models/bbc --duration 10 --interval 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import HttpConnection, NotLoopback, Target, build_requests, parse_target
from bench.procs import Server, ServerError, cpu_seconds, free_port, http_get, rss_bytes, service_argv, settings_env
from bench.workload import emit_report, load_texts, percentile

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_TEXTS = [
    "Shares in the bank rose after it reported record profits for the third quarter.",
    "The striker scored twice as the home side came from behind to win the cup tie.",
    "Ministers will publish the long-awaited plans for the health service next week.",
    "The film, a quiet drama about two sisters, won the top prize at the festival.",
    "A new smartphone chip promises longer battery life and faster downloads.",
    "Oil prices fell sharply on fears of weaker demand from the world's largest economies.",
    "The band announced a world tour to mark the twentieth anniversary of their debut album.",
    "Broadband speeds in rural areas still lag far behind those in towns and cities.",
]


# -- server process ------------------------------------------------------------------------------------------
def start_server(model_dir: Path, settings: dict[str, str], log_path: Path, ready_timeout: float) -> Server:
    """``python -m service`` on a free loopback port with exactly ``settings`` (inherited BERTSERVE_* dropped)."""
    port = free_port()
    server = Server("bertserve", service_argv(model_dir, port), port, log_path, settings_env(settings), True)
    server.start()
    try:
        server.wait_ready(ready_timeout)
    except ServerError as exc:
        server.stop(grace=10)
        raise RuntimeError(str(exc)) from exc
    return server


def metric_value(exposition: bytes, name: str) -> float | None:
    """First unlabelled sample ``name`` in a Prometheus exposition (enough for the gauges read here)."""
    prefix = name.encode() + b" "
    for line in exposition.splitlines():
        if line.startswith(prefix):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


# -- load ----------------------------------------------------------------------------------------------------
@dataclass
class Interval:
    """What completed in one reporting interval."""

    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    inputs: int = 0


@dataclass
class Soak:
    target: Target
    requests: list[tuple[bytes, int]]
    timeout: float
    end: float
    issued: int = 0
    current: Interval = field(default_factory=Interval)
    totals: Counter[str] = field(default_factory=Counter)
    stop: bool = False


async def client(soak: Soak, loop: asyncio.AbstractEventLoop) -> None:
    conn: HttpConnection | None = None
    try:
        while not soak.stop and time.monotonic() < soak.end:
            raw, n_inputs = soak.requests[soak.issued % len(soak.requests)]
            soak.issued += 1
            if conn is None or conn.closed:
                try:
                    _, conn = await loop.create_connection(
                        lambda: HttpConnection(loop), soak.target.host, soak.target.port
                    )
                except OSError as exc:
                    soak.current.outcomes[f"connect_error:{type(exc).__name__}"] += 1
                    conn = None
                    await asyncio.sleep(0.1)
                    continue
            t0 = time.perf_counter()
            try:
                response = await conn.request(raw, soak.timeout)
            except TimeoutError:
                soak.current.outcomes["timeout"] += 1
                conn.close()
                conn = None
                continue
            except (ConnectionError, OSError):
                soak.current.outcomes["connection_error"] += 1
                conn.close()
                conn = None
                await asyncio.sleep(0.01)
                continue
            interval = soak.current
            interval.outcomes[str(response.status)] += 1
            if response.status == 200:
                interval.latencies.append(time.perf_counter() - t0)
                interval.inputs += n_inputs
            if response.close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


async def run_soak(
    target: Target,
    requests: list[tuple[bytes, int]],
    *,
    pid: int | None,
    duration: float,
    interval_s: float,
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    soak = Soak(target, requests, timeout, start + duration)
    metrics_url = f"http://{target.host}:{target.port}/metrics"
    rows: list[dict[str, Any]] = []
    rss_start = rss_bytes(pid) if pid else None
    rss_peak = rss_start or 0
    cpu_prev = cpu_seconds(pid) if pid else None
    workers = [loop.create_task(client(soak, loop)) for _ in range(concurrency)]
    t_prev = start
    while True:
        now = time.monotonic()
        next_mark = min(soak.end, t_prev + interval_s)
        depths: list[float] = []
        while now < next_mark:  # sample the queue depth a few times per interval, off the event loop
            status, body = await asyncio.to_thread(http_get, metrics_url, 2.0)
            depth = metric_value(body, "bertserve_queue_depth") if status == 200 else None
            if depth is not None:
                depths.append(depth)
            await asyncio.sleep(max(0.0, min(next_mark - time.monotonic(), interval_s / 5)))
            now = time.monotonic()
        done, soak.current = soak.current, Interval()
        elapsed = now - t_prev
        rss = rss_bytes(pid) if pid else None
        rss_peak = max(rss_peak, rss or 0)
        cpu = cpu_seconds(pid) if pid else None
        lat = sorted(done.latencies)
        ok = done.outcomes.get("200", 0)
        row: dict[str, Any] = {
            "t_s": round(now - start, 2),
            "requests_per_s": round(sum(done.outcomes.values()) / elapsed, 2),
            "ok_per_s": round(ok / elapsed, 2),
            "inputs_per_s": round(done.inputs / elapsed, 2),
            "latency_ms": {"p50": round(1e3 * percentile(lat, 50), 2), "p99": round(1e3 * percentile(lat, 99), 2)}
            if lat
            else None,
            "outcomes": dict(sorted(done.outcomes.items())),
            "rss_mib": round(rss / 2**20, 1) if rss else None,
            "server_cpu_cores": round((cpu - cpu_prev) / elapsed, 2) if cpu is not None and cpu_prev else None,
            "queue_depth_mean": round(sum(depths) / len(depths), 1) if depths else None,
            "queue_depth_min": min(depths) if depths else None,
        }
        cpu_prev = cpu
        rows.append(row)
        soak.totals.update(done.outcomes)
        p99 = (row["latency_ms"] or {}).get("p99")
        print(
            f"soak t={row['t_s']:7.1f}s ok/s={row['ok_per_s']:8.1f} p99={p99}ms rss={row['rss_mib']}MiB "
            f"queue~{row['queue_depth_mean']} {row['outcomes']}",
            file=sys.stderr,
        )
        t_prev = now
        if now >= soak.end or (pid is not None and rss is None):
            break
    soak.stop = True
    _, pending = await asyncio.wait(workers, timeout=min(timeout, 10.0))
    for task in pending:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    rss_end = rss_bytes(pid) if pid else None
    totals = dict(sorted(soak.totals.items()))
    errors = {k: v for k, v in totals.items() if k != "200"}
    return {
        "duration_s": round(time.monotonic() - start, 2),
        "interval_s": interval_s,
        "concurrency": concurrency,
        "inputs_per_request": requests[0][1],
        "requests": sum(totals.values()),
        "outcomes": totals,
        "errors": errors,
        "server_errors": sum(v for k, v in errors.items() if k.startswith("5")),
        "transport_errors": sum(v for k, v in errors.items() if not k[:1].isdigit()),
        "throughput_first_last": [rows[0]["ok_per_s"], rows[-1]["ok_per_s"]] if rows else None,
        "rss_mib": {
            "start": round(rss_start / 2**20, 1) if rss_start else None,
            "end": round(rss_end / 2**20, 1) if rss_end else None,
            "peak": round(rss_peak / 2**20, 1) if rss_peak else None,
        },
        "intervals": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-dir", type=Path, help="start `python -m service` on this bundle (loopback)")
    where.add_argument("--url", help="soak a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS and CPU")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --model-dir: a BERTSERVE_* setting (e.g. max_queue=64); repeatable",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds at saturation (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per report row (default 10)")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="closed-loop clients (default 32)")
    parser.add_argument("--inputs-per-request", type=int, default=1, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.concurrency < 1:
        parser.error("duration and interval must be > 0, concurrency >= 1")
    settings = {}
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--setting {item!r}: expected KEY=VALUE")
        settings[key.strip().lower().removeprefix("bertserve_")] = value
    texts = _texts(args)

    server: Server | None = None
    log_path = Path(tempfile.gettempdir()) / f"bertserve-soak-{os.getpid()}.log"
    try:
        if args.model_dir is not None:
            server = start_server(args.model_dir, settings, log_path, args.ready_timeout)
            url, pid = server.base_url, server.pid
        else:
            url, pid = args.url, args.pid
        target = parse_target(url)
    except (NotLoopback, RuntimeError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    try:
        requests = build_requests(target, texts, args.inputs_per_request, None)
        report = asyncio.run(
            run_soak(
                target,
                requests,
                pid=pid,
                duration=args.duration,
                interval_s=args.interval,
                concurrency=args.concurrency,
                timeout=args.timeout,
            )
        )
    finally:
        shutdown = _stop(server) if server is not None else None
    report = {
        "url": f"http://{target.host}:{target.port}{target.path}",
        "server_pid": pid,
        "n_texts": len(texts),
        "settings": settings,
        **report,
    }
    if shutdown is not None:
        report["shutdown"] = shutdown | {"log": str(log_path)}
    died = server is not None and shutdown is not None and shutdown["died_during_soak"]
    emit_report(report, args.json)
    rss = report["rss_mib"]
    print(
        f"soak: {report['requests']} requests in {report['duration_s']} s, errors {report['errors']}, "
        f"ok/s first/last {report['throughput_first_last']}, RSS {rss['start']} -> {rss['end']} MiB "
        f"(peak {rss['peak']})",
        file=sys.stderr,
    )
    return 1 if died or report["server_errors"] or report["transport_errors"] else 0


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return load_texts(args.texts)
    try:
        from bench.workload import make_texts

        return make_texts(args.n_texts, 0)
    except (RuntimeError, OSError) as exc:  # the BBC corpus comes with the [train] extra
        print(f"soak: {exc}; using {len(FALLBACK_TEXTS)} built-in texts", file=sys.stderr)
        return list(FALLBACK_TEXTS)


def _stop(server: Server) -> dict[str, Any]:
    """SIGTERM the server (its process group), wait for its drain; exit status and drain time for the report."""
    died = not server.alive()
    started = time.monotonic()
    rc = server.stop(grace=60)
    return {"died_during_soak": died, "exit_status": rc, "drain_s": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    raise SystemExit(main())
