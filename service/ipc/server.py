"""The engine process's loop: requests in from every API process, results back in one message per round.

A ROUTER socket: each API process is a peer (its DEALER identity). Submits go straight to the engine's batchers;
their results are queued per peer and flushed in one message per event-loop round (with the engine's model
table generation and readiness, so every API process learns of a reload or of readiness with its next
results). Calls are the engine's administration, dispatched by name through :attr:`EngineServer.METHODS`.

Readiness is global: the server is ready (in every process) only when the engine is and every API process has
fetched its model table. Shutdown is barrier-ordered (service/frontend/lifecycle.py): every API process reports
its listener closed, and waits until all have, before any connection closes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from service.engine import Engine
from service.errors import BadRequest
from service.ipc import codec


class EngineServer:
    """Serves one :class:`~service.engine.Engine` to every API process over a zmq ROUTER socket."""

    #: The engine calls an API process may make, by name (anything else is refused).
    METHODS = (
        "descriptors",
        "stats",
        "index",
        "load",
        "unload",
        "reload",
        "ping",
        "api_ready",
        "listener_closed",
        "listeners_all_closed",
    )

    def __init__(self, engine: Engine, path: str, api_workers: int) -> None:
        import zmq
        import zmq.asyncio

        self.engine = engine
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(path)
        self.api_workers = api_workers
        self.apis_ready: set[int] = set()
        self.listeners_closed: set[int] = set()
        self._outbox: dict[bytes, list[codec.Reply]] = {}
        self._flush_scheduled = False
        self._cancelled: set[tuple[bytes, int]] = set()
        self._peers: set[bytes] = set()  # every API process that has written to us
        self._announced: tuple[int, bool] | None = None
        self._methods: dict[str, Callable[[list[Any]], Awaitable[Any]]] = {
            name: getattr(self, f"_call_{name}") for name in self.METHODS
        }

    def state(self) -> tuple[int, bool]:
        return self.engine.generation, self.engine.ready and len(self.apis_ready) >= self.api_workers

    # -- replies --------------------------------------------------------------------------------------------
    def _reply(self, identity: bytes, reply: codec.Reply) -> None:
        self._outbox.setdefault(identity, []).append(reply)
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
        for identity, replies in outbox.items():
            frame = codec.encode(codec.Results(state[0], state[1], replies))
            self.socket.send_multipart([identity, frame], copy=False)

    # -- inference --------------------------------------------------------------------------------------------
    def _submit(self, identity: bytes, requests: list[codec.Request]) -> None:
        self._peers.add(identity)
        for request in requests:
            key = (identity, request.rid)

            def gone(key: tuple[bytes, int] = key) -> bool:
                return key in self._cancelled

            trace = (int(request.trace[0], 16), request.trace[1]) if request.trace else None
            try:
                seqs = codec.token_seqs(request.seqs)
                future = self.engine.submit(request.model, request.version, seqs, request.deadline, gone, trace)
            except Exception as exc:
                self._reply(identity, codec.Reply(request.rid, failure=codec.failure(exc)))
                continue
            future.add_done_callback(functools.partial(self._done, identity, request.rid))

    def _done(self, identity: bytes, rid: int, future: asyncio.Future[Any]) -> None:
        self._cancelled.discard((identity, rid))
        exc = future.exception()
        if exc is not None:
            self._reply(identity, codec.Reply(rid, failure=codec.failure(exc)))
        else:
            self._reply(identity, codec.Reply(rid, outcome=codec.outcome(future.result())))

    # -- administration -------------------------------------------------------------------------------------
    async def _call(self, identity: bytes, call: codec.Call) -> None:
        self._peers.add(identity)
        try:
            method = self._methods.get(call.method)
            if method is None:
                raise BadRequest(f"unknown engine call {call.method!r}")
            value = await method(call.args)
        except Exception as exc:
            self._reply(identity, codec.Reply(call.rid, failure=codec.failure(exc)))
        else:
            self._reply(identity, codec.Reply(call.rid, value=value))

    async def _call_descriptors(self, _: list[Any]) -> Any:
        return [self.engine.generation, [asdict(d) for d in self.engine.descriptors()]]

    async def _call_stats(self, _: list[Any]) -> Any:
        return [[name, version, stats] for (name, version), stats in (await self.engine.stats()).items()]

    async def _call_index(self, _: list[Any]) -> Any:
        return [asdict(entry) for entry in await self.engine.repository_index()]

    async def _call_load(self, args: list[Any]) -> Any:
        await self.engine.load(str(args[0]))

    async def _call_unload(self, args: list[Any]) -> Any:
        await self.engine.unload(str(args[0]))

    async def _call_reload(self, args: list[Any]) -> Any:
        return asdict(await self.engine.reload(args[0], args[1]))

    async def _call_ping(self, _: list[Any]) -> Any:
        return None  # the reply carries the engine's generation and readiness

    async def _call_api_ready(self, args: list[Any]) -> Any:
        self.apis_ready.add(int(args[0]))

    async def _call_listener_closed(self, args: list[Any]) -> Any:
        self.listeners_closed.add(int(args[0]))
        return len(self.listeners_closed) >= self.api_workers

    async def _call_listeners_all_closed(self, _: list[Any]) -> Any:
        return len(self.listeners_closed) >= self.api_workers

    # -- the loop -------------------------------------------------------------------------------------------
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
            message = codec.decode_for_engine(frame)
            if isinstance(message, codec.Submit):
                self._submit(identity, message.requests)
            elif isinstance(message, codec.Cancel):
                self._cancelled.update((identity, rid) for rid in message.rids)
            else:
                task = asyncio.ensure_future(self._call(identity, message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await self.engine.close()
        self._flush()
        self.socket.close(linger=500)
        self.context.term()
