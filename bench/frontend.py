"""The front-end benchmark: bertserve's HTTP request path against a raw ASGI reference app, in one run.

On a GPU, or with the near-null tiny model, the model costs almost nothing and the per-request Python work is the
whole cost. This tool measures that work and nothing else: the same ``POST /v1/predict`` bodies, sent by wrk
(:mod:`bench.load`), to ``bench.asgi_reference`` (uvicorn + uvloop + httptools, orjson, a fixed prediction: the
floor a Python front end can reach), to bertserve serving the tiny bundle (built by ``training.tiny`` unless
``--model-dir``) from ``--server-root`` with ``--set`` settings, and optionally to a baseline bertserve from
``--baseline-root`` (another checkout, e.g. a ``git archive`` of the commit before a change) and/or with
``--baseline-set`` settings: a same-run A/B.

Per server, texts per request and concurrency: req/s and inputs/s, latency, errors, and the server's CPU per
request (whole tree, API processes, their event-loop threads). ``--rounds N`` repeats the plan with the server
order reversed every other round; ratios to the reference and to the baseline pair points of the same round, so
the drift of a shared machine cancels. bertserve gets a ``BERTSERVE_MAX_QUEUE`` that holds every text in flight
(unless set), so 256 clients x 8 texts measure the request path, not admission control.

Usage: ``python -m bench.frontend [--duration 10] [--concurrency 1,64,256] [--texts 1,8] [--api-workers 1,2]
[--rounds 1] [--baseline-root DIR] [--baseline-set K=V] [--json PATH]`` (``--help`` for the rest). Exit status
0; 1 when any request failed; 2 when a server would not start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load, procs, tables
from bench.procs import ROOT, Server, ServerError, ints
from service.bundle import load_bundle

# Review-like texts of 8-20 words (the tiny model's domain); the single-text body uses the first.
TEXTS = (
    "The service was excellent and the staff were friendly, I would happily come back again.",
    "This phone is terrible: the battery dies by noon and the screen scratches easily.",
    "An okay film, nothing special, but the soundtrack was fine.",
    "Our dinner was wonderful, the best pasta I have had in years.",
    "The hotel room was average and the breakfast ordinary.",
    "That book was boring and far too long; I gave up halfway through.",
    "The concert was amazing from the first song to the last encore.",
    "Delivery was on time and the package was in acceptable condition.",
)


@dataclass
class Target:
    """One server configuration: ``name`` is 'reference', 'bertserve' or 'baseline'."""

    name: str
    workers: int
    label: str
    root: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    model_dir: Path | None = None
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: list[int] = field(default_factory=lambda: [1, 64, 256])
    texts: list[int] = field(default_factory=lambda: [1, 8])
    api_workers: list[int] = field(default_factory=lambda: [1, 2])
    reference_workers: list[int] = field(default_factory=lambda: [1])
    rounds: int = 1
    server_root: Path = ROOT
    server_set: list[str] = field(default_factory=list)
    baseline_root: Path | None = None
    baseline_set: list[str] = field(default_factory=list)
    wrk_timeout: float = 5.0
    ready_timeout: float = 180.0
    work_dir: Path | None = None
    json_path: Path | None = None


def plan(cfg: Config) -> list[Target]:
    """The servers to measure, in the order of an even round."""
    queue = {"BERTSERVE_MAX_QUEUE": str(max(1024, 2 * max(cfg.concurrency) * max(cfg.texts)))}
    queue = {} if "BERTSERVE_MAX_QUEUE" in os.environ else queue
    targets = [Target("reference", w, "bench.asgi_reference") for w in cfg.reference_workers]
    ours = queue | procs.settings_env(cfg.server_set)
    targets += [Target("bertserve", w, _label(cfg.server_root), cfg.server_root, ours) for w in cfg.api_workers]
    if cfg.baseline_root is not None or cfg.baseline_set:
        base, root = queue | procs.settings_env(cfg.baseline_set), cfg.baseline_root or ROOT
        targets += [Target("baseline", w, _label(root), root, base) for w in cfg.api_workers]
    return targets


def make_server(target: Target, model_dir: Path, work: Path) -> Server:
    port = procs.free_port()
    log = work / f"{target.name}-w{target.workers}.log"
    if target.name == "reference":
        argv = [sys.executable, "-m", "bench.asgi_reference", "--port", str(port), "--workers", str(target.workers)]
        return Server(f"reference w={target.workers}", argv, port, log)
    argv = procs.service_argv(
        port, "--model-dir", str(model_dir), "--grpc-port", "0", "--api-workers", str(target.workers)
    )
    return Server(f"{target.name} w={target.workers}", argv, port, log, target.env, root=target.root)


def add_ratios(points: list[dict[str, Any]], reference_workers: int) -> None:
    """Each bertserve and baseline point's req/s over the reference's, and bertserve's over the baseline's, both
    from the same round."""
    rps = {(p["server"], p["workers"], p["round"], p["inputs_per_request"], p["concurrency"]): p["rps"] for p in points}
    for p in points:
        ref = rps.get(("reference", reference_workers, p["round"], p["inputs_per_request"], p["concurrency"]))
        base = rps.get(("baseline", p["workers"], p["round"], p["inputs_per_request"], p["concurrency"]))
        p["vs_reference"] = round(p["rps"] / ref, 4) if ref and p["server"] != "reference" else None
        p["vs_baseline"] = round(p["rps"] / base, 4) if base and p["server"] == "bertserve" else None


def _label(root: Path) -> str:
    """A tree's commit (short), or its directory's name when it is not a git checkout (a ``git archive`` copy:
    name the directory after what it holds)."""
    commit = procs.git_commit(root)
    return commit[:9] if commit else root.name


def run(cfg: Config) -> dict[str, Any]:
    """Every round, server, body and concurrency; returns the summary (servers always stopped)."""
    work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="bertserve-frontend-"))
    work.mkdir(parents=True, exist_ok=True)
    procs.log(f"work dir (logs, bodies, bundle): {work}")
    model_dir = cfg.model_dir or procs.build_tiny(work)
    bodies = {
        n: load.write_bodies(work / f"body-{n}.jsonl", [{"inputs": TEXTS[0] if n == 1 else list((TEXTS * n)[:n])}])
        for n in cfg.texts
    }
    targets = plan(cfg)
    points: list[dict[str, Any]] = []
    host, started = procs.host_info(), datetime.now(UTC)
    for round_ in range(cfg.rounds):
        for target in targets if round_ % 2 == 0 else targets[::-1]:
            server = make_server(target, model_dir, work)
            procs.log(f"round {round_ + 1}: starting {server.name} ({target.label})")
            with procs.running(server, cfg.ready_timeout, grace=10.0):
                if cfg.warmup > 0:
                    load.run_wrk(server.base_url + "/v1/predict", bodies[cfg.texts[0]], 64, cfg.warmup, cfg.wrk_timeout)
                for n in cfg.texts:
                    for c in cfg.concurrency:
                        point = load.measure(server, "/v1/predict", bodies[n], n, c, cfg.duration, cfg.wrk_timeout)
                        points.append({"server": target.name, "workers": target.workers, "round": round_, **point})
                        cpu = point["server_cpu_ms"]
                        procs.log(
                            f"{server.name} n={n} c={c}: {point['rps']:,.0f} req/s, p99 {point['latency_ms']['p99']}"
                            f" ms, errors {point['errors']}, CPU/req {cpu['total']} ms (loop {cpu['loop']})"
                        )
    add_ratios(points, cfg.reference_workers[0])
    return {
        "tool": "bench.frontend",
        "created": started.isoformat(timespec="seconds"),
        "git_commit": procs.git_commit(),
        "host": host | {"loadavg_after": procs.host_info()["loadavg"]},
        "config": {
            "model": load_bundle(model_dir).manifest.name,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "rounds": cfg.rounds,
            "concurrency": cfg.concurrency,
            "texts_per_request": cfg.texts,
            "api_workers": cfg.api_workers,
            "reference_workers": cfg.reference_workers,
            "wrk_timeout_s": cfg.wrk_timeout,
        },
        "servers": {t.name: {"label": t.label, "env": t.env} for t in targets},
        "points": points,
        "errors_total": sum(p["errors"] for p in points),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="bundle to serve (default: build the tiny bundle)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per point (wrk -d)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load after each start")
    p.add_argument("--concurrency", type=ints, default=[1, 64, 256], help="wrk connections, e.g. 1,64,256")
    p.add_argument("--texts", type=ints, default=[1, 8], help="texts per request, e.g. 1,8")
    p.add_argument("--api-workers", type=ints, default=[1, 2], help="bertserve --api-workers values")
    p.add_argument("--reference-workers", type=ints, default=[1], help="reference app worker processes")
    p.add_argument("--rounds", type=int, default=1, help="repeat the plan, order reversed every other round")
    p.add_argument("--server-root", type=Path, default=ROOT, help="source tree to run bertserve from")
    p.add_argument("--set", dest="server_set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--baseline-root", type=Path, help="measure a baseline bertserve from this tree too")
    p.add_argument("--baseline-set", action="append", default=[], metavar="NAME=VALUE", help="baseline setting")
    p.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk --timeout: slower responses are errors")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--work-dir", type=Path, help="logs, bodies and the tiny bundle (default: a new temp dir)")
    p.add_argument(
        "--json", type=Path, dest="json_path", help="summary file (default: bench/results/frontend-UTC.json)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    cfg.server_root = cfg.server_root.resolve()
    cfg.baseline_root = cfg.baseline_root.resolve() if cfg.baseline_root else None
    procs.raise_on_sigterm()
    try:
        summary = run(cfg)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    path = tables.write_summary(summary, cfg.json_path, "frontend")
    print(tables.frontend_table(summary))
    print(f"\nsummary: {path}; errors: {summary['errors_total']}")
    return 0 if summary["errors_total"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
