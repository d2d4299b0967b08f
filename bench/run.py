"""The demo benchmark: the in-process ceiling, a naive server and bertserve on the same texts, in one run.

Per bundle variant, one after the other: the in-process ONNX Runtime ceiling (:mod:`bench.ceiling`, in a subprocess
so its memory and threads are gone before the servers start), the naive per-request server
(:mod:`bench.naive_server`), bertserve (``BERTSERVE_*`` settings from the environment or ``--set NAME=VALUE``) and,
with ``--baseline-root DIR``, bertserve from another checkout (or ``.`` with ``--baseline-set``): a same-run A/B.
Each server is measured at every ``--concurrency`` with one text per request and at ``--multi-concurrency`` with
``--inputs-per-request``, by wrk (:mod:`bench.load`) sending the workload's texts in turn (:mod:`bench.workload`:
the length mix decides padding and batching), after ``--warmup`` seconds of the same load.

Why ratios measured in one run: absolute numbers drift 5-20% from run to run on a small shared machine, but the
servers and the ceiling measured minutes apart on the same texts drift together. So every throughput is reported
over the ceiling's best, and bertserve's p99 over the naive server's (and its throughput over the baseline's).

Usage: ``python -m bench.run --model-dir models/bbc [--variant fp32,int8] [--json PATH]``; ``--quick`` is a smoke
test of a few seconds. The summary goes to ``--json`` (default ``bench/results/run-UTC.json``), its table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load, procs, tables
from bench.procs import ROOT, Server, ServerError, ints
from bench.workload import length_summary, make_texts, save_texts, token_lengths, workload_bodies
from service.bundle import load_bundle

SERVERS = ("naive", "bertserve", "baseline")


@dataclass
class Config:
    """The command line, field for field (see :func:`build_parser`)."""

    model_dir: Path
    variant: list[str]
    concurrency: list[int]
    multi_concurrency: int
    inputs_per_request: int
    duration: float
    warmup: float
    n_texts: int
    seed: int
    batch_sizes: list[int]
    ceiling_max_seconds: float
    threads: int
    provider: str
    only: list[str]
    ready_timeout: float
    request_timeout: float
    json: Path | None
    quick: bool
    baseline_root: Path | None = None
    baseline_set: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    service_env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if set(self.only) - {"ceiling", *SERVERS}:
            raise SystemExit(f"--only: unknown {sorted(set(self.only) - {'ceiling', *SERVERS})}")
        if self.quick:
            self.duration, self.warmup, self.n_texts = min(self.duration, 1.0), min(self.warmup, 0.5), 64
            self.concurrency, self.multi_concurrency, self.batch_sizes = [1, 8], 4, [1, 8]
            self.ceiling_max_seconds = min(self.ceiling_max_seconds, 1.0)
        self.model_dir = self.model_dir.resolve()
        self.baseline_root = self.baseline_root.resolve() if self.baseline_root else None
        self.only += ["baseline"] * (self.baseline_root is not None)
        self.service_env = procs.settings_env(self.set)


def run_ceiling(cfg: Config, variant: str, texts_file: Path, work: Path) -> dict[str, Any]:
    """``python -m bench.ceiling`` in a subprocess; the summary part of its report."""
    out = work / f"ceiling-{variant}.json"
    argv = [sys.executable, "-m", "bench.ceiling", "--model-dir", str(cfg.model_dir), "--variant", variant]
    argv += ["--texts", str(texts_file), "--json", str(out), "--seed", str(cfg.seed), "--provider", cfg.provider]
    argv += ["--max-seconds", str(cfg.ceiling_max_seconds), "--batch-sizes", ",".join(map(str, cfg.batch_sizes))]
    argv += ["--threads", str(cfg.threads)]
    # BERTSERVE_* settings reach the ceiling too: it reads the thread settings the service would use.
    subprocess.run(argv, cwd=ROOT, env=procs.child_env(cfg.service_env), check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return {k: report[k] for k in ("layouts", "best", "best_pretokenized", "batch1")}


def batch_totals(base_url: str) -> tuple[float, float]:
    """(sum, count) of the bertserve_batch_size histogram over every label set; zeros without /metrics."""
    samples = procs.metric_samples(base_url)
    total, count = (sum(s.value for s in samples if s.name == f"bertserve_batch_size_{k}") for k in ("sum", "count"))
    return total, count


def make_server(target: str, variant: str, cfg: Config, work: Path) -> Server:
    port = procs.free_port()
    log = work / f"{target}-{variant}.log"
    if target == "naive":
        argv = [sys.executable, "-m", "bench.naive_server", "--model-dir", str(cfg.model_dir), "--port", str(port)]
        argv += ["--variant", variant, "--provider", cfg.provider]
        argv += ["--threads", str(cfg.threads)]
        return Server("naive", argv, port, log, cfg.service_env)  # the same thread settings
    env = {"BERTSERVE_PROVIDER": cfg.provider, "BERTSERVE_VARIANT": variant}
    env |= {"BERTSERVE_INTRA_OP_THREADS": str(cfg.threads)} if cfg.threads else {}
    env |= cfg.service_env
    argv = procs.service_argv(port, "--model-dir", str(cfg.model_dir), "--grpc-port", "0")
    if target == "baseline" and cfg.baseline_root:
        return Server(target, argv, port, log, env | procs.settings_env(cfg.baseline_set), root=cfg.baseline_root)
    return Server(target, argv, port, log, env)


def measure_server(server: Server, bodies: dict[int, Path], cfg: Config) -> list[dict[str, Any]]:
    """Start the server, warm and measure it at every point, always stop it."""
    plan = [(c, 1) for c in cfg.concurrency] + [(cfg.multi_concurrency, cfg.inputs_per_request)]
    points = []
    with procs.running(server, cfg.ready_timeout):
        for c, n in plan:
            if cfg.warmup > 0:
                load.run_wrk(server.base_url + "/v1/predict", bodies[n], c, cfg.warmup, cfg.request_timeout)
            before = batch_totals(server.base_url)
            point = load.measure(server, "/v1/predict", bodies[n], n, c, cfg.duration, cfg.request_timeout)
            after = batch_totals(server.base_url)
            batches = after[1] - before[1]
            point["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
            points.append({"server": server.name, **point})
            lat = point["latency_ms"]
            procs.log(
                f"  {server.name} c={c} x{n}: {point['inputs_per_s']} inputs/s, p50 {lat['p50']} ms, p99 {lat['p99']}"
            )
            if not server.alive():
                raise ServerError(f"{server.name} died during c={c}:\n{server.log_tail()}")
    return points


def add_ratios(block: dict[str, Any]) -> None:
    """Each point's throughput over the ceiling's best; for bertserve, its p99 over the naive server's and its
    throughput over the baseline's at the same point."""
    best = block["ceiling"]["best"]["sequences_per_s"] if block["ceiling"] else None
    by = {(p["server"], p["concurrency"], p["inputs_per_request"]): p for p in block["points"]}
    for p in block["points"]:
        p["vs_ceiling"] = round(p["inputs_per_s"] / best, 4) if best else None
        naive, base = (by.get((s, p["concurrency"], p["inputs_per_request"])) for s in ("naive", "baseline"))
        ours = p["server"] == "bertserve"
        p["p99_vs_naive"] = round(p["latency_ms"]["p99"] / naive["latency_ms"]["p99"], 4) if ours and naive else None
        p["vs_baseline"] = round(p["inputs_per_s"] / base["inputs_per_s"], 4) if ours and base else None


def run_comparison(cfg: Config) -> dict[str, Any]:
    """Run everything in ``cfg``; returns the summary."""
    bundle = load_bundle(cfg.model_dir)
    texts = make_texts(cfg.n_texts, cfg.seed)
    if os.getloadavg()[0] > 0.5:
        procs.log(f"warning: load average {os.getloadavg()[0]:.2f}: the machine is not quiet, numbers will be noisy")
    summary: dict[str, Any] = {
        "tool": "bench.run",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": procs.git_commit(),
        "host": procs.host_info(),
        "config": {
            "model": bundle.manifest.name,
            "version": bundle.manifest.version,
            "provider": cfg.provider,
            "concurrency": cfg.concurrency,
            "multi": {"concurrency": cfg.multi_concurrency, "inputs_per_request": cfg.inputs_per_request},
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "threads": cfg.threads or None,
            "service_env": {k: v for k, v in os.environ.items() if k.startswith("BERTSERVE_")} | cfg.service_env,
            "baseline": {
                "root": cfg.baseline_root.name,
                "commit": procs.git_commit(cfg.baseline_root),
                "set": cfg.baseline_set,
            }
            if cfg.baseline_root
            else None,
        },
        "workload": {
            "n": len(texts),
            "seed": cfg.seed,
            "tokens": length_summary(token_lengths(texts, bundle.tokenizer_path)),
        },
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        save_texts(work / "texts.json", texts)
        bodies = {
            n: load.write_bodies(work / f"bodies-{n}.jsonl", workload_bodies(texts, n))
            for n in {1, cfg.inputs_per_request}
        }
        for variant in cfg.variant:
            block: dict[str, Any] = {"ceiling": None, "points": [], "errors": []}
            summary["variants"][variant] = block
            for target in ["ceiling", *SERVERS]:
                if target not in cfg.only:
                    continue
                procs.log(f"== {variant}: {target}")
                try:
                    if target == "ceiling":
                        block["ceiling"] = run_ceiling(cfg, variant, work / "texts.json", work)
                    else:
                        block["points"] += measure_server(make_server(target, variant, cfg, work), bodies, cfg)
                except (ServerError, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                    block["errors"].append(f"{target}: {exc}")
                    procs.log(f"  {target} FAILED: {exc}")
            add_ratios(block)
    summary["host"] |= {"loadavg_after": procs.host_info()["loadavg"]}
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/bbc"))
    p.add_argument("--variant", type=lambda s: s.split(","), default=["fp32"], help="e.g. fp32,opt,int8")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 64, 256], help="comma-separated")
    p.add_argument("--multi-concurrency", type=int, default=8, help="concurrency of the multi-input point")
    p.add_argument("--inputs-per-request", type=int, default=8, help="texts per request, multi-input point")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per point (whole seconds)")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per point")
    p.add_argument("--n-texts", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="ceiling batch sizes")
    p.add_argument("--ceiling-max-seconds", type=float, default=10.0, help="time cap per ceiling run")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads everywhere; 0 = service default")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a bertserve setting")
    p.add_argument("--only", type=lambda s: s.split(","), default=["ceiling", "naive", "bertserve"])
    p.add_argument("--baseline-root", type=Path, help="also measure bertserve from this tree (an A/B)")
    p.add_argument("--baseline-set", action="append", default=[], metavar="NAME=VALUE", help="baseline setting")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--json", type=Path, help="summary file (default: bench/results/run-UTC.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 s points, c=1,8, 64 texts")
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    procs.raise_on_sigterm()
    summary = run_comparison(cfg)
    path = tables.write_summary(summary, cfg.json, "run")
    print(tables.demo_table(summary))
    print(f"\nsummary: {path}")
    return 1 if any(block["errors"] for block in summary["variants"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
