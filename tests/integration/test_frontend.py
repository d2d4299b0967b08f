"""The front end as processes: clients that go away, drains under keep-alive load, and several API processes.

- A client that disconnects with requests in flight is normal: counted in bertserve_rejected_total{reason=
  "disconnected"}, never an ERROR line (the old build logged one "_GatheringFuture exception was never
  retrieved" per request).
- SIGTERM under steady keep-alive load loses nothing: every request sent on an open connection is answered
  (Connection: close after SIGTERM); only new connects after the listener closed may be refused.
- ``api_workers=2``: one engine process, two API processes, every guarantee still holds, and a dead process
  stops the server with a message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import free_port, service_command
from tests.keepalive import KeepAliveClient

TEXT = json.dumps({"inputs": ["the film was great and I loved every minute of it"] * 8}).encode()


def workers(server: Any) -> list[psutil.Process]:
    """The server's engine and API processes (multiprocessing's resource tracker is not one of them)."""
    return [c for c in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]


def raw_post(port: int, body: bytes) -> socket.socket:
    """Send a complete POST /v1/predict and return the socket without reading the answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


@pytest.mark.parametrize("api_workers", [1, 2])
def test_clients_that_go_away_are_counted_and_never_logged_as_errors(start_server: Any, api_workers: int) -> None:
    server = start_server(max_batch_size=1, inference_workers=1, api_workers=api_workers)
    body = json.dumps({"inputs": ["the film was great and I loved every minute of it"] * 32}).encode()
    sockets = [raw_post(server.port, body) for _ in range(48)]  # a queue far longer than one batch
    time.sleep(0.3)
    for sock in sockets:  # go away with everything still in flight
        sock.close()
    deadline = time.monotonic() + 30
    while server.metric("bertserve_rejected_total", {"reason": "disconnected"}) == 0:
        assert time.monotonic() < deadline, "disconnects were never counted"
        time.sleep(0.2)
    assert server.client.post("/v1/predict", json={"inputs": "a great film"}).status_code == 200
    log = server.log()
    assert "ERROR" not in log and "Traceback" not in log and "never retrieved" not in log, log[-3000:]


def drain_once(start_server: Any, api_workers: int) -> tuple[int, list[str], int]:
    # The exit waits for the idle timeout of this test's own readiness connection (idle connections are closed
    # only by it); 1 s keeps each drain short, and the clients below are never idle that long.
    server = start_server(api_workers=api_workers, warmup_runs=0, keep_alive_s=1)
    clients = [KeepAliveClient(server.port, TEXT) for _ in range(16)]
    for client in clients:
        client.start()
    time.sleep(0.4)
    server.proc.send_signal(signal.SIGTERM)
    for client in clients:
        client.join(60)
    status = server.proc.wait(60)
    server.close()
    return status, [e for c in clients for e in c.errors], sum(c.answered for c in clients)


@pytest.mark.slow
@pytest.mark.parametrize(("api_workers", "drains"), [(1, 20), (2, 5)])
def test_sigterm_drains_under_keep_alive_load_lose_nothing(start_server: Any, api_workers: int, drains: int) -> None:
    failures = []
    for i in range(drains):
        status, errors, answered = drain_once(start_server, api_workers)
        assert answered > 0
        if status != 0 or errors:
            failures.append(f"drain {i}: exit {status}, errors {errors[:3]}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def two_workers(start_server: Any) -> Any:
    return start_server(api_workers=2, api_key="k", max_queue=4)


def test_two_api_processes_serve_one_engine_with_one_metrics_view(two_workers: Any) -> None:
    server = two_workers
    auth = {"authorization": "Bearer k"}
    children = workers(server)
    assert len(children) == 3, [c.cmdline() for c in children]  # one engine, two API processes
    sent = 40
    for _ in range(sent):  # new connections: SO_REUSEPORT spreads them over both API processes
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/v1/predict", json={"inputs": "a great film"}, headers=auth).status_code == 200
    served = server.metric("bertserve_requests_total", {"endpoint": "/v1/predict", "status": "200"})
    assert served == sent  # both processes' samples, merged
    assert server.metric("bertserve_batch_size_count") >= 1  # the engine process's samples too
    assert server.client.post("/v1/predict", json={"inputs": "a"}).status_code == 401
    full = server.client.post("/v1/predict", json={"inputs": ["a"] * 5}, headers=auth)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    late = server.client.post("/v1/predict", json={"inputs": "a", "timeout_s": 1e-9}, headers=auth)
    assert late.status_code == 504 and late.json()["type"] == "deadline_exceeded"
    v2 = server.client.post(
        "/v2/models/tiny/infer",
        headers=auth,
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["great"]}]},
    )
    assert v2.status_code == 200 and "x-queue-time" in v2.headers


def test_two_api_processes_hot_reload_without_failures(start_server: Any, tiny_bundle_factory: Any) -> None:
    new = tiny_bundle_factory(version="2", seed=1, optimize=False, quantize=False)
    server = start_server(api_workers=2, api_key="k")
    auth = {"authorization": "Bearer k"}
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30, headers=auth) as client:
            while not stop.is_set():
                results.append(client.post("/v1/predict", json={"inputs": "a great film"}).status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = server.client.post("/v1/admin/reload", json={"model_dir": str(new)}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    deadline = time.monotonic() + 10
    while server.client.post("/v1/predict", json={"inputs": "x"}, headers=auth).json()["version"] != "2":
        assert time.monotonic() < deadline, "an API process still answers with the old version"
        time.sleep(0.1)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}


@pytest.mark.parametrize("victim", ["engine", "api"])
def test_a_dead_process_stops_the_server_with_a_message(start_server: Any, victim: str) -> None:
    server = start_server(api_workers=2)
    children = workers(server)
    # the API processes are the ones listening on the HTTP port; the engine is the other one
    listening = {
        c.pid
        for c in children
        for conn in c.net_connections()
        if conn.laddr and conn.laddr.port == server.port and conn.status == psutil.CONN_LISTEN
    }
    target = next(c for c in children if (c.pid in listening) == (victim == "api"))
    os.kill(target.pid, signal.SIGKILL)
    status = server.proc.wait(30)
    assert status != 0
    assert "exited unexpectedly" in server.log(), server.log()[-2000:]
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_bad_bundle_with_two_api_workers_never_listens(start_server: Any, tmp_path: Path) -> None:
    server = start_server(model_dir=tmp_path / "missing", wait_ready=False, api_workers=2)
    assert server.proc.wait(30) == 2
    assert "cannot start" in server.log()


def test_killing_the_supervisor_takes_its_children_with_it(start_server: Any) -> None:
    """SIGKILL leaves the supervisor no chance to clean up: the kernel's parent-death signal stops the rest."""
    server = start_server(api_workers=2)
    children = workers(server)
    assert len(children) == 3
    server.proc.kill()
    server.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def mapped_libraries(proc: psutil.Process) -> str:
    return Path(f"/proc/{proc.pid}/maps").read_text(encoding="utf-8", errors="replace")


def test_only_the_engine_process_loads_onnx_runtime(start_server: Any) -> None:
    """API processes tokenize and speak the protocols; sessions live in the engine process alone, so ONNX Runtime
    (hundreds of MB of libraries and arenas) is mapped there and nowhere else, not even in the supervisor."""
    server = start_server(api_workers=2)
    children = workers(server)
    loaded = {c.pid: "onnxruntime" in mapped_libraries(c) for c in children}
    assert sorted(loaded.values()) == [False, False, True], loaded  # two API processes, one engine
    assert "onnxruntime" not in mapped_libraries(psutil.Process(server.proc.pid)), "the supervisor loaded it"


@pytest.mark.parametrize("second_workers", [1, 2])
@pytest.mark.parametrize("clash", ["http", "grpc"])
def test_a_second_server_on_a_port_in_use_refuses_to_start(
    start_server: Any, tiny_bundle: Path, tmp_path: Path, second_workers: int, clash: str
) -> None:
    """With SO_REUSEPORT, API processes could join another server's listeners and silently take part of its
    traffic; a second server on a port in use must fail with "address already in use", whatever its worker count,
    and leave the first one serving."""
    grpc_port = free_port()
    first = start_server(api_workers=2, grpc_port=grpc_port)
    listeners = sorted(
        conn.laddr.port for c in workers(first) for conn in c.net_connections() if conn.status == psutil.CONN_LISTEN
    )
    http_port = first.port if clash == "http" else free_port()
    cmd, env = service_command(tiny_bundle, http_port, api_workers=second_workers, grpc_port=grpc_port)
    if clash == "http":
        env["BERTSERVE_GRPC_PORT"] = str(free_port())
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "address already in use" in (second.stdout + second.stderr).lower(), second.stderr[-2000:]
    assert first.client.post("/v1/predict", json={"inputs": "a great film"}).status_code == 200
    after = sorted(
        conn.laddr.port for c in workers(first) for conn in c.net_connections() if conn.status == psutil.CONN_LISTEN
    )
    assert after == listeners, "the first server's listeners changed"
