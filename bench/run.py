"""One command for the whole comparison: ceiling, naive server and bertserve on the same texts, side by side.

For each bundle variant it measures, in this order and with nothing else of ours running:

1. the in-process ONNX Runtime ceiling (``bench.ceiling``, in a subprocess so its memory and threads are gone
   before the servers start);
2. the naive per-request server (``bench.naive_server``) at each ``--concurrency``, plus ``--inputs-per-request``
   8 at ``--multi-concurrency``;
3. bertserve (``python -m service``) the same way; ``BERTSERVE_*`` settings pass through from the environment
   or from ``--set NAME=VALUE``.

Every server is its own process on a free 127.0.0.1 port, waited for on /readyz (or /healthz), driven by the
load generator as a separate process (``bench.loadgen``), and always killed at the end, also on Ctrl-C. The
table of ratios (throughput / ceiling best, p99 vs naive, p50 at c=1 vs ceiling batch-1 latency + 3 ms) is
printed; the full report goes to ``bench/results/NAME.json`` and a plot to ``bench/results/NAME.png``.

Why ratios measured in one run: on a small shared machine absolute numbers drift 5-20% from run to run, but the
servers and the ceiling measured minutes apart on the same texts drift together. Server and client CPU seconds
per request are recorded too, because on 2 cores the load generator's own CPU is taken from the server.

The parts: :mod:`bench.procs` starts, watches and stops the servers; :mod:`bench.report` turns the JSON
report into ratios, the table and the plot; this module is the runner that sequences them.

Usage: ``python -m bench.run --model-dir models/bbc [--variant fp32,int8] [--duration 30 --warmup 5]``;
``--quick`` is a smoke test of a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Server, ServerError, child_env, free_port, http_get, running, service_argv
from bench.report import compute_ratios, cross_variant, format_report, plot, row_text
from bench.workload import length_summary, make_texts, save_texts, token_lengths
from service.bundle import load_bundle

RESULTS = ROOT / "bench" / "results"


# -- measurements --------------------------------------------------------------------------------------
def module_argv(module: str, flags: dict[str, object]) -> list[str]:
    """``python -m MODULE --name value ...`` with this interpreter; flags whose value is None are left out."""
    argv = [sys.executable, "-m", module]
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def run_ceiling(model_dir: Path, variant: str, texts_file: Path, cfg: Config, work: Path) -> dict[str, Any]:
    out = work / f"ceiling-{variant}.json"
    flags = {
        "model-dir": model_dir,
        "variant": variant,
        "texts": texts_file,
        "json": out,
        "seed": cfg.seed,
        "max-seconds": cfg.ceiling_max_seconds,
        "batch-sizes": ",".join(map(str, cfg.batch_sizes)),
        "provider": cfg.provider,
        "threads": cfg.threads or None,
    }
    argv = module_argv("bench.ceiling", flags)
    # BERTSERVE_* settings reach the ceiling too: it reads the thread settings the service would use.
    subprocess.run(argv, cwd=ROOT, env=child_env(cfg.service_env), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_loadgen(
    url: str, concurrency: int, inputs_per_request: int, texts_file: Path, cfg: Config, work: Path
) -> dict[str, Any]:
    out = work / f"loadgen-{concurrency}-{inputs_per_request}.json"
    flags = {
        "url": url,
        "concurrency": concurrency,
        "inputs-per-request": inputs_per_request,
        "texts": texts_file,
        "duration": cfg.duration,
        "warmup": cfg.warmup,
        "timeout": cfg.request_timeout,
        "json": out,
    }
    argv = module_argv("bench.loadgen", flags)
    limit = cfg.warmup + cfg.duration + cfg.request_timeout + 60
    subprocess.run(argv, cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL, timeout=limit)
    return json.loads(out.read_text())


def scrape_batch_metrics(base_url: str) -> dict[str, float] | None:
    """Sums of bertserve_batch_size and bertserve_batch_tokens histograms (all label sets), if exposed."""
    status, body = http_get(base_url + "/metrics")
    if status != 200:
        return None
    wanted = ("bertserve_batch_size_sum", "bertserve_batch_size_count", "bertserve_batch_tokens_sum")
    totals = dict.fromkeys(wanted, 0.0)
    for line in body.decode(errors="replace").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            with contextlib.suppress(ValueError, IndexError):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _batch_stats(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if not before or not after:
        return None
    batches = after["bertserve_batch_size_count"] - before["bertserve_batch_size_count"]
    if batches <= 0:
        return None
    return {
        "batches": batches,
        "mean_batch_size": (after["bertserve_batch_size_sum"] - before["bertserve_batch_size_sum"]) / batches,
        "mean_batch_tokens": (after["bertserve_batch_tokens_sum"] - before["bertserve_batch_tokens_sum"]) / batches,
    }


def measure_server(server: Server, texts_file: Path, cfg: Config, work: Path) -> dict[str, Any]:
    """Start the server, drive it at every concurrency (and the multi-input mode), always stop it."""
    runs: list[dict[str, Any]] = []
    plan = [(c, 1) for c in cfg.concurrencies] + [(cfg.multi_concurrency, cfg.multi_inputs)]
    info: Any = None
    try:
        with running(server, cfg.ready_timeout):
            status, body = http_get(server.base_url + "/v1/models")
            if status == 200:
                with contextlib.suppress(ValueError):
                    info = json.loads(body)
            for concurrency, per_request in plan:
                server.wait_idle()
                before_cpu, before_metrics = server.cpu_seconds(), scrape_batch_metrics(server.base_url)
                result = run_loadgen(server.base_url, concurrency, per_request, texts_file, cfg, work)
                after_cpu, after_metrics = server.cpu_seconds(), scrape_batch_metrics(server.base_url)
                if before_cpu is not None and after_cpu is not None:
                    result["server_cpu_s"] = after_cpu - before_cpu  # warm-up and drain included
                    # per input sent (warm-up included, like the CPU seconds): comparable across modes
                    sent = (result["issued"] or 1) * per_request
                    result["server_cpu_us_per_input"] = 1e6 * (after_cpu - before_cpu) / sent
                result["server_batches"] = _batch_stats(before_metrics, after_metrics)
                result["warnings"] = _run_warnings(result, cfg)
                runs.append(result)
                _log(f"  {server.name:<9s} {row_text(result)}")
                for warning in result["warnings"]:
                    _log(f"  warning: {warning}")
                if server.proc is not None and server.proc.poll() is not None:
                    raise ServerError(f"{server.name} died during c={concurrency}:\n{server.log_tail()}")
    except (ServerError, subprocess.SubprocessError, OSError, ValueError) as exc:
        _log(f"  {server.name}: FAILED: {exc}")
        return {"runs": runs, "error": str(exc), "info": info}
    return {"runs": runs, "error": None, "info": info}


def _run_warnings(result: dict[str, Any], cfg: Config) -> list[str]:
    """Signs that a point measured a transient rather than a steady state."""
    warnings = []
    lat = result.get("latency_ms")
    if not result["ok"]:
        warnings.append("no successful response completed inside the window: raise --duration/--warmup")
    elif lat and lat["p99"] > 1e3 * cfg.duration / 4:
        warnings.append(
            f"p99 {lat['p99']:.0f} ms is over a quarter of the {cfg.duration:g} s window: too few round trips "
            "per client for stable percentiles; raise --duration"
        )
    if lat and lat["max"] > 1e3 * cfg.warmup:
        warnings.append(f"max latency {lat['max']:.0f} ms exceeds the {cfg.warmup:g} s warm-up: raise --warmup")
    return warnings


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- orchestration -------------------------------------------------------------------------------------
@dataclass
class Config:
    model_dir: Path
    variants: list[str]
    concurrencies: list[int]
    multi_concurrency: int
    multi_inputs: int
    duration: float
    warmup: float
    n_texts: int
    seed: int
    batch_sizes: list[int]
    ceiling_max_seconds: float
    threads: int
    provider: str
    ready_timeout: float
    request_timeout: float
    service_env: dict[str, str]
    targets: list[str]
    out_dir: Path
    name: str | None
    naive_endpoint: str = "sync"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_comparison(cfg: Config) -> tuple[dict[str, Any], Path, Path]:
    """Run everything in ``cfg``; returns the report and the JSON and PNG paths written."""
    from bench.ceiling import cpu_peak

    bundle = load_bundle(cfg.model_dir)
    manifest = bundle.manifest
    started = datetime.now(UTC)
    name = cfg.name or f"{manifest.name}-{'-'.join(cfg.variants)}-{started.strftime('%Y%m%dT%H%M%SZ')}"
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    texts = make_texts(cfg.n_texts, cfg.seed)
    tokens = length_summary(token_lengths(texts, bundle.tokenizer_path))
    loadavg = _loadavg()
    if float(loadavg.split()[0] if loadavg != "unknown" else 0) > 0.5:
        _log(f"warning: load average {loadavg}: the machine is not quiet, numbers will be noisy")
    service_env = {k: v for k, v in os.environ.items() if k.startswith("BERTSERVE_")} | cfg.service_env
    report: dict[str, Any] = {
        "meta": {
            "name": name,
            "started": started.isoformat(timespec="seconds"),
            "model_dir": str(bundle.path),
            "model": manifest.name,
            "version": manifest.version,
            "provider": cfg.provider,
            "variants": cfg.variants,
            "concurrencies": cfg.concurrencies,
            "multi": {"concurrency": cfg.multi_concurrency, "inputs_per_request": cfg.multi_inputs},
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "threads": cfg.threads or None,
            "service_env": service_env,
            "naive_endpoint": cfg.naive_endpoint,
            "cpu": cpu_peak(),
            "loadavg_start": loadavg,
            "python": platform.python_version(),
            "onnxruntime": _version("onnxruntime"),
            "git_commit": _git_commit(),
            "argv": sys.argv,
        },
        "workload": {"n": cfg.n_texts, "seed": cfg.seed, "tokens": tokens},
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        texts_file = work / "texts.json"
        save_texts(texts_file, texts)
        for variant in cfg.variants:
            block: dict[str, Any] = {"ceiling": None, "servers": {}, "ratios": None, "error": None}
            report["variants"][variant] = block
            _log(f"== {variant}: in-process ceiling")
            if "ceiling" in cfg.targets:
                try:
                    block["ceiling"] = run_ceiling(cfg.model_dir, variant, texts_file, cfg, work)
                except (subprocess.SubprocessError, OSError, ValueError) as exc:
                    block["error"] = f"ceiling failed: {exc}"
                    _log(block["error"])
            for target in ("naive", "bertserve"):
                if target not in cfg.targets:
                    continue
                server = _make_server(target, variant, cfg, work)
                _log(f"== {variant}: {target} on port {server.port}")
                block["servers"][target] = measure_server(server, texts_file, cfg, work)
            if block["ceiling"]:
                block["ratios"] = compute_ratios(block["ceiling"], block["servers"])
    report["cross_variant"] = cross_variant(
        report, {v: dict(info.metrics) for v, info in manifest.variants.items() if v in cfg.variants}
    )
    report["meta"]["loadavg_end"] = _loadavg()
    report["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    json_path = cfg.out_dir / f"{name}.json"
    png_path = cfg.out_dir / f"{name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, png_path)
    return report, json_path, png_path


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return None


def _make_server(target: str, variant: str, cfg: Config, work: Path) -> Server:
    port = free_port()
    log = work / f"{target}-{variant}.log"
    if target == "naive":
        flags = {
            "model-dir": cfg.model_dir,
            "port": port,
            "variant": variant,
            "provider": cfg.provider,
            "endpoint": cfg.naive_endpoint,
            "threads": cfg.threads or None,
        }
        argv = module_argv("bench.naive_server", flags)
        return Server("naive", argv, port, log, dict(cfg.service_env))  # same thread settings
    env = {"BERTSERVE_PROVIDER": cfg.provider, "BERTSERVE_VARIANT": variant}
    if cfg.threads:
        env["BERTSERVE_INTRA_OP_THREADS"] = str(cfg.threads)
    env |= cfg.service_env
    return Server("bertserve", service_argv(cfg.model_dir, port), port, log, env)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set expects NAME=VALUE, got {pair!r}")
        key = key.upper()
        env[key if key.startswith("BERTSERVE_") else f"BERTSERVE_{key}"] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/bbc"))
    parser.add_argument("--variant", default="fp32", help="bundle variant(s), comma-separated: fp32,opt,int8")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 64, 256], help="comma-separated")
    parser.add_argument("--multi-concurrency", type=int, default=8, help="concurrency of the multi-input mode")
    parser.add_argument("--inputs-per-request", type=int, default=8, help="inputs per request, multi mode")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per point")
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16, 32, 64], help="ceiling batches")
    parser.add_argument("--ceiling-max-seconds", type=float, default=10.0, help="time cap per ceiling variant")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads everywhere; 0 = service default")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="bertserve setting, e.g. --set MAX_BATCH_SIZE=32 (BERTSERVE_ prefix optional)",
    )
    parser.add_argument("--only", default="ceiling,naive,bertserve", help="subset of ceiling,naive,bertserve")
    parser.add_argument("--naive-endpoint", choices=["sync", "async"], default="sync")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", help="output file stem (default: model-variants-UTC time)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny durations, c=1,8, few texts")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    if args.quick:
        args.duration, args.warmup, args.n_texts = min(args.duration, 1.0), min(args.warmup, 0.3), 64
        args.concurrency, args.multi_concurrency, args.batch_sizes = [1, 8], 4, [1, 8]
        args.ceiling_max_seconds = min(args.ceiling_max_seconds, 1.0)
    targets = [t for t in args.only.split(",") if t]
    unknown = set(targets) - {"ceiling", "naive", "bertserve"}
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}")
    return Config(
        model_dir=args.model_dir.resolve(),
        variants=[v for v in args.variant.split(",") if v],
        concurrencies=args.concurrency,
        multi_concurrency=args.multi_concurrency,
        multi_inputs=args.inputs_per_request,
        duration=args.duration,
        warmup=args.warmup,
        n_texts=args.n_texts,
        seed=args.seed,
        batch_sizes=args.batch_sizes,
        ceiling_max_seconds=args.ceiling_max_seconds,
        threads=args.threads,
        provider=args.provider,
        ready_timeout=args.ready_timeout,
        request_timeout=args.request_timeout,
        service_env=_env_pairs(args.set),
        targets=targets,
        out_dir=args.out_dir,
        name=args.name,
        naive_endpoint=args.naive_endpoint,
    )


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # runs the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    report, json_path, png_path = run_comparison(cfg)
    print(format_report(report))
    print(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path} and {png_path.name}")
    failed = any(
        block.get("error") or any(s.get("error") for s in block["servers"].values())
        for block in report["variants"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
