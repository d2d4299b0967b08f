"""The front-end benchmark: bertserve's HTTP request path against a raw ASGI reference app, in one run.

Why: on a GPU (or with the near-null tiny model) the model costs almost nothing and the per-request Python work
is the whole cost. This tool measures that work and nothing else: the same ``POST /v1/predict`` bodies, sent by
wrk (C, one thread, so the load generator takes one core and little CPU per request), to

1. ``bench.asgi_reference``: uvicorn + uvloop + httptools, orjson parse, fixed prediction (the floor a Python
   front end can reach), with ``--reference-workers`` worker processes;
2. bertserve (``python -m service``) serving the tiny bundle (built by ``training.tiny`` unless ``--model-dir``),
   with each ``--api-workers`` value (the flag is passed only when the server's ``--help`` lists it, so the same
   tool measures the server before and after issue 12; ``--grpc-port 0`` likewise, so no fixed port is needed).

For each server, texts per request (``--texts``, default 1 and 8) and concurrency (``--concurrency``, default
1, 64, 256): req/s and inputs/s (responses with status < 400 only), p50/p90/p99 latency, errors by kind
(connect, read, write, timeout, and HTTP status > 399, which wrk counts as "status"), wrk's own CPU, and the
server's CPU per completed request read from ``/proc`` before and after the run: per process (the server and
all its descendants: API workers, engine) and per thread group (thread name from
``/proc/PID/task/TID/comm``). The main thread of every process that holds the listening socket is reported as
the event loop; other threads by name (an unnamed Python thread shows its process's name, marked "unnamed").

CPU is divided by every completed response (a 429 costs CPU too). bertserve gets BERTSERVE_MAX_QUEUE large
enough for every in-flight text (``--max-queue``), so c=256 with 8 texts measures the path, not 429s.

Ratios are bertserve / reference (the reference's first ``--reference-workers`` value, 1 by default) per (texts
per request, concurrency, API workers); API-worker scaling is bertserve(w) / bertserve(first w).

Every process is started on a free 127.0.0.1 port in its own session, and stopped (process group, SIGTERM then
SIGKILL) at the end, also on Ctrl-C, SIGTERM or an error. Every wrk run is bounded by ``--duration``.

Usage: ``python -m bench.frontend [--model-dir DIR] [--duration 10] [--concurrency 1,64,256] [--texts 1,8]
[--api-workers 1,2] [--reference-workers 1] [--server-root DIR] [--json PATH] [--plot PATH]``.
Exit status 0; 1 when any request failed (the zero-error check); 2 when a server would not start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import ROOT, Server, ServerError, free_port, running

WRK_SCRIPT = ROOT / "bench" / "wrk" / "post_json.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")

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


# -- CPU accounting from /proc -------------------------------------------------------------------------
@dataclass
class ProcCPU:
    """One process's CPU ticks (all threads, including exited ones) and each live thread's (name, ticks)."""

    pid: int
    cmd: str
    listener: bool
    ticks: int
    threads: dict[int, tuple[str, int]] = field(default_factory=dict)


def _stat_ticks(path: Path) -> int | None:
    """utime + stime (clock ticks) from a /proc stat file; None when the process or thread is gone."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _parents() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (API workers, engine process, helpers), root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def listener_inodes(port: int) -> set[str]:
    """Socket inodes of TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    return inodes


def holds_socket(pid: int, inodes: set[str]) -> bool:
    """Whether ``pid`` has one of these sockets open: an API process holds the listening socket."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _cmd(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv if a)[:160]


def snapshot(root: int, port: int) -> dict[int, ProcCPU]:
    """CPU ticks of the server's process tree and of every thread in it, right now."""
    inodes = listener_inodes(port)
    out: dict[int, ProcCPU] = {}
    for pid in process_tree(root):
        ticks = _stat_ticks(Path(f"/proc/{pid}/stat"))
        if ticks is None:
            continue
        proc = ProcCPU(pid, _cmd(pid), holds_socket(pid, inodes), ticks)
        with contextlib.suppress(OSError):
            for tid_text in os.listdir(f"/proc/{pid}/task"):
                task = Path(f"/proc/{pid}/task/{tid_text}")
                t_ticks = _stat_ticks(task / "stat")
                with contextlib.suppress(OSError):
                    if t_ticks is not None:
                        proc.threads[int(tid_text)] = ((task / "comm").read_text().strip(), t_ticks)
        out[pid] = proc
    return out


def thread_group(name: str, tid: int, proc: ProcCPU) -> str:
    """The group a thread is reported in: 'event-loop' (main thread of a listening process), 'main' (main
    thread of another process), else its name without trailing numbers ('onnxruntime-3' -> 'onnxruntime');
    a thread that never set a name carries its process's name and is reported as '<name> (unnamed)'."""
    if tid == proc.pid:
        return "event-loop" if proc.listener else "main"
    main_name = proc.threads.get(proc.pid, ("", 0))[0]
    if name == main_name:
        return f"{name} (unnamed)"
    return re.sub(r"[-_:./ ]*\d+$", "", name).rstrip("-_:./ ") or name


def _ms(ticks: int, requests: int) -> float:
    return round(ticks / CLK_TCK * 1000.0 / max(requests, 1), 4)


def cpu_per_request(before: dict[int, ProcCPU], after: dict[int, ProcCPU], requests: int, root: int) -> dict[str, Any]:
    """Server CPU ms per completed request: total, event loop, per thread group and per process.

    A process or thread that appeared during the run counts from zero; one that ended during the run is lost
    from its thread group but not from its process (a process's stat includes its exited threads).
    """
    processes: list[dict[str, Any]] = []
    groups: dict[str, int] = {}
    total = api_total = 0
    for pid, proc in after.items():
        base = before.get(pid)
        d_proc = proc.ticks - (base.ticks if base else 0)
        total += d_proc
        api_total += d_proc if proc.listener else 0
        threads: list[dict[str, Any]] = []
        p_groups: dict[str, int] = {}
        for tid, (name, ticks) in proc.threads.items():
            prev = base.threads.get(tid, (name, 0))[1] if base else 0
            delta = ticks - prev
            if delta <= 0:
                continue
            group = thread_group(name, tid, proc)
            p_groups[group] = p_groups.get(group, 0) + delta
            threads.append({"tid": tid, "name": name, "group": group, "cpu_ms_per_request": _ms(delta, requests)})
        for group, ticks in p_groups.items():
            groups[group] = groups.get(group, 0) + ticks
        threads.sort(key=lambda t: -t["cpu_ms_per_request"])
        processes.append(
            {
                "pid": pid,
                "role": "api" if proc.listener else ("root" if pid == root else "child"),
                "cmd": proc.cmd,
                "listener": proc.listener,
                "cpu_ms_per_request": _ms(d_proc, requests),
                "cpu_seconds": round(d_proc / CLK_TCK, 3),
                "thread_groups_ms_per_request": {g: _ms(t, requests) for g, t in sorted(p_groups.items())},
                "threads": threads[:12],
            }
        )
    return {
        "total_ms_per_request": _ms(total, requests),
        "event_loop_ms_per_request": _ms(groups.get("event-loop", 0), requests),
        "api_processes_ms_per_request": _ms(api_total, requests),
        "other_processes_ms_per_request": _ms(total - api_total, requests),
        "api_processes": sum(1 for p in after.values() if p.listener),
        "thread_groups_ms_per_request": {g: _ms(t, requests) for g, t in sorted(groups.items(), key=lambda x: -x[1])},
        "processes": processes,
    }


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine from /proc/stat, to see what else ran during a point."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


# -- wrk -----------------------------------------------------------------------------------------------
def wrk_available() -> str | None:
    return shutil.which("wrk")


def parse_wrk(stdout: str) -> dict[str, Any]:
    """wrk's result: the script's ``WRK_JSON`` line when present, else scraped from wrk's text output."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            data: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
            data["source"] = "lua"
            return data
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", stdout)
    if requests is None:
        raise RuntimeError(f"cannot parse wrk output:\n{stdout}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}.get(requests.group(3), 1.0)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
    if sock:
        errors.update(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    errors["status"] = int(non2xx.group(1)) if non2xx else 0
    return {
        "requests": int(requests.group(1)),
        "duration_us": int(float(requests.group(2)) * unit * 1e6),
        "errors": errors,
        "latency_us": {},
        "source": "text",
    }


def run_wrk(url: str, body_file: Path, concurrency: int, duration: float, timeout_s: float) -> dict[str, Any]:
    """One bounded wrk run (one thread); its parsed result plus wrk's own CPU seconds."""
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(body_file),
    ]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout_s + 30, check=False)
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    result = parse_wrk(done.stdout)
    result["cpu_seconds"] = round(
        usage_after.ru_utime + usage_after.ru_stime - usage_before.ru_utime - usage_before.ru_stime, 3
    )
    text_rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    result["text_rps"] = float(text_rps.group(1)) if text_rps else None
    return result


# -- servers -------------------------------------------------------------------------------------------
@dataclass
class RootedServer(Server):
    """procs.Server run from ``cwd`` with ``cwd`` first on PYTHONPATH (bertserve from another source tree)."""

    cwd: Path = ROOT

    def start(self) -> None:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(self.cwd), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env | self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def server_flags(server_root: Path) -> set[str]:
    """The long options bertserve's ``--help`` lists (so new flags are passed only to servers that have them)."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=server_root,
        env=os.environ | {"PYTHONPATH": str(server_root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", done.stdout))


@dataclass
class Target:
    """One server configuration to measure: ``kind`` is 'reference' or 'bertserve'."""

    kind: str
    workers: int
    argv_extra: list[str]


def targets(cfg: Config, flags: set[str]) -> tuple[list[Target], list[str]]:
    """The server configurations to run, and notes on what was skipped and why."""
    out = [Target("reference", w, ["--workers", str(w)]) for w in cfg.reference_workers]
    notes: list[str] = []
    extra = ["--grpc-port", "0"] if "--grpc-port" in flags else []
    for w in cfg.api_workers:
        if "--api-workers" in flags:
            out.append(Target("bertserve", w, [*extra, "--api-workers", str(w)]))
        elif w == 1:
            out.append(Target("bertserve", 1, extra))
        else:
            notes.append(f"bertserve api_workers={w} skipped: the server's --help has no --api-workers")
    return out, notes


def bertserve_env(cfg: Config) -> dict[str, str]:
    """Settings the tool gives bertserve: a queue that holds every sequence the closed loop can have in flight
    (``--max-queue``, default 2 x max concurrency x max texts, at least 1024), so that each point measures
    the request path and not admission control (256 clients x 8 texts overflow the default 1024 with 429s).
    A BERTSERVE_MAX_QUEUE already in the environment wins."""
    if "BERTSERVE_MAX_QUEUE" in os.environ:
        return {}
    queue = cfg.max_queue or max(1024, 2 * max(cfg.concurrency) * max(cfg.texts))
    return {"BERTSERVE_MAX_QUEUE": str(queue)}


def make_server(target: Target, cfg: Config, model_dir: Path, work: Path) -> RootedServer:
    port = free_port()
    log = work / f"{target.kind}-w{target.workers}.log"
    if target.kind == "reference":
        argv = [sys.executable, "-m", "bench.asgi_reference", "--port", str(port), *target.argv_extra]
        return RootedServer(f"reference w={target.workers}", argv, port, log, cwd=ROOT)
    argv = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host", "127.0.0.1"]
    argv += ["--port", str(port), *target.argv_extra]
    return RootedServer(f"bertserve w={target.workers}", argv, port, log, env=bertserve_env(cfg), cwd=cfg.server_root)


def build_tiny(work: Path) -> Path:
    """The tiny 2-layer bundle (``python -m training.tiny``), built in a subprocess so torch stays out of here."""
    out = work / "tiny"
    done = subprocess.run(
        [sys.executable, "-m", "training.tiny", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0 or not (out / "manifest.json").exists():
        raise ServerError(f"building the tiny bundle failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class Config:
    model_dir: Path | None = None
    server_root: Path = ROOT
    server_label: str = ""
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: list[int] = field(default_factory=lambda: [1, 64, 256])
    texts: list[int] = field(default_factory=lambda: [1, 8])
    api_workers: list[int] = field(default_factory=lambda: [1, 2])
    reference_workers: list[int] = field(default_factory=lambda: [1])
    wrk_timeout: float = 5.0
    max_queue: int = 0
    ready_timeout: float = 180.0
    work_dir: Path | None = None
    json_path: Path | None = None
    plot_path: Path | None = None


def write_bodies(work: Path, texts_per_request: Sequence[int]) -> dict[int, Path]:
    """One JSON body file per texts-per-request value: a string for 1, a list of n texts otherwise."""
    out: dict[int, Path] = {}
    for n in texts_per_request:
        inputs: str | list[str] = TEXTS[0] if n == 1 else [TEXTS[i % len(TEXTS)] for i in range(n)]
        path = work / f"body-{n}.json"
        path.write_text(json.dumps({"inputs": inputs}))
        out[n] = path
    return out


def measure(server: RootedServer, body: Path, texts: int, concurrency: int, cfg: Config) -> dict[str, Any]:
    """One load point: wrk against /v1/predict with the server's CPU read before and after."""
    if server.pid is None:
        raise ServerError(f"{server.name} is not running")
    wait_idle(server.pid, server.port)
    before = snapshot(server.pid, server.port)
    host_before = host_cpu_ticks()
    wrk = run_wrk(server.base_url + "/v1/predict", body, concurrency, cfg.duration, cfg.wrk_timeout)
    host_after = host_cpu_ticks()
    after = snapshot(server.pid, server.port)
    requests = int(wrk["requests"])
    seconds = max(wrk["duration_us"], 1) / 1e6
    errors = {k: int(wrk["errors"].get(k, 0)) for k in ERROR_KINDS}
    ok = max(requests - errors["status"], 0)  # wrk counts a response with status > 399 in both
    lat = wrk.get("latency_us", {})
    server_cpu = cpu_per_request(before, after, requests, server.pid)
    busy_cores = (host_after[0] - host_before[0]) / CLK_TCK / seconds
    server_cores = server_cpu["total_ms_per_request"] * requests / 1000 / seconds
    wrk_cores = wrk["cpu_seconds"] / seconds
    return {
        "texts_per_request": texts,
        "concurrency": concurrency,
        "duration_s": round(seconds, 3),
        "requests": requests,
        "ok_requests": ok,
        "rps": round(ok / seconds, 1),
        "responses_per_s": round(requests / seconds, 1),
        "inputs_per_s": round(ok * texts / seconds, 1),
        "errors": errors | {"total": sum(errors.values())},
        "latency_ms": {k: round(lat[k] / 1000, 3) for k in ("p50", "p90", "p99", "p999", "mean", "max") if k in lat},
        "wrk": {
            "source": wrk["source"],
            "text_rps": wrk["text_rps"],
            "cpu_seconds": wrk["cpu_seconds"],
            "cpu_ms_per_request": round(wrk["cpu_seconds"] * 1000 / max(requests, 1), 4),
        },
        "server_cpu": server_cpu,
        "host_cpu": {
            # other = what neither the server nor wrk used: other tenants of a shared machine, this tool
            "busy_cores": round(busy_cores, 2),
            "server_cores": round(server_cores, 2),
            "wrk_cores": round(wrk_cores, 2),
            "other_cores": round(max(busy_cores - server_cores - wrk_cores, 0.0), 2),
        },
    }


def tree_ticks(root: int, port: int) -> int:
    return sum(p.ticks for p in snapshot(root, port).values())


def wait_idle(root: int, port: int, timeout: float = 30.0, busy_cores: float = 0.1, interval: float = 0.25) -> None:
    """Wait until the whole server tree uses under ``busy_cores`` (the previous point's leftovers drained), so
    one point's work is not billed to the next."""
    deadline = time.monotonic() + timeout
    previous = tree_ticks(root, port)
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = tree_ticks(root, port)
        if (current - previous) / CLK_TCK < busy_cores * interval:
            return
        previous = current


def compute_ratios(runs: Sequence[dict[str, Any]], reference_workers: int | None) -> dict[str, list[dict[str, Any]]]:
    """bertserve / reference per (texts, concurrency, api workers), and bertserve(w) / bertserve(first w)."""

    def rps(kind: str, workers: int, texts: int, c: int) -> float | None:
        for r in runs:
            if (r["server"], r["workers"], r["texts_per_request"], r["concurrency"]) == (kind, workers, texts, c):
                return float(r["rps"])
        return None

    vs_reference: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    bert = [r for r in runs if r["server"] == "bertserve"]
    first_w = bert[0]["workers"] if bert else None
    for r in bert:
        key = (r["texts_per_request"], r["concurrency"])
        ref = rps("reference", reference_workers, *key) if reference_workers is not None else None
        vs_reference.append(
            {
                "texts_per_request": key[0],
                "concurrency": key[1],
                "api_workers": r["workers"],
                "reference_workers": reference_workers,
                "bertserve_rps": r["rps"],
                "reference_rps": ref,
                "ratio": round(r["rps"] / ref, 4) if ref else None,
                "bertserve_inputs_per_s": r["inputs_per_s"],
            }
        )
        base = rps("bertserve", first_w, *key) if first_w is not None else None
        if r["workers"] != first_w and base:
            scaling.append(
                {
                    "texts_per_request": key[0],
                    "concurrency": key[1],
                    "api_workers": r["workers"],
                    "base_api_workers": first_w,
                    "ratio": round(r["rps"] / base, 4),
                }
            )
    return {"vs_reference": vs_reference, "api_workers_scaling": scaling}


def _log(message: str) -> None:
    print(f"[frontend {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _git_commit(root: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def run(cfg: Config) -> dict[str, Any]:
    """Every target, every body, every concurrency; returns the report (servers always stopped)."""
    if not wrk_available():
        raise ServerError("wrk is not installed (Debian: apt-get install wrk)")
    work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="bertserve-frontend-"))
    work.mkdir(parents=True, exist_ok=True)
    _log(f"work dir (logs, bodies, bundle): {work}")
    model_dir = cfg.model_dir
    if model_dir is None:
        _log("building the tiny bundle (python -m training.tiny)")
        model_dir = build_tiny(work)
    bodies = write_bodies(work, cfg.texts)
    flags = server_flags(cfg.server_root)
    plan, notes = targets(cfg, flags)
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    started_at = datetime.now(UTC)
    for target in plan:
        server = make_server(target, cfg, model_dir, work)
        _log(f"starting {server.name}: {' '.join(server.argv[1:])}")
        with running(server, cfg.ready_timeout, grace=10.0):
            if cfg.warmup > 0:
                run_wrk(server.base_url + "/v1/predict", bodies[cfg.texts[0]], 64, cfg.warmup, cfg.wrk_timeout)
            for texts in cfg.texts:
                for c in cfg.concurrency:
                    point = measure(server, bodies[texts], texts, c, cfg)
                    row = {"server": target.kind, "workers": target.workers, **point}
                    runs.append(row)
                    _log(_row_text(row))
    ref_w = cfg.reference_workers[0] if cfg.reference_workers else None
    errors_total = sum(r["errors"]["total"] for r in runs)
    return {
        "tool": "bench.frontend",
        "created": started_at.isoformat(timespec="seconds"),
        "git_commit": _git_commit(ROOT),
        "server_root": str(cfg.server_root),
        "server_commit": _git_commit(cfg.server_root),
        "server_label": cfg.server_label,
        "server_flags_used": sorted(f for f in ("--api-workers", "--grpc-port") if f in flags),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "model_dir": str(model_dir),
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "concurrency": cfg.concurrency,
            "texts_per_request": cfg.texts,
            "api_workers": cfg.api_workers,
            "reference_workers": cfg.reference_workers,
            "wrk_threads": 1,
            "wrk_timeout_s": cfg.wrk_timeout,
            "bertserve_env": bertserve_env(cfg),
            "bertserve_env_inherited": {k: v for k, v in os.environ.items() if k.startswith("BERTSERVE_")},
            "work_dir": str(work),
        },
        "notes": notes,
        "runs": runs,
        "ratios": compute_ratios(runs, ref_w),
        "errors_total": errors_total,
        "zero_errors": errors_total == 0,
    }


# -- output --------------------------------------------------------------------------------------------
def _row_text(r: dict[str, Any]) -> str:
    cpu = r["server_cpu"]
    return (
        f"{r['server']:<9} w={r['workers']} n={r['texts_per_request']:<2} c={r['concurrency']:<4}"
        f" {r['rps']:>9.1f} req/s  p50 {r['latency_ms'].get('p50', float('nan')):.2f} ms"
        f"  p99 {r['latency_ms'].get('p99', float('nan')):.2f} ms  err {r['errors']['total']}"
        f"  cpu/req {cpu['total_ms_per_request']:.3f} ms (loop {cpu['event_loop_ms_per_request']:.3f})"
    )


def format_report(report: dict[str, Any]) -> str:
    head = (
        f"{'server':<9} {'w':>2} {'n':>2} {'c':>4} {'req/s':>9} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'errors':>6} {'cpu/req':>8} {'api/req':>8} {'loop/req':>8} {'wrk/req':>8} {'other':>5} {'ratio':>6}"
    )
    ratio_of = {
        (x["texts_per_request"], x["concurrency"], x["api_workers"]): x["ratio"]
        for x in report["ratios"]["vs_reference"]
    }
    lines = [head, "-" * len(head)]
    for r in report["runs"]:
        ratio = (
            ratio_of.get((r["texts_per_request"], r["concurrency"], r["workers"]))
            if r["server"] == "bertserve"
            else None
        )
        lat = r["latency_ms"]
        lines.append(
            f"{r['server']:<9} {r['workers']:>2} {r['texts_per_request']:>2} {r['concurrency']:>4} {r['rps']:>9.1f}"
            f" {r['inputs_per_s']:>9.1f} {lat.get('p50', float('nan')):>8.2f} {lat.get('p99', float('nan')):>8.2f}"
            f" {r['errors']['total']:>6} {r['server_cpu']['total_ms_per_request']:>8.3f}"
            f" {r['server_cpu']['api_processes_ms_per_request']:>8.3f}"
            f" {r['server_cpu']['event_loop_ms_per_request']:>8.3f} {r['wrk']['cpu_ms_per_request']:>8.3f}"
            f" {r['host_cpu']['other_cores']:>5.2f}"
            f" {'' if ratio is None else f'{ratio:.3f}':>6}"
        )
    lines.append("(cpu/api/loop/wrk: CPU ms per request; other: cores busy with neither server nor wrk)")
    lines.append("")
    lines.append("server CPU ms per request by thread group (all processes):")
    for r in report["runs"]:
        groups = ", ".join(f"{g} {v:.3f}" for g, v in r["server_cpu"]["thread_groups_ms_per_request"].items())
        lines.append(f"  {r['server']} w={r['workers']} n={r['texts_per_request']} c={r['concurrency']}: {groups}")
    for s in report["ratios"]["api_workers_scaling"]:
        lines.append(
            f"api workers {s['api_workers']} / {s['base_api_workers']}: n={s['texts_per_request']}"
            f" c={s['concurrency']}: {s['ratio']:.3f}x"
        )
    lines.extend(f"note: {n}" for n in report["notes"])
    lines.append(
        f"errors: {report['errors_total']} ({'zero-error check passed' if report['zero_errors'] else 'FAILED'})"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path, focus_concurrency: int = 64) -> None:
    """req/s against concurrency (one panel per texts-per-request; a line per server and worker count, log
    scales) and req/s against workers at ``focus_concurrency`` (or the highest measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    texts = sorted({r["texts_per_request"] for r in runs})
    conc = sorted({r["concurrency"] for r in runs})
    focus = focus_concurrency if focus_concurrency in conc else conc[-1]
    fig, axes = plt.subplots(1, len(texts) + 1, figsize=(5.2 * (len(texts) + 1), 4.4))
    series = sorted({(r["server"], r["workers"]) for r in runs}, key=lambda s: (s[0] != "reference", s[1]))
    for ax, n in zip(axes, texts, strict=False):
        for kind, w in series:
            pts = sorted(
                (r["concurrency"], r["rps"])
                for r in runs
                if (r["server"], r["workers"], r["texts_per_request"]) == (kind, w, n)
            )
            if pts:
                style = "--" if kind == "reference" else "-"
                ax.plot(
                    *zip(*pts, strict=True),
                    style,
                    marker="o",
                    label=f"{kind} ({'workers' if kind == 'reference' else 'api-workers'} {w})",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent connections (wrk -t1)")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{n} text{'s' if n > 1 else ''} per request")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for kind in ("reference", "bertserve"):
        for n in texts:
            pts = sorted(
                (r["workers"], r["rps"])
                for r in runs
                if (r["server"], r["texts_per_request"], r["concurrency"]) == (kind, n, focus)
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    "--" if kind == "reference" else "-",
                    marker="o",
                    label=f"{kind}, {n} text(s)",
                )
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["workers"] for r in runs}))
    ax.set_xlabel("API worker processes")
    ax.set_ylabel("requests/s")
    ax.set_title(f"req/s against workers, c={focus}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    what = report.get("server_label") or (report.get("server_commit") or "")[:9]
    fig.suptitle(f"bertserve front end vs raw ASGI reference (server: {what}; {report['created']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI -----------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="bundle to serve (default: build the tiny bundle)")
    p.add_argument("--server-root", type=Path, default=ROOT, help="source tree to run bertserve from")
    p.add_argument("--server-label", default="", help="what the server is, for the report and plot title")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per point (wrk -d)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load after each start")
    p.add_argument("--concurrency", type=_ints, default=[1, 64, 256], help="wrk connections, e.g. 1,64,256")
    p.add_argument("--texts", type=_ints, default=[1, 8], help="texts per request, e.g. 1,8")
    p.add_argument("--api-workers", type=_ints, default=[1, 2], help="bertserve --api-workers values")
    p.add_argument("--reference-workers", type=_ints, default=[1], help="reference app worker processes")
    p.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk --timeout: slower responses are errors")
    p.add_argument(
        "--max-queue", type=int, default=0, help="BERTSERVE_MAX_QUEUE for bertserve (0: fit every in-flight text)"
    )
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--work-dir", type=Path, help="logs, bodies and the tiny bundle (default: a new temp dir)")
    p.add_argument("--json", type=Path, dest="json_path", help="write the report here")
    p.add_argument("--plot", type=Path, dest="plot_path", help="PNG plot (default: next to --json, or work dir)")
    return p


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items()})
    cfg.server_root = cfg.server_root.resolve()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so the finally blocks stop every server
    try:
        report = run(cfg)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    plot_path = cfg.plot_path or (
        cfg.json_path.with_suffix(".png") if cfg.json_path else Path(report["config"]["work_dir"]) / "frontend.png"
    )
    try:
        plot(report, plot_path)
        report["plot"] = str(plot_path)
    except Exception as exc:  # a plot must not lose the measurements
        report["plot"] = None
        _log(f"plot failed: {type(exc).__name__}: {exc}")
    json_path = cfg.json_path or Path(report["config"]["work_dir"]) / "frontend.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"report: {json_path}\nplot: {report['plot']}")
    return 0 if report["zero_errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
