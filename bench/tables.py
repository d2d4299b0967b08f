"""Markdown tables from the benchmark summaries, and the docs' numbers generated from them.

Each benchmark writes one small summary (``bench/results/demo.json`` from ``bench.run``, ``frontend.json`` from
``bench.frontend``, ``isolation.json`` from ``bench.isolation``) and prints the same tables this module renders.
The docs never carry a measured number typed by hand: every table of measurements in them sits between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` and is rewritten from the summaries by
``python -m bench.tables --write``; ``python -m bench.tables`` (what the tests run) exits 1 while a doc differs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.procs import ROOT

RESULTS = ROOT / "bench" / "results"
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "NOTES.md")
BLOCK = re.compile(r"(<!-- bench:([a-z-]+):start -->\n)(.*?)(<!-- bench:\2:end -->)", re.S)


def _num(value: float | None, digits: int = 1) -> str:
    """A number as the tables print it: thousands separated, ``-`` when missing."""
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]], columns: Sequence[str] = ()) -> str:
    """A markdown table of ``columns`` (default: all), without the columns that have no value in any row."""
    cells = [[str(cell) for cell in row] + ["-"] * (len(header) - len(row)) for row in rows]
    keep = [i for i, name in enumerate(header) if (not columns or name in columns) and any(r[i] != "-" for r in cells)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + " --- |" * len(keep)]
    return "\n".join(lines + ["| " + " | ".join(row[i] for i in keep) + " |" for row in cells])


def _source(summary: dict[str, Any], points: Iterable[dict[str, Any]] | None = None) -> str:
    """Where the numbers come from, and (unless ``points`` is None) how busy the machine was: its load average at
    the start and the cores other tenants took during the points (``other_cores``), signs of a noisy run."""
    commit = (summary.get("git_commit") or "")[:9] or "unknown commit"
    if points is None:
        return f"{summary['tool']}, {summary['created'][:10]}, commit {commit}"
    host = summary.get("host", {})
    load = host.get("loadavg", host.get("loadavg_before", [None]))[0]
    other = sorted(p["other_cores"] for p in points if p.get("other_cores") is not None)
    busy = f", other tenants {other[0]:.2f}-{other[-1]:.2f} cores" if other else ""
    note = f"; {summary['note']}" if summary.get("note") else ""
    return f"{summary['tool']}, {summary['created'][:10]}, commit {commit}, load average {load}{busy}{note}"


# -- the demo benchmark (bench.run) ---------------------------------------------------------------------------
DEMO_HEADER = ["", "clients", "inputs/request", "inputs/s", "/ ceiling", "p50 ms", "p99 ms", "mean batch"]
DEMO_HEADER += ["CPU ms/input", "p99 / naive", "/ baseline"]


def _layout(result: dict[str, Any]) -> str:
    w, t = result["workers"], result["threads"]
    return f"{w} session{'s' * (w > 1)} x {t} thread{'s' * (t > 1)}, batch {result['batch_size']} {result['order']}"


def _ceiling_rows(variant: str, ceiling: dict[str, Any]) -> list[list[object]]:
    best, batch1 = ceiling.get("best"), ceiling.get("batch1")
    rows: list[list[object]] = []
    if best:
        rows.append([f"{variant} ceiling ({_layout(best)})", "-", "-", _num(best["sequences_per_s"]), "1.00"])
    if best and batch1:
        ratio = _num(batch1["sequences_per_s"] / best["sequences_per_s"], 2)
        threads = f"{batch1['threads']} thread{'s' * (batch1['threads'] > 1)}"
        rows.append([f"{variant} ceiling, batch 1 ({threads})", 1, 1, _num(batch1["sequences_per_s"]), ratio])
        rows[-1].append(_num(batch1["p50_ms"]))
    return rows


def _point_row(label: str, p: dict[str, Any]) -> list[object]:
    cpu = (p["server_cpu_ms"] or {}).get("total")
    row = [label, p["concurrency"], p["inputs_per_request"], _num(p["inputs_per_s"]), _num(p["vs_ceiling"], 2)]
    row += [_num(p["latency_ms"]["p50"]), _num(p["latency_ms"]["p99"]), _num(p["mean_batch_size"])]
    return [*row, _num(cpu and cpu / p["inputs_per_request"], 2), _num(p["p99_vs_naive"], 2), _num(p["vs_baseline"], 3)]


def demo_table(summary: dict[str, Any]) -> str:
    """The ceiling and every server point of every variant, as fractions of that variant's ceiling (and of the
    baseline bertserve's, when one was measured)."""
    rows: list[list[object]] = []
    for variant, block in summary["variants"].items():
        rows += _ceiling_rows(variant, block["ceiling"] or {})
        rows += [_point_row(f"{variant} {p['server']}", p) for p in block["points"]]
    config, tokens = summary["config"], summary["workload"]["tokens"]
    caption = (
        f"Bundle `{config['model']}` ({config['provider']}), {summary['workload']['n']:,} BBC News texts (tokens "
        f"p50 {tokens['p50']:.0f}, mean {tokens['mean']:.1f}, p90 {tokens['p90']:.0f}, max {tokens['max']}), "
        f"{config['duration_s']:g} s per point after {config['warmup_s']:g} s of warm-up; "
        f"{_source(summary, (p for b in summary['variants'].values() for p in b['points']))}."
    )
    return caption + "\n\n" + markdown(DEMO_HEADER, rows)


def demo_brief(summary: dict[str, Any]) -> str:
    """The README's lines: the first variant's bertserve with one client, with 64, and with several texts per
    request, in the main columns."""
    variant, block = next(iter(summary["variants"].items()))
    picked = [p for p in block["points"] if p["server"] == "bertserve"]
    rows = [_point_row(p["server"], p) for p in picked if p["concurrency"] in (1, 64) or p["inputs_per_request"] > 1]
    best = _num(block["ceiling"]["best"]["sequences_per_s"])
    return f"{_source(summary)}; {variant} ceiling {best} inputs/s:\n\n" + markdown(DEMO_HEADER, rows, DEMO_HEADER[:7])


# -- the front-end benchmark (bench.frontend) -----------------------------------------------------------------
def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


FRONTEND_FIELDS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "rps": lambda p: p["rps"],
    "inputs_per_s": lambda p: p["inputs_per_s"],
    "p50": lambda p: p["latency_ms"]["p50"],
    "p99": lambda p: p["latency_ms"]["p99"],
    "cpu": lambda p: p["server_cpu_ms"]["total"],
    "api": lambda p: p["server_cpu_ms"]["api"],
    "loop": lambda p: p["server_cpu_ms"]["loop"],
    "errors": lambda p: p["errors"],
    "vs_reference": lambda p: p["vs_reference"],
    "vs_baseline": lambda p: p["vs_baseline"],
}


def frontend_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (server, workers, texts, concurrency): the medians over the rounds (of the ratios too, which
    pair points of one round)."""
    groups: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}
    for p in summary["points"]:
        groups.setdefault((p["server"], p["workers"], p["inputs_per_request"], p["concurrency"]), []).append(p)
    return [
        dict(zip(("server", "workers", "texts", "concurrency"), key, strict=True))
        | {name: _median(get(p) for p in group) for name, get in FRONTEND_FIELDS.items()}
        for key, group in groups.items()
    ]


def frontend_table(summary: dict[str, Any], concurrency: int | None = None, brief: bool = False) -> str:
    """Every point (or those at ``concurrency``): throughput, latency, server CPU per request and the ratios
    measured in the same run; ``brief``: bertserve's rows, the main columns and a short caption."""
    header = ["server", "API processes", "texts", "c", "req/s", "inputs/s", "p50 ms", "p99 ms", "CPU ms/req"]
    header += ["API ms/req", "loop ms/req", "errors", "/ reference", "/ baseline"]
    rows = []
    for r in frontend_rows(summary):
        if (concurrency or r["concurrency"]) == r["concurrency"] and not (brief and r["server"] == "reference"):
            row = [r["server"], r["workers"], r["texts"], r["concurrency"], _num(r["rps"], 0)]
            row += [_num(r["inputs_per_s"], 0), _num(r["p50"], 2), _num(r["p99"], 2), _num(r["cpu"], 3)]
            row += [_num(r["api"], 3), _num(r["loop"], 3), _num(r["errors"], 0), _num(r["vs_reference"], 3)]
            rows.append([*row, _num(r["vs_baseline"], 3)])
    if brief:
        columns = ["API processes", "texts", "req/s", "loop ms/req", "/ reference"]
        return f"{_source(summary)}:\n\n" + markdown(header, rows, [*columns, "/ baseline"])
    env = {name: "".join(f" {k}={v}" for k, v in s["env"].items()) for name, s in summary["servers"].items()}
    servers_text = "; ".join(f"{name} {s['label']}{env[name]}" for name, s in summary["servers"].items())
    config = summary["config"]
    caption = (
        f"wrk -t1, {config['duration_s']:g} s per point, {config['rounds']} round(s) (medians; ratios pair points "
        f"of one round), bundle `{config['model']}`; {servers_text}; {_source(summary, summary['points'])}."
    )
    return caption + "\n\n" + markdown(header, rows)


# -- the isolation benchmark (bench.isolation) ----------------------------------------------------------------
def isolation_table(summary: dict[str, Any]) -> str:
    header = ["bundle", "alpha's load", "beta p99 solo", "beta p99, alpha saturated", "p99 ratio", "p50 ratio"]
    rows = [
        [
            summary["model"],
            f"wrk c={r['concurrency']} ({_num(r['alpha_requests_per_s'], 0)} req/s)",
            f"{r['solo']['p99_ms']:.2f} ms",
            f"{r['saturated']['p99_ms']:.2f} ms",
            f"{r['p99_ratio']:.2f}x",
            f"{r['p50_ratio']:.2f}x",
        ]
        for r in summary["runs"]
    ]
    return f"From {_source(summary, [])}.\n\n" + markdown(header, rows)


def write_summary(summary: dict[str, Any], path: Path | None, kind: str) -> Path:
    """The summary as JSON at ``path``, or at ``bench/results/KIND-UTC.json`` (git-ignored)."""
    path = path or RESULTS / f"{kind}-{summary['created'].replace(':', '')[:17]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


# -- the docs -------------------------------------------------------------------------------------------------
RENDER: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "demo": ("demo.json", demo_table),
    "demo-readme": ("demo.json", demo_brief),
    "frontend": ("frontend.json", frontend_table),
    "frontend-readme": ("frontend.json", lambda summary: frontend_table(summary, 64, brief=True)),
    "isolation": ("isolation.json", isolation_table),
}


def render(name: str, results: Path = RESULTS) -> str:
    if name not in RENDER:
        raise KeyError(f"unknown bench block {name!r} (known: {sorted(RENDER)})")
    file, fn = RENDER[name]
    return fn(json.loads((results / file).read_text(encoding="utf-8")))


def regenerate(text: str, results: Path = RESULTS) -> str:
    """``text`` with every bench block rewritten from the summaries."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), results) + "\n" + m.group(4), text)


def stale(docs: Sequence[Path] = DOCS, results: Path = RESULTS) -> list[Path]:
    """The docs whose bench blocks differ from what the summaries say."""
    return [doc for doc in docs if (text := doc.read_text(encoding="utf-8")) != regenerate(text, results)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the docs' bench blocks from the summaries")
    args = parser.parse_args(argv)
    outdated = stale()
    if args.write:
        for doc in outdated:
            doc.write_text(regenerate(doc.read_text(encoding="utf-8")), encoding="utf-8")
            print(f"updated {doc.relative_to(ROOT)}")
        return 0
    for doc in outdated:
        print(f"{doc.relative_to(ROOT)}: bench tables differ from bench/results/; run `python -m bench.tables --write`")
    return 1 if outdated else 0


if __name__ == "__main__":
    raise SystemExit(main())
