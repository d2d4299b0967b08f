"""Put several ``bench.run`` result files side by side and show their spread.

Two uses, one tool. Same configuration run N times: the spread column *is* the run-to-run noise, the number a
tuning change has to beat before it is kept. Different configurations (``--set MAX_BATCH_SIZE=16`` against
``=64``, fp32 against int8): each column is one configuration, labelled by what differs in its BERTSERVE_*
settings, and the spread says whether they differ by more than that noise.

Only ratios measured within one run are compared by default (throughput / ceiling, p99 / naive, bertserve /
naive), since they cancel most of the drift of a shared machine; ``--absolute`` adds inputs/s and latencies.

Usage: ``python -m bench.compare bench/results/a.json bench/results/b.json ... [--variant fp32] [--absolute]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _label(report: dict[str, Any], common: dict[str, str], path: Path) -> str:
    env = report["meta"].get("service_env") or {}
    diff = {k.removeprefix("BERTSERVE_"): v for k, v in env.items() if common.get(k) != v}
    return ",".join(f"{k}={v}" for k, v in sorted(diff.items())) or path.stem[-16:]


def metrics_of(report: dict[str, Any], variant: str, absolute: bool) -> dict[str, float]:
    """The comparable numbers of one report's variant block, by name."""
    block = report["variants"].get(variant) or {}
    ratios = block.get("ratios") or {}
    out: dict[str, float] = {}
    ceiling = block.get("ceiling") or {}
    if ceiling:
        out["ceiling best seq/s"] = ceiling["best"]["sequences_per_s"]
        if ceiling.get("batch1"):  # absent when the run's --batch-sizes left out 1
            out["ceiling batch-1 p50 ms"] = ceiling["batch1"]["batch_latency_ms"]["p50"]
    for name, spec in (block.get("servers") or {}).items():
        for r in spec.get("runs", []):
            key = f"{name} c={r['concurrency']} x{r['inputs_per_request']}"
            if r.get("throughput_vs_ceiling") is not None:
                out[f"{key} /ceiling"] = r["throughput_vs_ceiling"]
            if r.get("p99_vs_naive") is not None:
                out[f"{key} p99/naive"] = r["p99_vs_naive"]
            if absolute:
                out[f"{key} inputs/s"] = r["inputs_per_s"]
                for p in ("p50", "p99"):
                    if r.get("latency_ms"):
                        out[f"{key} {p} ms"] = r["latency_ms"][p]
    if ratios.get("bertserve_best_vs_naive_best") is not None:
        out["bertserve best / naive best"] = ratios["bertserve_best_vs_naive_best"]
    return out


def compare(paths: list[Path], variant: str, absolute: bool) -> str:
    reports = [json.loads(p.read_text()) for p in paths]
    envs = [r["meta"].get("service_env") or {} for r in reports]
    common = {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs[1:])}
    labels = [_label(r, common, p) for r, p in zip(reports, paths, strict=True)]
    rows = [metrics_of(r, variant, absolute) for r in reports]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    width = max(12, *(len(label) for label in labels))
    name_width = max((len(k) for k in keys), default=10) + 2
    lines = [f"{'':<{name_width}}" + "".join(f"{label:>{width + 2}}" for label in labels) + f"{'spread':>10s}"]
    for key in keys:
        values = [row.get(key) for row in rows]
        present = [v for v in values if v is not None]
        spread = ""
        if len(present) > 1 and statistics.fmean(present):
            spread = f"{(max(present) - min(present)) / statistics.fmean(present):>9.1%}"
        cells = "".join(f"{'-' if v is None else format(v, '.3f'):>{width + 2}}" for v in values)
        lines.append(f"{key:<{name_width}}{cells}{spread:>10s}")
    lines.append("spread = (max - min) / mean over the files")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench.run JSON files")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--absolute", action="store_true", help="also inputs/s and latencies")
    args = parser.parse_args(argv)
    print(compare(args.results, args.variant, args.absolute))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
