"""Training benchmarks: every number is measured by ``python -m training fit`` processes started here.

    python -m bench.training throughput [--steps 20]      examples/s: 1 vs 2 CPU processes, fp32 vs bf16 (BBC)
    python -m bench.training ab --baseline-src DIR         single-process examples/s, this checkout vs DIR (A/B pairs)
    python -m bench.training scale [--rows 1000000 20000]  peak RSS per row count, start-to-bundle, tokenization
    python -m bench.training gpu                           1 GPU: fp32 / bf16 / fp16, NCCL world size 1 (2 with 2 GPUs)

Each prints a JSON summary and writes it to bench/results/training-<command>.json. Throughput is the training
loop's own examples/s for the run (``history[-1].examples_per_s`` in the manifest); peak RSS is the fit process's
own ``ru_maxrss`` (``training.peak_rss_mb``); the tokenization rate per core is rows per CPU-second of the
tokenizing processes (``training.data_prep``). The A/B needs a baseline checkout without this code, e.g.
``git archive <commit> training service | tar -x -C DIR``. Run them on an otherwise idle machine: the numbers
are CPU-bound.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def fit(args: list[str], nproc: int = 0, src: Path = REPO, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one fit (``nproc`` > 0: under torchrun) from ``src``; its manifest, wall time and output tail."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    argv = [*(launcher if nproc else [sys.executable]), "-m", "training", "fit", *args]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            argv, cwd=src, env={**os.environ, "PYTHONPATH": str(src), **(env or {})}, stdout=log, stderr=log, text=True
        )
        peaks = {"RssAnon": 0, "RssFile": 0}  # the fit process's heap vs file-backed (memory-mapped cache) pages
        while proc.poll() is None:
            peaks = {k: max(v, _status_kb(proc.pid, k)) for k, v in peaks.items()}
            time.sleep(0.1)
        wall = time.perf_counter() - started
        log.seek(0)
        output_text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"fit failed ({' '.join(argv)}):\n{output_text[-4000:]}")
    output = Path(args[args.index("--output") + 1])
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    sampled = {f"sampled_peak_{k.lower()}_mb": round(v / 1024, 1) for k, v in peaks.items()} if not nproc else {}
    return {"manifest": manifest, "wall_s": round(wall, 1), **sampled}


def _status_kb(pid: int, key: str) -> int:
    """One field of /proc/PID/status in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rate(result: dict[str, Any]) -> float:
    return float(result["manifest"]["training"]["history"][-1]["examples_per_s"])


def throughput(steps: int, work: Path) -> dict[str, Any]:
    """BBC, max length 128, global batch 16, ``steps`` steps: one process (all threads), two processes, bf16."""
    common = ["--data", "bbc", "--max-length", "128", "--batch-size", "16", "--max-steps", str(steps), "--quiet"]
    common += ["--cache-dir", str(work / "cache")]
    runs = {
        "fp32_world1": ([], 0),
        "fp32_world2": ([], 2),
        "bf16_world1": (["--precision", "bf16"], 0),
    }
    out: dict[str, Any] = {"recipe": "bbc, max_length 128, global batch 16, --max-steps " + str(steps)}
    for name, (extra, nproc) in runs.items():
        result = fit([*common, *extra, "--output", str(work / name)], nproc)
        out[name] = {"examples_per_s": round(rate(result), 2), "wall_s": result["wall_s"]}
    out["world2_over_world1"] = round(out["fp32_world2"]["examples_per_s"] / out["fp32_world1"]["examples_per_s"], 3)
    out["bf16_over_fp32"] = round(out["bf16_world1"]["examples_per_s"] / out["fp32_world1"]["examples_per_s"], 3)
    return out


def bbc_sample(path: Path, n: int) -> Path:
    """``n`` BBC articles (a seeded sample) as a CSV both old and new fit read."""
    from training.data import load_bbc

    data = load_bbc()
    rows = random.Random(0).sample(list(zip(data.texts, data.labels, strict=True)), n)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    return path


def ab(baseline: Path, pairs: int, work: Path) -> dict[str, Any]:
    """Single-process examples/s, this checkout (B) against ``baseline`` (A), alternating A B A B on one data set."""
    data = bbc_sample(work / "bbc-400.csv", 400)
    common = ["--data", str(data), "--epochs", "1", "--max-length", "128", "--batch-size", "16", "--quiet"]
    env = {"BERTSERVE_CACHE_DIR": str(work / "cache")}
    rates: dict[str, list[float]] = {"baseline": [], "this": []}
    for i in range(pairs):
        for name, src in (("baseline", baseline), ("this", REPO)):
            rates[name].append(round(rate(fit([*common, "--output", str(work / f"{name}-{i}")], src=src, env=env)), 2))
    ratio = statistics.median(rates["this"]) / statistics.median(rates["baseline"])
    return {
        "recipe": "400 BBC articles, 1 epoch, max_length 128, batch 16",
        **rates,
        "this_over_baseline": round(ratio, 3),
    }


def short_rows(path: Path, n: int) -> Path:
    """``n`` short labelled sentences (training.tiny's generator: 1 to ~25 words, 3 classes), streamed to a CSV."""
    from training.tiny import tiny_dataset

    block = tiny_dataset(n_per_class=20000, seed=0)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label"))
        for i in range(n):
            text, label = block[i % len(block)]
            writer.writerow((f"{text} #{i}", label))
    return path


def scale(counts: list[int], steps: int, num_proc: int, work: Path) -> dict[str, Any]:
    """The same tiny-model fit (--max-steps) on ``counts`` rows each, from an empty cache: memory and time."""
    from training.tiny import write_tiny_base_model

    base = write_tiny_base_model(work / "base")
    out: dict[str, Any] = {"recipe": f"tiny BERT, max_length 64, batch 32, --max-steps {steps}, --num-proc {num_proc}"}
    for n in counts:
        data = short_rows(work / f"rows-{n}.csv", n)
        args = ["--data", str(data), "--base-model", str(base), "--max-length", "64", "--batch-size", "32"]
        args += ["--max-steps", str(steps), "--num-proc", str(num_proc), "--quiet"]
        result = fit([*args, "--cache-dir", str(work / f"cache-{n}"), "--output", str(work / f"out-{n}")])
        training = result["manifest"]["training"]
        prep = training["data_prep"]
        out[str(n)] = {
            "start_to_bundle_s": result["wall_s"],
            "peak_rss_mb": training["peak_rss_mb"],
            "sampled_peak_anon_mb": result["sampled_peak_rssanon_mb"],
            "sampled_peak_file_mb": result["sampled_peak_rssfile_mb"],
            "read_rows_per_s": round(n / prep["read_seconds"]),
            "tokenize_rows_per_s": round(n / prep["tokenize_seconds"]),
            "tokenize_rows_per_cpu_s": round(n / prep["tokenize_cpu_seconds"]),
            "data_mb": round(data.stat().st_size / 2**20, 1),
        }
    if len(counts) == 2:
        big, small = sorted(counts, reverse=True)
        out["peak_rss_ratio"] = round(out[str(big)]["peak_rss_mb"] / out[str(small)]["peak_rss_mb"], 3)
    return out


def gpu(steps: int, work: Path) -> dict[str, Any]:
    """One GPU: fp32, bf16 and fp16 throughput, and the NCCL path (world size 1; 2 when two GPUs are visible)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device visible")
    common = ["--data", "bbc", "--max-length", "256", "--batch-size", "32", "--max-steps", str(steps), "--quiet"]
    common += ["--cache-dir", str(work / "cache"), "--device", "cuda"]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    out["recipe"] = f"bbc, max_length 256, global batch 32, --max-steps {steps}"
    for precision in ("fp32", "bf16", "fp16"):
        result = fit([*common, "--precision", precision, "--output", str(work / precision)])
        out[precision] = {
            "examples_per_s": round(rate(result), 1),
            "parity": result["manifest"]["variants"]["fp32"]["parity"],
        }
    for world in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
        result = fit([*common, "--precision", "bf16", "--output", str(work / f"nccl-{world}")], nproc=world)
        out[f"nccl_world{world}_bf16"] = {
            "examples_per_s": round(rate(result), 1),
            "training_run": result["manifest"]["training_run"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("throughput").add_argument("--steps", type=int, default=20)
    ab_parser = commands.add_parser("ab")
    ab_parser.add_argument("--baseline-src", type=Path, required=True, help="a checkout with training/ and service/")
    ab_parser.add_argument("--pairs", type=int, default=2)
    scale_parser = commands.add_parser("scale")
    scale_parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 20_000])
    scale_parser.add_argument("--steps", type=int, default=30)
    scale_parser.add_argument("--num-proc", type=int, default=1)
    commands.add_parser("gpu").add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        if args.command == "throughput":
            summary = throughput(args.steps, work)
        elif args.command == "ab":
            summary = ab(args.baseline_src.resolve(), args.pairs, work)
        elif args.command == "scale":
            summary = scale(args.rows, args.steps, args.num_proc, work)
        else:
            summary = gpu(args.steps, work)
    summary = {
        "command": " ".join(["python -m bench.training", *(argv or sys.argv[1:])]),
        "cpus": os.cpu_count(),
        **summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"training-{args.command}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
