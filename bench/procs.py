"""Server processes for the benchmarks, written once: a free port, start, readiness, CPU and memory, stop.

A server runs in its own session (so one with worker processes stops as a whole group), is waited for on /readyz
(showing its last log lines if it dies), and its whole process tree's CPU is read with psutil. Also here: the small
helpers the command lines share. Loopback only, POSIX only (process groups), like the benchmarks themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ints(text: str) -> list[int]:
    """``"1,64,256"`` -> ``[1, 64, 256]``: the argparse type of every comma-separated list of positive integers."""
    if not all(x.strip().isdigit() and int(x) > 0 for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return [int(x) for x in text.split(",")]


def settings_env(pairs: Iterable[str]) -> dict[str, str]:
    """``["max_batch_size=16", "BERTSERVE_VARIANT=int8"]`` -> BERTSERVE_* variables (the prefix is optional)."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name = key.strip().upper()
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {pair!r}")
        env[name if name.startswith("BERTSERVE_") else f"BERTSERVE_{name}"] = value
    return env


def child_env(extra: Mapping[str, str] | None = None, root: Path = ROOT) -> dict:
    """This process's environment for a child (``BERTSERVE_*`` settings pass through): ``root`` (then this tree)
    first on PYTHONPATH, unbuffered output, then ``extra``."""
    env = dict(os.environ)
    paths = dict.fromkeys([str(root), str(ROOT), *env.get("PYTHONPATH", "").split(os.pathsep)])
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env | dict(extra or {})


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET on one of our servers; (status, body), with status 0 when nothing answers."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return 0, b""
    return response.status_code, response.content


def metric_samples(base_url: str) -> list[Sample]:
    """Every sample of the server's ``/metrics`` (none when it has no such page)."""
    status, body = http_get(base_url + "/metrics")
    text = body.decode() if status == 200 else ""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def service_argv(port: int, *flags: str) -> list[str]:
    """``python -m service --host 127.0.0.1 --port PORT FLAGS...`` with this interpreter."""
    return [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *flags]


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (API processes, the engine, helpers); [] when it is gone."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def cpu_seconds(proc: psutil.Process) -> float:
    """user + system CPU seconds of one process (all its threads); 0 when it is gone."""
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return float(times.user + times.system)
    return 0.0


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def rss_bytes(pid: int) -> int | None:
    """Resident memory of the process tree; None when the process is gone."""
    procs = tree(pid)
    with contextlib.suppress(psutil.Error):
        return sum(int(p.memory_info().rss) for p in procs) if procs else None
    return None


class ServerError(RuntimeError):
    """A server did not start or become ready; the message carries the end of its log."""


@dataclass
class Server:
    """A server subprocess in its own session (so its whole group can be stopped), logging to a file.

    ``root`` is the source tree it runs from (first on PYTHONPATH, and its working directory), so the same tool
    can measure another checkout of bertserve beside this one.
    """

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    root: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.name} was never started")
        return self.proc.pid

    def start(self) -> None:
        env = child_env(self.env, root=self.root)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float) -> None:
        """Poll ``GET /readyz`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"{self.name} exited with {self.proc and self.proc.poll()}:\n{self.log_tail()}")
            if http_get(self.base_url + "/readyz", timeout=1.0)[0] == 200:
                return
            time.sleep(0.2)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_idle(self, timeout: float = 60.0, busy_cores: float = 0.1, interval: float = 0.25) -> None:
        """Block until the server's process tree uses under ``busy_cores`` of CPU, so the work a previous point
        left behind (e.g. requests whose clients gave up) is not billed to the next one."""
        deadline = time.monotonic() + timeout
        previous = tree_cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(interval)
            current = tree_cpu_seconds(self.pid)
            if current - previous < busy_cores * interval:
                return
            previous = current

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the server's process group, wait up to ``grace`` seconds, then SIGKILL it; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(server: Server, ready_timeout: float, grace: float = 15.0) -> Iterator[Server]:
    """Start ``server``, wait until it is ready, and always stop it (also on errors and Ctrl-C)."""
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop(grace=grace)


def log(message: str) -> None:
    """Progress on stderr, time-stamped (stdout carries each tool's table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the ``finally`` blocks that stop the servers run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def build_tiny(work: Path) -> Path:
    """The tiny 2-layer bundle (``python -m training.tiny``), built in a subprocess so torch stays out of here."""
    out = work / "tiny"
    argv = [sys.executable, "-m", "training.tiny", str(out)]
    done = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not (out / "manifest.json").exists():
        raise ServerError(f"building the tiny bundle failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


def host_info() -> dict[str, object]:
    """What a summary records about the machine it was measured on."""
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg": [round(x, 2) for x in os.getloadavg()]}


def git_commit(root: Path = ROOT) -> str | None:
    """The commit checked out in ``root``; None when ``root`` is not the top of a git checkout (a ``git archive``
    copy, even one inside another repository)."""
    argv = ["git", "rev-parse", "--show-toplevel", "HEAD"]
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        top, commit = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=10).stdout.split()
        return commit if Path(top).resolve() == root.resolve() else None
    return None
