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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.workload import length_summary, make_texts, save_texts, token_lengths
from service.bundle import load_bundle

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET_CONCURRENCY = 64
LATENCY_SLACK_MS = 3.0
THROUGHPUT_TARGET = 0.90


# -- processes -----------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET on loopback; (status, body), with status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads) from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A server did not start or become ready; the message carries the end of its log."""


@dataclass
class Server:
    """A server subprocess in its own session (so the whole group can be killed), logging to a file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=_child_env(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> str:
        """Poll /readyz (falling back to /healthz when /readyz is 404) until 200; returns the path used."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        path = "/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, _ = http_get(self.base_url + path, timeout=1.0)
            if status == 200:
                return path
            if status == 404 and path == "/readyz":
                path = "/healthz"
                continue
            time.sleep(0.2)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.proc.pid) if self.proc else None

    def wait_idle(self, timeout: float = 120.0, busy_cores: float = 0.1, interval: float = 0.25) -> float:
        """Block until the server uses under ``busy_cores`` of CPU (abandoned requests of the previous point
        drained, e.g. a naive server still computing what timed-out clients left behind); returns seconds."""
        start = time.monotonic()
        previous = self.cpu_seconds()
        while previous is not None and time.monotonic() - start < timeout:
            time.sleep(interval)
            current = self.cpu_seconds()
            if current is None or current - previous < busy_cores * interval:
                break
            previous = current
        return time.monotonic() - start

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group, wait up to ``grace`` seconds, then SIGKILL it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(server: Server, ready_timeout: float) -> Iterator[Server]:
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


# -- measurements --------------------------------------------------------------------------------------
def run_ceiling(model_dir: Path, variant: str, texts_file: Path, cfg: Config, work: Path) -> dict[str, Any]:
    out = work / f"ceiling-{variant}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.ceiling",
        "--model-dir",
        str(model_dir),
        "--variant",
        variant,
        "--texts",
        str(texts_file),
        "--json",
        str(out),
        "--max-seconds",
        str(cfg.ceiling_max_seconds),
        "--batch-sizes",
        ",".join(map(str, cfg.batch_sizes)),
        "--provider",
        cfg.provider,
        "--seed",
        str(cfg.seed),
    ]
    if cfg.threads:
        argv += ["--threads", str(cfg.threads)]
    # BERTSERVE_* settings reach the ceiling too: it reads the thread settings the service would use.
    subprocess.run(argv, cwd=ROOT, env=_child_env(cfg.service_env), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_loadgen(
    url: str, concurrency: int, inputs_per_request: int, texts_file: Path, cfg: Config, work: Path
) -> dict[str, Any]:
    out = work / f"loadgen-{concurrency}-{inputs_per_request}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        url,
        "--concurrency",
        str(concurrency),
        "--inputs-per-request",
        str(inputs_per_request),
        "--duration",
        str(cfg.duration),
        "--warmup",
        str(cfg.warmup),
        "--texts",
        str(texts_file),
        "--timeout",
        str(cfg.request_timeout),
        "--json",
        str(out),
    ]
    limit = cfg.warmup + cfg.duration + cfg.request_timeout + 60
    subprocess.run(argv, cwd=ROOT, env=_child_env(), check=True, stdout=subprocess.DEVNULL, timeout=limit)
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
                _log(f"  {server.name:<9s} {_row_text(result)}")
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


# -- report --------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row_text(r: dict[str, Any]) -> str:
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
        "bertserve_best_vs_naive_best": (best_of["bertserve"] / best_of["naive"])
        if best_of.get("bertserve") and best_of.get("naive")
        else None,
        "targets": targets,
    }


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
        argv = [
            sys.executable,
            "-m",
            "bench.naive_server",
            "--model-dir",
            str(cfg.model_dir),
            "--port",
            str(port),
            "--variant",
            variant,
            "--provider",
            cfg.provider,
            "--endpoint",
            cfg.naive_endpoint,
        ]
        if cfg.threads:
            argv += ["--threads", str(cfg.threads)]
        return Server("naive", argv, port, log, dict(cfg.service_env))  # same thread settings
    env = {"BERTSERVE_PROVIDER": cfg.provider, "BERTSERVE_VARIANT": variant}
    if cfg.threads:
        env["BERTSERVE_INTRA_OP_THREADS"] = str(cfg.threads)
    env |= cfg.service_env
    argv = [
        sys.executable,
        "-m",
        "service",
        "--model-dir",
        str(cfg.model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return Server("bertserve", argv, port, log, env)


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
