"""The supervisor (``--api-workers N``, N > 1): start the engine process, then N API processes; forward signals;
stop everything with a clear message when any of them dies (no silent half-alive server).

SIGTERM drains: the API processes drain first (service/frontend/lifecycle.py), then the engine finishes what was
admitted. SIGHUP reloads in the engine. Metrics: prometheus_client's multiprocess mode, one coherent /metrics
from any API process (the directory is set before any child imports prometheus_client).

The API processes share the HTTP and gRPC ports with SO_REUSEPORT, which would let them join the listeners of
another server on the same port (another bertserve, say): each would then silently take part of the other's
traffic. So the supervisor first makes sure no one listens on either port, and refuses to start otherwise, as a
single process does.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from service.config import Settings
from service.ipc import child

log = logging.getLogger("bertserve.ipc")


class PortInUse(OSError):
    """Another process listens on a port this server must own."""


def ensure_free(host: str, port: int, what: str) -> None:
    """Raise PortInUse when anything listens on host:port.

    A plain bind (SO_REUSEADDR, so connections in TIME_WAIT do not count; no SO_REUSEPORT, so an existing
    reuse-port group does not let us in) fails exactly when a socket listens there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(exc.errno, f"{what} port {port} on {host}: address already in use") from None
            raise


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def supervise(settings: Settings) -> int:
    """Start the engine, then the API processes; forward signals; stop all if one dies. The exit status."""
    if settings.port == 0:  # every API process must bind the same port: choose it here
        settings = settings.model_copy(update={"port": free_port(settings.host)})
    try:
        ensure_free(settings.host, settings.port, "HTTP")
        if settings.grpc_listen_port:
            ensure_free(settings.host, settings.grpc_listen_port, "gRPC")
    except OSError as exc:
        print(f"error: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="bertserve-")
    os.chmod(workdir, 0o700)
    metrics_dir = os.path.join(workdir, "metrics")
    os.mkdir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the children when they import prometheus
    path = f"ipc://{workdir}/engine.sock"
    dump = settings.model_dump()
    spawn = multiprocessing.get_context("spawn")
    parent, child_end = spawn.Pipe()
    me = os.getpid()
    engine = spawn.Process(
        target=child.run,
        args=("service.ipc.engine_process", dump, path, child_end, me),
        name="bertserve-engine",
    )
    received: list[int] = []

    def on_signal(sig: int, _: Any) -> None:
        received.append(int(sig))

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, on_signal)
    try:
        engine.start()
        status = _wait_prepared(parent, engine)
        if status is not None:
            return status
        apis = [
            spawn.Process(target=child.run, args=("service.ipc.api", dump, path, i, me), name=f"bertserve-api-{i}")
            for i in range(settings.api_workers)
        ]
        for proc in apis:
            proc.start()
        log.info("supervisor: engine pid %d, %d API processes on port %d", engine.pid, len(apis), settings.port)
        return _watch(engine, apis, received, settings.drain_timeout_s)
    finally:
        _terminate(multiprocessing.active_children())
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(engine: Any, apis: list[Any], received: list[int], drain_timeout_s: float) -> int:
    """Until the server stops: forward signals, and stop everything when a process dies unasked."""
    stopping = False
    while True:
        ready = wait([p.sentinel for p in (engine, *apis)], timeout=0.1)
        while received:
            sig = received.pop(0)
            if sig == signal.SIGHUP:
                os.kill(engine.pid or 0, signal.SIGHUP)
                continue
            if not stopping:
                stopping = True
                log.info("supervisor: signal %d, draining the API processes", sig)
            for proc in apis:
                if proc.is_alive():
                    os.kill(proc.pid or 0, signal.SIGTERM)
        # a killed child's sentinel turns readable a moment before it can be reaped: wait for is_alive()
        dead = next((p for p in (engine, *apis) if not p.is_alive()), None) if ready else None
        if dead is not None and not stopping:
            why = "%s (pid %s) exited unexpectedly with status %s; stopping the server"
            log.critical(why, dead.name, dead.pid, dead.exitcode)
            _terminate([engine, *apis])
            return 1
        if stopping and not any(p.is_alive() for p in apis):
            failed = [p for p in apis if p.exitcode not in (0, None)]
            if engine.is_alive():
                os.kill(engine.pid or 0, signal.SIGTERM)
            engine.join(drain_timeout_s + 5)
            _terminate([engine])
            return 1 if failed else 0


def _wait_prepared(conn: Connection, engine: Any) -> int | None:
    """None once the engine has verified the bundles and created its sessions; an exit status if it failed."""
    while True:
        if conn.poll(0.1):
            kind, detail = conn.recv()
            if kind == "prepared":
                return None
            print(f"error: cannot start: {detail}", file=sys.stderr)
            engine.join(5)
            return 2
        if not engine.is_alive():
            print(f"error: cannot start: the engine process exited with status {engine.exitcode}", file=sys.stderr)
            return 2


def _terminate(procs: Sequence[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
