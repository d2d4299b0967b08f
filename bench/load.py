"""Load from wrk and what a server spends on it: one measured point, written once for every benchmark.

wrk (C, one thread: at most one core and little CPU per request, on the two cores this project is measured on)
runs ``bench/wrk/post_json.lua``, which sends prebuilt JSON bodies and prints its result as one JSON line. Around
each run the server's CPU is read with psutil for its whole process tree (``total``), for the processes holding the
listening socket (``api``) and for their main threads, which run the event loop (``loop``), and divided by every
completed response. A process that starts during a run counts from zero and one that ends is lost: measure warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from bench.procs import ROOT, Server, cpu_seconds, tree

WRK_SCRIPT = ROOT / "bench" / "wrk" / "post_json.lua"
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")


def write_bodies(path: Path, bodies: Iterable[object]) -> Path:
    """Request bodies as one JSON document per line: the file ``post_json.lua`` reads."""
    lines = [json.dumps(body, ensure_ascii=False, separators=(",", ":")) for body in bodies]
    if not lines:
        raise ValueError("no request bodies")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def parse_wrk(stdout: str) -> dict[str, Any]:
    """The ``WRK_JSON`` line the script prints when wrk ends."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            return result
    raise RuntimeError(f"no WRK_JSON line in wrk's output:\n{stdout[-2000:]}")


def start_wrk(url: str, bodies: Path, concurrency: int, duration: float, timeout: float) -> subprocess.Popen[str]:
    """Start one wrk run (one thread, ``concurrency`` keep-alive connections, whole seconds)."""
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", f"--timeout={max(1, round(timeout))}s"]
    argv += ["--latency", "-s", str(WRK_SCRIPT), url, "--", str(bodies)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_wrk(proc: subprocess.Popen[str], limit: float) -> dict[str, Any]:
    """Wait for a wrk run (killed after ``limit`` seconds); its result plus its own CPU seconds."""
    watchdog = threading.Timer(limit, proc.kill)
    watchdog.start()
    try:
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)  # reaps wrk and returns its own rusage
    finally:
        watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {stdout[-2000:]}")
    result = parse_wrk(stdout)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def run_wrk(url: str, bodies: Path, concurrency: int, duration: float, timeout: float) -> dict[str, Any]:
    return finish_wrk(start_wrk(url, bodies, concurrency, duration, timeout), duration + timeout + 30)


def cpu_snapshot(pid: int, port: int) -> dict[int, tuple[bool, float, float]]:
    """Per process of the server's tree: (holds the listener, CPU seconds, CPU seconds of its main thread)."""
    out = {}
    for proc in tree(pid):
        with contextlib.suppress(psutil.Error):
            listener = any(c.status == "LISTEN" and c.laddr.port == port for c in proc.net_connections("tcp"))
            loop = sum(t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid) if listener else 0
            out[proc.pid] = (listener, cpu_seconds(proc), loop)
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Server CPU ms per completed request: whole tree, API processes, their event-loop threads."""
    total = api = loop = 0.0
    for pid, (listener, proc_s, loop_s) in after.items():
        _, proc_0, loop_0 = before.get(pid, (listener, 0.0, 0.0))
        total += proc_s - proc_0
        if listener:
            api += proc_s - proc_0
            loop += loop_s - loop_0
    per = 1000.0 / max(requests, 1)
    return {"total": round(total * per, 4), "api": round(api * per, 4), "loop": round(loop * per, 4)}


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy so far (to see what else ran during a point)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def measure(
    server: Server, path: str, bodies: Path, inputs: int, concurrency: int, duration: float, timeout: float
) -> dict[str, Any]:
    """One point: wait until the server is idle, then wrk for ``duration`` s with the server's CPU read around it.

    ``inputs`` is the number of texts in every body. Returns the point as a small JSON-able dict.
    """
    server.wait_idle()
    before, busy_0 = cpu_snapshot(server.pid, server.port), busy_seconds()
    wrk = run_wrk(server.base_url + path, bodies, concurrency, duration, timeout)
    after, busy_1 = cpu_snapshot(server.pid, server.port), busy_seconds()
    seconds = max(wrk["duration_us"], 1) / 1e6
    requests = int(wrk["requests"])
    errors = {kind: int(wrk["errors"][kind]) for kind in ERROR_KINDS}
    ok = max(requests - errors["status"], 0)  # wrk counts a response with status > 399 in both
    cpu = cpu_per_request(before, after, requests)
    server_cores = cpu["total"] * requests / 1000 / seconds
    lat = wrk["latency_us"]
    return {
        "concurrency": concurrency,
        "inputs_per_request": inputs,
        "seconds": round(seconds, 2),
        "requests": requests,
        "rps": round(ok / seconds, 1),
        "inputs_per_s": round(ok * inputs / seconds, 1),
        "latency_ms": {k: round(lat[k] / 1000, 2) for k in ("p50", "p90", "p99", "max")},
        "errors": sum(errors.values()),
        "error_kinds": {k: v for k, v in errors.items() if v},
        "server_cpu_ms": cpu,
        "wrk_cpu_ms": round(wrk["cpu_seconds"] * 1000 / max(requests, 1), 4),
        # cores busy with neither the server nor wrk: other tenants of a shared machine
        "other_cores": round(max((busy_1 - busy_0) / seconds - server_cores - wrk["cpu_seconds"] / seconds, 0), 2),
    }
