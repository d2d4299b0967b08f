"""The load generator: loopback only, correct HTTP parsing, real numbers from a real server on a tiny bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench import loadgen  # noqa: E402
from bench.procs import Server, free_port  # noqa: E402


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:8000",
        "http://10.0.0.1:8000",
        "http://0.0.0.0:8000",
        "http://[::1]:8000",
        "https://127.0.0.1:8000",
        "http://127.0.0.1.nip.io:8000",
        "http://user@evil.example:80",
    ],
)
def test_refuses_anything_but_loopback(url: str) -> None:
    with pytest.raises(loadgen.NotLoopback):
        loadgen.parse_target(url)


def test_localhost_is_connected_as_ipv4_loopback() -> None:
    assert loadgen.parse_target("http://localhost:8123") == loadgen.Target("127.0.0.1", 8123, "/v1/predict")
    assert loadgen.parse_target("http://127.0.0.1:9/v2/x").path == "/v2/x"


@pytest.mark.slow
def test_cli_exits_2_on_a_remote_host_without_sending_anything() -> None:
    assert loadgen.main(["--url", "http://192.0.2.1:80", "--duration", "1", "--texts", "/nonexistent"]) == 2


class _FakeTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


def _feed(chunks: list[bytes]) -> loadgen._Response:
    import asyncio

    async def go() -> loadgen._Response:
        loop = asyncio.get_running_loop()
        conn = loadgen.HttpConnection(loop)
        conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
        pending = loop.create_task(conn.request(b"GET / HTTP/1.1\r\n\r\n", timeout=5))
        await asyncio.sleep(0)
        for chunk in chunks:
            conn.data_received(chunk)
        return await pending

    return asyncio.run(go())


def test_parses_content_length_split_across_packets() -> None:
    response = _feed([b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\n\r\nhel", b"lo"])
    assert (response.status, response.body, response.close) == (200, b"hello", False)


def test_parses_chunked_bodies_and_connection_close() -> None:
    raw = b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    raw += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    response = _feed([raw[:40], raw[40:]])
    assert (response.status, response.body, response.close) == (429, b"abcde", True)


@pytest.fixture(scope="module")
def naive_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("naive") / "naive.log"
    argv = [sys.executable, "-m", "bench.naive_server", "--model-dir", str(tiny_bundle), "--port", str(port)]
    server = Server("naive", argv, port, log)
    server.start()
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None  # always killed


def _loadgen(server: Server, *extra: str, warmup: str = "0.2") -> dict:
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        server.base_url,
        "--n-texts",
        "50",
        "--duration",
        "1",
        "--warmup",
        warmup,
        *extra,
    ]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_measures_a_real_server_one_input_per_request(naive_server: Server) -> None:
    report = _loadgen(naive_server, "--concurrency", "4")
    assert report["ok"] > 0 and report["errors"] == {} and report["error_count"] == 0
    assert report["inputs_per_s"] == pytest.approx(report["requests_per_s"])
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["client_cpu_s"] >= 0 and report["window_s"] == pytest.approx(1.0, abs=0.2)


@pytest.mark.slow
def test_eight_inputs_per_request_and_bounded_request_count(naive_server: Server) -> None:
    report = _loadgen(
        naive_server, "--concurrency", "2", "--inputs-per-request", "8", "--max-requests", "6", warmup="0"
    )
    assert report["issued"] == 6
    assert report["ok"] > 0 and report["errors"] == {}  # bodies were parsed: 8 predictions per response
    assert report["inputs_per_s"] == pytest.approx(8 * report["requests_per_s"])


@pytest.mark.slow
def test_counts_errors_by_status(naive_server: Server) -> None:
    report = _loadgen(naive_server, "--concurrency", "2", "--path", "/nope")
    assert report["ok"] == 0 and report["latency_ms"] is None
    assert set(report["errors"]) == {"404"} and report["errors"]["404"] == report["error_count"] > 0
