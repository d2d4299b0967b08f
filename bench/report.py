"""The benchmark report: ratios against the ceiling and the naive server, the printed table, the plot.

Pure functions of the JSON report that ``bench.run`` writes (no processes, no measurements), so the same table
and plot can be redrawn from any saved ``bench/results/*.json`` and tested without a server.

Why ratios: on a small shared machine absolute numbers drift 5-20% from run to run, but the servers and the
ceiling measured minutes apart on the same texts drift together, so each server run is reported as a fraction
of the ceiling measured in the same run, and bertserve's p99 over the naive server's at the same concurrency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET_CONCURRENCY = 64
LATENCY_SLACK_MS = 3.0
THROUGHPUT_TARGET = 0.90


def row_text(r: dict[str, Any]) -> str:
    lat = r.get("latency_ms") or {}
    return (
        f"c={r['concurrency']:<4d} x{r['inputs_per_request']:<2d} {r['inputs_per_s']:8.1f} inputs/s "
        f"p50={lat.get('p50', float('nan')):8.1f}ms p99={lat.get('p99', float('nan')):8.1f}ms "
        f"errors={r['errors'] or 0}"
    )


def _single(runs: Sequence[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((r for r in runs if r["concurrency"] == concurrency and r["inputs_per_request"] == 1), None)


def _p(r: dict[str, Any] | None, key: str) -> float | None:
    return (r.get("latency_ms") or {}).get(key) if r else None


def compute_ratios(ceiling: dict[str, Any], servers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every server run as a fraction of the ceiling; bertserve p99 over naive p99; the three targets."""
    best = ceiling["best"]["sequences_per_s"]
    batch1_ms = ceiling["batch1"]["batch_latency_ms"]["p50"] if ceiling.get("batch1") else None
    naive = servers.get("naive", {}).get("runs", [])
    ours = servers.get("bertserve", {}).get("runs", [])
    for spec in servers.values():
        for r in spec.get("runs", []):
            r["throughput_vs_ceiling"] = r["inputs_per_s"] / best
    for r in ours:
        match = next(
            (
                n
                for n in naive
                if n["concurrency"] == r["concurrency"] and n["inputs_per_request"] == r["inputs_per_request"]
            ),
            None,
        )
        p_ours, p_naive = _p(r, "p99"), _p(match, "p99")
        r["p99_vs_naive"] = p_ours / p_naive if p_ours is not None and p_naive else None
    measured = sorted({r["concurrency"] for r in ours if r["inputs_per_request"] == 1})
    target_c = TARGET_CONCURRENCY if TARGET_CONCURRENCY in measured else (measured[-1] if measured else None)
    at_c = _single(ours, target_c) if target_c else None
    naive_c = _single(naive, target_c) if target_c else None
    c1 = _single(ours, 1)
    targets: list[dict[str, Any]] = []
    if at_c:
        ratio = at_c["inputs_per_s"] / best
        targets.append(
            {
                "name": f"bertserve inputs/s at c={target_c} / ceiling best",
                "value": ratio,
                "goal": f">= {THROUGHPUT_TARGET}",
                "met": ratio >= THROUGHPUT_TARGET,
            }
        )
    p99_ours, p99_naive = _p(at_c, "p99"), _p(naive_c, "p99")
    if p99_ours is not None and p99_naive:
        ratio = p99_ours / p99_naive
        targets.append(
            {
                "name": f"bertserve p99 / naive p99 at c={target_c}",
                "value": ratio,
                "goal": "< 1 (well under)",
                "met": ratio < 1.0,
            }
        )
    p50_c1 = _p(c1, "p50")
    if p50_c1 is not None and batch1_ms is not None:
        limit = batch1_ms + LATENCY_SLACK_MS
        targets.append(
            {
                "name": "bertserve p50 at c=1 (ms) vs ceiling batch-1 p50 + 3 ms",
                "value": p50_c1,
                "goal": f"<= {limit:.2f}",
                "met": p50_c1 <= limit,
            }
        )
    best_of = {
        name: max((r["inputs_per_s"] for r in spec.get("runs", [])), default=None) for name, spec in servers.items()
    }
    return {
        "ceiling_best_sequences_per_s": best,
        "ceiling_best_config": {
            k: ceiling["best"][k] for k in ("workers", "threads", "batch_size", "order", "tokenize")
        },
        "ceiling_batch1_p50_ms": batch1_ms,
        "target_concurrency": target_c,
        "best_inputs_per_s": best_of,
        "best_vs_ceiling": {k: (v / best if v else None) for k, v in best_of.items()},
        "bertserve_best_vs_naive_best": _ratio(best_of.get("bertserve"), best_of.get("naive")),
        "targets": targets,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or zero."""
    return a / b if a and b else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table: one block per variant, then cross-variant ratios."""
    meta = report["meta"]
    tokens = report["workload"]["tokens"]
    cpu = meta["cpu"]
    lines = [
        f"bertserve benchmark {meta['name']}  ({meta['started']})",
        f"bundle {meta['model']} {meta['version']} at {meta['model_dir']}; provider {meta['provider']}",
        f"CPU {cpu['cpu']} x{cpu['cores']} @ {_fmt(cpu['clock_mhz'], '.0f')} MHz "
        f"(fp32 peak {_fmt((cpu['peak_flops'] or 0) / 1e9, '.0f')} GFLOP/s); onnxruntime {meta['onnxruntime']}; "
        f"load average at start {meta['loadavg_start']}",
        f"workload: {report['workload']['n']} BBC News texts (seed {report['workload']['seed']}), tokens "
        f"min {tokens['min']} p50 {tokens['p50']:.0f} mean {tokens['mean']:.1f} p90 {tokens['p90']:.0f} "
        f"max {tokens['max']}; duration {meta['duration_s']} s after {meta['warmup_s']} s warm-up per point",
    ]
    for variant, block in report["variants"].items():
        ceiling = block.get("ceiling")
        lines.append("")
        if not ceiling:
            lines.append(f"== variant {variant}: ceiling failed: {block.get('error')}")
            continue
        b, b1, bp = ceiling["best"], ceiling["batch1"], ceiling["best_pretokenized"]
        layouts = ", ".join(ceiling["layouts"])
        lines.append(f"== variant {variant} ({ceiling['model_file']}, sessions x threads {layouts})")
        lines.append(
            f"ceiling best {b['sequences_per_s']:.1f} seq/s ({b['workers']}x{b['threads']}, batch {b['batch_size']}, "
            f"{b['order']}, tokenizer "
            f"included; {_fmt(_pct(b['fraction_of_peak']))}% of fp32 peak useful, "
            f"{_fmt(_pct(b['executed_fraction_of_peak']))}% executed)"
            + (
                f"; batch-1 {b1['sequences_per_s']:.1f} seq/s, p50 {b1['batch_latency_ms']['p50']:.2f} ms "
                f"({b1['workers']}x{b1['threads']})"
                if b1
                else "; no batch-1 run"
            )
            + (f"; pre-tokenized best {bp['sequences_per_s']:.1f} seq/s" if bp else "")
        )
        header = (
            f"{'server':<10s}{'c':>5s}{'x':>4s}{'req/s':>9s}{'inputs/s':>10s}{'/ceil':>7s}{'p50 ms':>9s}"
            f"{'p95 ms':>9s}{'p99 ms':>9s}{'max ms':>9s}{'p99/naive':>10s}{'errors':>8s}{'srv us/in':>11s}"
            f"{'cli cores':>10s}{'batch':>7s}"
        )
        lines.append(header)
        for name, spec in block["servers"].items():
            if spec.get("error"):
                lines.append(f"{name:<10s} FAILED: {spec['error'].splitlines()[0]}")
            for r in spec.get("runs", []):
                lat = r.get("latency_ms") or {}
                batches = r.get("server_batches") or {}
                lines.append(
                    f"{name:<10s}{r['concurrency']:>5d}{r['inputs_per_request']:>4d}{r['requests_per_s']:>9.1f}"
                    f"{r['inputs_per_s']:>10.1f}{_fmt(r.get('throughput_vs_ceiling'), '.2f'):>7s}"
                    f"{_fmt(lat.get('p50')):>9s}{_fmt(lat.get('p95')):>9s}{_fmt(lat.get('p99')):>9s}"
                    f"{_fmt(lat.get('max')):>9s}{_fmt(r.get('p99_vs_naive'), '.2f'):>10s}{r['error_count']:>8d}"
                    f"{_fmt(r.get('server_cpu_us_per_input'), '.0f'):>11s}{r['client_cpu_cores']:>10.2f}"
                    f"{_fmt(batches.get('mean_batch_size'), '.1f'):>7s}"
                )
        ratios = block.get("ratios") or {}
        for t in ratios.get("targets", []):
            lines.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['name']} = {t['value']:.3f} (goal {t['goal']})")
        if ratios.get("bertserve_best_vs_naive_best"):
            lines.append(f"  bertserve best / naive best = {ratios['bertserve_best_vs_naive_best']:.3f}")
    cross = report.get("cross_variant")
    if cross:
        lines.append("")
        lines.append(f"variants vs {cross['reference']}:")
        for variant, row in cross["variants"].items():
            lines.append(
                f"  {variant:<6s} ceiling x{_fmt(row['ceiling_ratio'], '.2f')}  bertserve best "
                f"x{_fmt(row['bertserve_ratio'], '.2f')}  test metrics {row['metrics']}"
            )
    return "\n".join(lines)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def cross_variant(report: dict[str, Any], manifest_metrics: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    variants = report["variants"]
    if len(variants) < 2:
        return None
    reference = "fp32" if "fp32" in variants else next(iter(variants))

    def ceiling_best(v: str) -> float | None:
        c = variants[v].get("ceiling")
        return c["best"]["sequences_per_s"] if c else None

    def served_best(v: str) -> float | None:
        return ((variants[v].get("ratios") or {}).get("best_inputs_per_s") or {}).get("bertserve")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "reference": reference,
        "variants": {
            v: {
                "ceiling_ratio": ratio(ceiling_best(v), ceiling_best(reference)),
                "bertserve_ratio": ratio(served_best(v), served_best(reference)),
                "metrics": manifest_metrics.get(v, {}),
            }
            for v in variants
        },
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput vs concurrency (with the ceiling) and latency percentiles vs concurrency, per variant."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [(v, b) for v, b in report["variants"].items() if b.get("ceiling")]
    if not variants:
        return
    fig, axes = plt.subplots(len(variants), 2, figsize=(13, 4.8 * len(variants)), squeeze=False)
    colors = {"naive": "tab:orange", "bertserve": "tab:blue"}
    for row, (variant, block) in enumerate(variants):
        ax_t, ax_l = axes[row]
        ceiling = block["ceiling"]
        ax_t.axhline(
            ceiling["best"]["sequences_per_s"],
            color="black",
            ls="--",
            label=f"ceiling best ({ceiling['best']['workers']}x{ceiling['best']['threads']}, "
            f"batch {ceiling['best']['batch_size']}, {ceiling['best']['order']})",
        )
        b1 = ceiling["batch1"]
        if b1 is not None:  # None when --batch-sizes leaves out 1
            ax_t.axhline(
                b1["sequences_per_s"], color="gray", ls=":", label=f"ceiling batch 1 ({b1['workers']}x{b1['threads']})"
            )
        for name, spec in block["servers"].items():
            singles = sorted(
                (r for r in spec.get("runs", []) if r["inputs_per_request"] == 1), key=lambda r: r["concurrency"]
            )
            multi = [r for r in spec.get("runs", []) if r["inputs_per_request"] > 1]
            color = colors.get(name)
            if singles:
                xs = [r["concurrency"] for r in singles]
                ax_t.plot(xs, [r["inputs_per_s"] for r in singles], "o-", color=color, label=name)
                for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
                    ys = [(r.get("latency_ms") or {}).get(key) for r in singles]
                    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
                    if pts:
                        ax_l.plot(*zip(*pts, strict=True), style, color=color, label=f"{name} {key}")
            for r in multi:
                ax_t.plot(
                    [r["concurrency"]],
                    [r["inputs_per_s"]],
                    "*",
                    ms=14,
                    color=color,
                    label=f"{name}, {r['inputs_per_request']} inputs/request",
                )
        concurrencies = sorted({r["concurrency"] for s in block["servers"].values() for r in s.get("runs", [])})
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            if concurrencies:
                ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_ylabel("inputs / s")
        ax_t.set_ylim(bottom=0)
        ax_t.set_title(f"{variant}: throughput")
        ax_t.legend(fontsize=8, loc="best")
        ax_l.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
        ax_l.yaxis.set_major_formatter(plain)
        ax_l.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        ax_l.yaxis.set_minor_formatter(plain)
        ax_l.set_ylabel("latency (ms)")
        ax_l.set_title(f"{variant}: latency percentiles")
        ax_l.legend(fontsize=7, ncol=2)
    meta = report["meta"]
    fig.suptitle(
        f"{meta['model']} {meta['version']} on {meta['cpu']['cpu']} x{meta['cpu']['cores']} "
        f"({meta['provider']}), {meta['started']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
