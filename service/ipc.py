"""Several API processes, one engine process: the supervisor, both process mains and the IPC between them.

Why (after vLLM's API servers): at thousands of requests/s the per-request Python work (HTTP, validation,
tokenizing) fills one core long before an accelerator is busy. ``api_workers`` > 1 runs that work in N
processes, which share the HTTP and gRPC ports with SO_REUSEPORT (the kernel spreads connections evenly), and
sends token ids to ONE engine process per device that owns the batchers and the ONNX Runtime sessions, so
batches still form from all traffic.

IPC: pyzmq (a well-kept library, vLLM's choice): each API process has a DEALER socket connected to the engine's
ROUTER over an ``ipc://`` socket in a private (0700) temporary directory. Messages are msgpack (decoding runs
no code, unlike pickle; vLLM's engine IPC is msgpack too): token ids and logits travel as raw little-endian
bytes, records as maps. Requests that arrive in the same event-loop iteration travel in one message, and so do
the results that finish together, so the IPC cost is per scheduling round, not per request.

The supervisor stops everything with a clear message when any process dies (no half-alive server), forwards
SIGTERM (API processes drain first, then the engine finishes what was admitted) and SIGHUP (a reload in the
engine). Metrics: prometheus_client's multiprocess mode, one coherent /metrics from any API process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgpack
import numpy as np

from service import errors
from service.config import Settings
from service.engine import ModelDescriptor, RepositoryEntry
from service.modelio import TokenSeq
from service.tracing import setup_tracing

log = logging.getLogger("bertserve.ipc")

GONE_SCAN_S = 0.02  # how often an API process tells the engine which of its clients went away


def _dumps(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def _loads(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, use_list=True)


def _array(raw: bytes, dtype: type[np.generic], rows: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=dtype).reshape(rows, -1)


def _error_of(exc: BaseException) -> tuple[str, str, int]:
    retry = exc.retry_after if isinstance(exc, errors.QueueFull) else 0
    message = exc.message if isinstance(exc, errors.ServeError) else str(exc)
    return type(exc).__name__, message, retry


def _rebuild_error(name: str, message: str, retry: int) -> BaseException:
    if name == "QueueFull":
        return errors.QueueFull(retry)
    if name == "Disconnected":
        return errors.Disconnected()
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.ServeError) and cls is not errors.Unauthorized:
        return cls(message)
    return errors.InferenceFailed(f"{name}: {message}")


# -- the engine process ------------------------------------------------------------------------------------
class EngineServer:
    """The engine process's loop: requests in from every API process, results back in per-round messages."""

    def __init__(self, engine: Any, path: str, api_workers: int) -> None:
        import zmq
        import zmq.asyncio

        self.engine = engine
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(path)
        self._outbox: dict[bytes, list[Any]] = {}
        self._flush_scheduled = False
        self._cancelled: set[tuple[bytes, int]] = set()
        # Readiness is global: every API process reports once it has the model table; the server is ready
        # (in every process) only when the engine is and all of them have.
        self.api_workers = api_workers
        self.apis_ready: set[int] = set()
        self._peers: set[bytes] = set()  # every API process that has written to us
        self.listeners_closed: set[int] = set()
        self._announced: tuple[int, bool] | None = None

    def state(self) -> tuple[int, bool]:
        return self.engine.generation, self.engine.ready and len(self.apis_ready) >= self.api_workers

    def _queue_reply(self, identity: bytes, item: Any) -> None:
        self._outbox.setdefault(identity, []).append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        state = self.state()
        if state != self._announced:  # readiness or the model table changed: tell every API process at once
            self._announced = state
            for identity in self._peers:
                outbox.setdefault(identity, [])
        for identity, items in outbox.items():
            self.socket.send_multipart([identity, _dumps(("results", state, items))], copy=False)

    def _done(self, identity: bytes, rid: int, future: asyncio.Future[Any]) -> None:
        self._cancelled.discard((identity, rid))
        exc = future.exception()
        if exc is not None:
            self._queue_reply(identity, (rid, False, _error_of(exc)))
            return
        job = future.result()
        logits = np.ascontiguousarray(job.logits, dtype=np.float32)
        scores = np.ascontiguousarray(job.scores, dtype=np.float32)
        value = [
            logits.tobytes(),
            scores.tobytes(),
            len(logits),
            job.predicted,
            job.queue_s,
            job.inference_s,
            job.batches,
        ]
        self._queue_reply(identity, (rid, True, value))

    def _infer(self, identity: bytes, requests: Sequence[Any]) -> None:
        for rid, name, version, seqs, deadline, link in requests:
            key = (identity, rid)

            def gone(key: tuple[bytes, int] = key) -> bool:
                return key in self._cancelled

            try:
                tokens = [TokenSeq(np.frombuffer(ids, dtype=np.int64), segment) for ids, segment in seqs]
                trace = (int(link[0], 16), link[1]) if link else None  # the 128-bit trace id travels as hex
                future = self.engine.submit(name, version, tokens, deadline, gone, trace)
            except Exception as exc:
                self._queue_reply(identity, (rid, False, _error_of(exc)))
                continue
            future.add_done_callback(lambda f, rid=rid: self._done(identity, rid, f))

    async def _call(self, identity: bytes, rid: int, method: str, args: tuple[Any, ...]) -> None:
        self._peers.add(identity)
        try:
            value = await self._dispatch(method, args)
        except Exception as exc:
            self._queue_reply(identity, (rid, False, _error_of(exc)))
        else:
            self._queue_reply(identity, (rid, True, value))

    async def _dispatch(self, method: str, args: tuple[Any, ...]) -> Any:
        e = self.engine
        if method == "descriptors":
            return [e.generation, [asdict(d) for d in e.descriptors()]]
        if method == "stats":
            return [[name, version, stats] for (name, version), stats in e.stats().items()]
        if method == "index":
            return [asdict(entry) for entry in sorted(e.index.values(), key=lambda entry: entry.name)]
        if method == "load":
            await e.load(*args)
            return None
        if method == "unload":
            await e.unload(*args)
            return None
        if method == "reload":
            from pathlib import Path

            model_dir, variant = args
            return asdict(await e.reload(Path(model_dir) if model_dir else None, variant))
        if method == "ping":
            return None
        if method == "api_ready":
            self.apis_ready.add(int(args[0]))
            return None
        if method == "listener_closed":  # the drain barrier (service/frontend/lifecycle.py, DrainGate)
            self.listeners_closed.add(int(args[0]))
            return len(self.listeners_closed) >= self.api_workers
        if method == "listeners_all_closed":
            return len(self.listeners_closed) >= self.api_workers
        raise errors.BadRequest(f"unknown engine call {method!r}")

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[Any]] = set()
        receiver = asyncio.ensure_future(self.socket.recv_multipart())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                receiver.cancel()
                break
            identity, frame = receiver.result()
            receiver = asyncio.ensure_future(self.socket.recv_multipart())
            message = _loads(frame)
            kind = message[0]
            if kind == "infer":
                self._infer(identity, message[1])
            elif kind == "cancel":
                self._cancelled.update((identity, rid) for rid in message[1])
            elif kind == "call":
                _, rid, method, args = message
                task = asyncio.ensure_future(self._call(identity, rid, method, args))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await self.engine.close()
        self._flush()
        self.socket.close(linger=500)
        self.context.term()


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, however it dies (even SIGKILL): no orphans.

    Linux's PR_SET_PDEATHSIG; the parent check closes the race of a supervisor that died before the call.
    """
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still stops the children
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def engine_main(settings_dump: dict[str, Any], path: str, conn: Connection, parent: int) -> None:
    """The engine process: prepare every model (a bad bundle stops the server before it listens), then serve."""
    from service.__main__ import monitor_factory
    from service.engine import Engine
    from service.logs import configure_logging
    from service.metrics import Metrics

    die_with_parent(parent)
    settings = Settings(**settings_dump)
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orchestrates shutdown
    metrics = Metrics()
    tracing = setup_tracing()
    engine = Engine(settings, metrics, monitor_factory(settings, metrics), tracing)
    try:
        engine.prepare()
    except Exception as exc:
        conn.send(("error", str(exc)))
        sys.exit(2)
    conn.send(("prepared", None))

    async def main() -> None:
        server = EngineServer(engine, path, settings.api_workers)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_quietly(engine)))
        starting = asyncio.ensure_future(engine.start())
        starting.add_done_callback(_exit_if_failed)
        await server.run(stop)

    import uvloop

    try:
        uvloop.run(main())
    finally:
        tracing.shutdown()


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    """Warm-up failed: the engine cannot serve; exit so the supervisor stops the server with a message."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("cannot start: %s", task.exception())
        os._exit(2)


async def _reload_quietly(engine: Any) -> None:
    try:
        await engine.reload(None, None)
    except Exception as exc:
        log.error("SIGHUP reload failed; still serving the old model: %s", exc)


# -- the API processes' side -------------------------------------------------------------------------------
def _CALL() -> bool:
    return False


@dataclass(slots=True)
class RemoteResult:
    logits: Any
    scores: Any
    predicted: list[list[int]]
    queue_s: float
    inference_s: float
    batches: list[tuple[int, float, float]]


@dataclass
class RemoteEngine:
    """The engine as an API process sees it over IPC (implements service.core.EngineClient)."""

    path: str
    index: int = 0  # this API process's number, for the readiness report
    generation: int = -1
    ready: bool = False
    _descriptors: list[ModelDescriptor] = field(default_factory=list)
    _pending: dict[int, tuple[asyncio.Future[Any], Callable[[], bool] | None]] = field(default_factory=dict)
    _outbox: list[Any] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _flush_scheduled: bool = False
    _known_generation: int = -1
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    _reported: bool = False

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.path)
        self._tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._watch())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.socket.close(linger=0)
        self.context.term()

    # EngineClient
    def descriptors(self) -> list[ModelDescriptor]:
        return self._descriptors

    def check_room(self, name: str, version: str, n: int) -> None:
        """Admission is decided in the engine (a 429 comes back as the result)."""

    def submit(
        self,
        name: str,
        version: str,
        seqs: Sequence[TokenSeq],
        deadline: float,
        gone: Callable[[], bool] | None,
        link: tuple[int, int] | None = None,
    ) -> asyncio.Future[Any]:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, gone)
        trace = (f"{link[0]:032x}", link[1]) if link else None
        self._outbox.append((rid, name, version, [(s.ids.tobytes(), s.segment) for s in seqs], deadline, trace))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        if outbox:
            self.socket.send(_dumps(("infer", outbox)), copy=False)

    async def call(self, method: str, *args: Any) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, _CALL)
        await self.socket.send(_dumps(("call", rid, method, args)))
        return await future

    async def load(self, name: str) -> None:
        await self.call("load", name)
        await self._refresh()

    async def unload(self, name: str) -> None:
        await self.call("unload", name)
        await self._refresh()

    async def reload(self, model_dir: str | None, variant: str | None) -> ModelDescriptor:
        desc = ModelDescriptor(**await self.call("reload", model_dir, variant))
        await self._refresh()
        return desc

    async def stats(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(name, version): stats for name, version, stats in await self.call("stats")}

    async def repository_index(self) -> list[RepositoryEntry]:
        return [RepositoryEntry(**entry) for entry in await self.call("index")]

    # internals
    async def drain_barrier(self, timeout_s: float = 5.0) -> None:
        """Report this process's listener closed; return once every API process's is, or after timeout_s (the
        engine may be gone: the supervisor died and took it along)."""

        async def wait_for_all() -> None:
            done = await self.call("listener_closed", self.index)
            while not done:
                await asyncio.sleep(0.01)
                done = await self.call("listeners_all_closed")

        try:
            await asyncio.wait_for(wait_for_all(), timeout_s)
        except TimeoutError:
            log.warning("drain: not every API process reported its listener closed within %.0f s", timeout_s)

    async def refresh(self) -> None:
        """Fetch the engine's model table now (after a Draining answer: a reload retired a version)."""
        await self._refresh()

    async def _refresh(self) -> None:
        generation, descriptors = await self.call("descriptors")
        self._descriptors = [ModelDescriptor(**d) for d in descriptors]
        self.generation = generation
        if self._descriptors and not self._reported:
            self._reported = True
            await self.call("api_ready", self.index)

    async def _receive(self) -> None:
        while True:
            frame = await self.socket.recv()
            _, (generation, ready), items = _loads(frame)
            self.ready = ready
            if generation != self._known_generation:
                self._known_generation = generation
                self._spawn(self._refresh())
            for rid, ok, value in items:
                entry = self._pending.pop(rid, None)
                if entry is None or entry[0].done():
                    continue
                if ok:
                    entry[0].set_result(self._result(value) if entry[1] is not _CALL else value)
                else:
                    entry[0].set_exception(_rebuild_error(*value))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _result(value: list[Any]) -> RemoteResult:
        logits, scores, rows, predicted, queue_s, inference_s, batches = value
        return RemoteResult(
            _array(logits, np.float32, rows),
            _array(scores, np.float32, rows),
            predicted,
            queue_s,
            inference_s,
            [tuple(b) for b in batches],
        )

    async def _watch(self) -> None:
        """Keep the model table fresh (readiness, reloads) and tell the engine which clients went away."""
        last_ping = 0.0
        while True:
            await asyncio.sleep(GONE_SCAN_S)
            gone = [
                rid for rid, (_, probe) in self._pending.items() if probe is not None and probe is not _CALL and probe()
            ]
            if gone:
                await self.socket.send(_dumps(("cancel", gone)))
            now = time.monotonic()
            if now - last_ping > 0.25:  # carries the engine's generation and readiness back
                last_ping = now
                self._spawn(self.call("ping"))


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def api_main(settings_dump: dict[str, Any], path: str, index: int, parent: int) -> None:
    """One API process: HTTP (+ gRPC) front end over a RemoteEngine."""
    from service.__main__ import serve
    from service.core import DataPlane
    from service.frontend.lifecycle import Lifecycle
    from service.logs import configure_logging
    from service.metrics import Metrics

    die_with_parent(parent)
    settings = Settings(**settings_dump)
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    metrics = Metrics()
    client = RemoteEngine(path, index)
    plane = DataPlane(settings, client, metrics)
    lifecycle = Lifecycle(plane, None)
    lifecycle.hooks.insert(0, (client.start, client.stop))
    from service.frontend.lifecycle import GATE

    GATE.barrier = client.drain_barrier
    sock = reuseport_socket(settings.host, settings.port)
    sys.exit(serve(settings, plane, metrics, lifecycle, setup_tracing(), sockets=[sock]))


# -- the supervisor ----------------------------------------------------------------------------------------
def supervise(settings: Settings) -> int:
    """Start the engine, then the API processes; forward signals; stop all if one dies."""
    workdir = tempfile.mkdtemp(prefix="bertserve-")
    os.chmod(workdir, 0o700)
    metrics_dir = os.path.join(workdir, "metrics")
    os.mkdir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the children when they import prometheus
    path = f"ipc://{workdir}/engine.sock"
    if settings.port == 0:  # every API process must bind the same port: choose it here
        with socket.socket() as probe_sock:
            probe_sock.bind((settings.host, 0))
            settings = settings.model_copy(update={"port": probe_sock.getsockname()[1]})
    dump = settings.model_dump()
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    me = os.getpid()
    engine = spawn.Process(target=engine_main, args=(dump, path, child, me), name="bertserve-engine")
    stopping = False
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
            spawn.Process(target=api_main, args=(dump, path, i, me), name=f"bertserve-api-{i}")
            for i in range(settings.api_workers)
        ]
        for proc in apis:
            proc.start()
        log.info("supervisor: engine pid %d, %d API processes on port %d", engine.pid, len(apis), settings.port)
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
                log.critical(
                    "%s (pid %s) exited unexpectedly with status %s; stopping the server",
                    dead.name,
                    dead.pid,
                    dead.exitcode,
                )
                _terminate([engine, *apis])
                return 1
            if stopping and not any(p.is_alive() for p in apis):
                failed = [p for p in apis if p.exitcode not in (0, None)]
                if engine.is_alive():
                    os.kill(engine.pid or 0, signal.SIGTERM)
                engine.join(settings.drain_timeout_s + 5)
                _terminate([engine])
                return 1 if failed else 0
    finally:
        _terminate([p for p in multiprocessing.active_children()])
        shutil.rmtree(workdir, ignore_errors=True)


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
