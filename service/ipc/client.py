"""The engine as an API process sees it over IPC: :class:`RemoteEngine`, a :class:`service.core.EngineClient`.

Submissions made in one event-loop round leave in one message; every reply resolves its request's future. A
watcher keeps the model table fresh (a reply carries the engine's generation and readiness; a ping every 0.25 s
keeps them coming when idle) and tells the engine which requests' clients went away, so they cost no compute.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.catalog import ModelDescriptor, RepositoryEntry
from service.ipc import codec
from service.modelio import TokenSeq

log = logging.getLogger("bertserve.ipc")

GONE_SCAN_S = 0.02  # how often an API process tells the engine which of its clients went away
PING_S = 0.25  # how often an idle API process asks for the engine's generation and readiness


@dataclass(slots=True)
class RemoteResult:
    """A finished request as it comes back from the engine process (the fields of a batching Job it carries)."""

    logits: Any
    scores: Any
    predicted: list[list[int]]
    queue_s: float
    inference_s: float
    batches: list[tuple[int, float, float]]


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    gone: Callable[[], bool] | None  # a submitted request's probe; None for a call


class RemoteEngine:
    """The engine in the engine process, reached over a zmq DEALER socket."""

    def __init__(self, path: str, index: int = 0) -> None:
        self.path = path
        self.index = index  # this API process's number, for the readiness report and the drain barrier
        self.generation = -1
        self.ready = False
        self._descriptors: list[ModelDescriptor] = []
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[codec.Request] = []
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._flush_scheduled = False
        self._known_generation = -1
        self._reported = False

    # -- EngineClient ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.path)
        self._tasks = [asyncio.ensure_future(self._receive()), asyncio.ensure_future(self._watch())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.socket.close(linger=0)
        self.context.term()

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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = _Pending(future, gone)
        trace = (f"{link[0]:032x}", link[1]) if link else None  # the 128-bit trace id travels as hex
        self._outbox.append(codec.Request(rid, name, version, codec.seqs_of(list(seqs)), deadline, trace))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def load(self, name: str) -> None:
        await self._call("load", name)

    async def unload(self, name: str) -> None:
        await self._call("unload", name)

    async def reload(self, model_dir: str | None, variant: str | None) -> ModelDescriptor:
        return ModelDescriptor(**await self._call("reload", model_dir, variant))

    async def stats(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(name, version): stats for name, version, stats in await self._call("stats")}

    async def repository_index(self) -> list[RepositoryEntry]:
        return [RepositoryEntry(**entry) for entry in await self._call("index")]

    async def refresh(self) -> None:
        generation, descriptors = await self._call("descriptors")
        self._descriptors = [ModelDescriptor(**d) for d in descriptors]
        self.generation = generation
        if self._descriptors and not self._reported:
            self._reported = True
            await self._call("api_ready", self.index)

    async def drain_barrier(self, timeout_s: float = 5.0) -> None:
        """Report this process's listener closed; return once every API process's is, or after timeout_s (the
        engine may be gone: the supervisor died and took it along)."""

        async def wait_for_all() -> None:
            done = await self._call("listener_closed", self.index)
            while not done:
                await asyncio.sleep(0.01)
                done = await self._call("listeners_all_closed")

        try:
            await asyncio.wait_for(wait_for_all(), timeout_s)
        except TimeoutError:
            log.warning("drain: not every API process reported its listener closed within %.0f s", timeout_s)

    # -- internals ------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        requests, self._outbox = self._outbox, []
        if requests:
            self.socket.send(codec.encode(codec.Submit(requests)), copy=False)

    async def _call(self, method: str, *args: Any) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, None)
        await self.socket.send(codec.encode(codec.Call(rid, method, list(args))))
        return await future

    async def _receive(self) -> None:
        while True:
            results = codec.decode_for_api(await self.socket.recv())
            self.ready = results.ready
            if results.generation != self._known_generation:
                self._known_generation = results.generation
                self._spawn(self.refresh())
            for reply in results.replies:
                pending = self._pending.pop(reply.rid, None)
                if pending is None or pending.future.done():
                    continue
                if reply.failure is not None:
                    pending.future.set_exception(codec.error(reply.failure))
                elif reply.outcome is not None:
                    pending.future.set_result(_result(reply.outcome))
                else:
                    pending.future.set_result(reply.value)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch(self) -> None:
        """Keep the model table fresh (readiness, reloads) and tell the engine which clients went away."""
        last_ping = 0.0
        while True:
            await asyncio.sleep(GONE_SCAN_S)
            gone = [rid for rid, p in self._pending.items() if p.gone is not None and p.gone()]
            if gone:
                await self.socket.send(codec.encode(codec.Cancel(gone)))
            now = time.monotonic()
            if now - last_ping > PING_S:
                last_ping = now
                self._spawn(self._call("ping"))


def _result(outcome: codec.Outcome) -> RemoteResult:
    return RemoteResult(
        codec.array(outcome.logits, outcome.rows),
        codec.array(outcome.scores, outcome.rows),
        outcome.predicted,
        outcome.queue_s,
        outcome.inference_s,
        outcome.batches,
    )
