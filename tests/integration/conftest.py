"""Start the real server (`python -m service`, uvicorn on 127.0.0.1, a free port) as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_command(model_dir: Path, port: int, **settings: Any) -> tuple[list[str], dict[str, str]]:
    """``python -m service`` on 127.0.0.1:port, and its environment: ``settings`` as BERTSERVE_* variables, none
    inherited from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTSERVE_")}
    env.update({f"BERTSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    return cmd, env


class Server:
    """One server process; ``settings`` become BERTSERVE_* environment variables."""

    def __init__(self, model_dir: Path, log_path: Path, wait_ready: bool = True, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd, env = service_command(model_dir, self.port, **settings)
        env["BERTSERVE_WARMUP_RUNS"] = env.get("BERTSERVE_WARMUP_RUNS", "1")
        env.setdefault("BERTSERVE_GRPC_PORT", "0")  # gRPC only where a test asks for it: no shared port 8001
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        if wait_ready:
            self.wait("/readyz")

    def wait(self, path: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get(path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()
        self._log.close()

    def predict_concurrently(self, texts: list[str], concurrency: int, timeout: float = 30) -> list[httpx.Response]:
        """POST each text to /v1/predict alone, ``concurrency`` requests in flight at once; responses in order."""

        async def run() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=concurrency)
            async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits) as client:
                sem = asyncio.Semaphore(concurrency)

                async def one(text: str) -> httpx.Response:
                    async with sem:
                        return await client.post("/v1/predict", json={"inputs": text})

                return list(await asyncio.gather(*(one(t) for t in texts)))

        return asyncio.run(run())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Value of one sample in /metrics, parsed by prometheus_client's own parser (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total


@pytest.fixture
def start_server(tmp_path: Path, tiny_bundle: Path) -> Iterator[Any]:
    """Factory: start_server(**settings) -> Server on the tiny bundle (or model_dir=...); all stopped at the end."""
    servers: list[Server] = []

    def start(model_dir: Path | None = None, wait_ready: bool = True, **settings: Any) -> Server:
        log_path = tmp_path / f"server-{len(servers)}.log"
        server = Server(model_dir or tiny_bundle, log_path, wait_ready=wait_ready, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Server]:
    """One server with default settings for the read-only tests of a module."""
    server = Server(tiny_bundle, tmp_path_factory.mktemp("srv") / "server.log")
    yield server
    server.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test here starts real server processes (that is their point): all are slow; `make test-fast` runs
    the in-process layer (tests/unit/test_http_fast.py covers the statuses, protocols and auth there)."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.slow)
