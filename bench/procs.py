"""Server processes for the benchmarks: a free port, start, readiness, CPU and RSS, stop. Written once.

Every benchmark that measures a server (``bench.run``, ``bench.soak``, ``bench.gpu``) and the tests that drive
one need the same few things, and each used to carry its own copy: a port free on 127.0.0.1, a child process in
its own session (so a server with worker processes is stopped as a whole group), a readiness wait that reports
the server's last log lines when it dies, and its CPU seconds and resident memory read from ``/proc`` (no psutil
in the service's environment).

Everything here is loopback only and POSIX only (process groups, ``/proc``), like the benchmarks themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None, *, clean_settings: bool = False) -> dict[str, str]:
    """This process's environment for a child: the repo on PYTHONPATH, unbuffered output, then ``extra``.

    ``clean_settings`` drops every inherited ``BERTSERVE_*`` variable first, so only ``extra`` configures the
    server (what a test or a soak with explicit settings wants; the runner passes the caller's through).
    """
    env = {k: v for k, v in os.environ.items() if not (clean_settings and k.startswith("BERTSERVE_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """``{"max_batch_size": 16}`` -> ``{"BERTSERVE_MAX_BATCH_SIZE": "16"}`` (a ``BERTSERVE_`` prefix is kept)."""
    env: dict[str, str] = {}
    for key, value in settings.items():
        name = key.strip().upper()
        env[name if name.startswith("BERTSERVE_") else f"BERTSERVE_{name}"] = str(value)
    return env


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET on loopback; (status, body), with status 0 when nothing answers."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"http_get is for loopback servers only, not {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback http, checked above)
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (all its threads) from /proc; None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int | None:
    """Resident set size from /proc; None when the process is gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def service_argv(model_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """``python -m service`` on ``model_dir`` at host:port, with this interpreter."""
    return [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host", host, "--port", str(port)]


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
    clean_settings: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=child_env(self.env, clean_settings=self.clean_settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> str:
        """Poll /readyz (falling back to /healthz when /readyz is 404) until 200; returns the path used."""
        if self.proc is None:
            raise ServerError(f"{self.name} was never started")
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
        return cpu_seconds(self.proc.pid) if self.proc else None

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.proc.pid) if self.proc else None

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

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the server's process group, wait up to ``grace`` seconds, then SIGKILL it.

        Returns the exit status (None if it was never started). Only this server's own group is signalled.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
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
