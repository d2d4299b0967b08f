"""The lifecycle in one place: load and warm, ready, reload (also on SIGHUP), drain on SIGTERM, stop.

Drain, as a graceful server should: on SIGTERM readiness turns 503 at once; the listener keeps accepting for
``drain_delay_s`` (so load balancers see the pod leave first), then closes; every request that reaches an open
connection is still answered, with ``Connection: close``; idle keep-alive connections are closed only by their
idle timeout, never under a request the client may already have sent (uvicorn's own shutdown closes them at
once, which loses requests in flight on the wire: :class:`GracefulHttpToolsProtocol`). Then the engine drains
(everything admitted is answered) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core import DataPlane
from service.frontend.wire import CoalescingTransport

log = logging.getLogger("bertserve.lifecycle")


def settle_heap() -> None:
    """Move every object alive after start-up (app, sessions, tokenizers) out of the GC's reach.

    They live as long as the process, yet every full collection would walk them again; at thousands of
    requests/s the young generations fill often and full collections add latency spikes to the event loop
    (the same reason CPython's docs suggest gc.freeze() after start-up). Objects created later are collected
    as usual.
    """
    gc.collect()
    gc.freeze()


class DrainGate:
    """When connections may start closing: at once with one process; with several, only after every API
    process has closed its listener.

    With SO_REUSEPORT each API process has its own listener, and Linux resets the connections still in a
    listener's accept queue when it closes. A client told ``Connection: close`` by one process reconnects at
    once; if another process's listener is still open the connect succeeds, and when that listener closes a
    moment later the request already sent on it is reset. So connections are closed only once no listener
    is left: reconnects are then refused, never reset. Until then they are served with keep-alive as usual.
    """

    def __init__(self) -> None:
        self.released = True
        self.pending: list[GracefulHttpToolsProtocol] = []
        # set by an API process: report our listener closed, wait for the others (the engine counts)
        self.barrier: Callable[[], Awaitable[None]] | None = None

    def hold(self) -> None:
        self.released = self.barrier is None

    async def release_after_barrier(self) -> None:
        if self.barrier is not None:
            try:
                await self.barrier()
            except Exception as exc:  # the engine is gone: nothing left to wait for
                log.warning("drain barrier failed (%s); closing connections now", exc)
        self.released = True
        pending, self.pending = self.pending, []
        for protocol in pending:
            protocol.begin_closing()


GATE = DrainGate()


class GracefulHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, except that shutdown never closes a connection a request may be on, and
    each response leaves in one write (service/frontend/wire.py)."""

    closing = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # the cycle writes through this (flow control keeps the real transport): one write per response
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

    def shutdown(self) -> None:
        if not GATE.released:
            GATE.pending.append(self)
            return
        self.begin_closing()

    def begin_closing(self) -> None:
        if self.transport.is_closing():
            return
        self.closing = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answer this request with Connection: close, then close
        elif self.timeout_keep_alive_task is None:  # idle with no timer yet (no request so far): arm it
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.closing and self.cycle is not None:
            self.cycle.keep_alive = False


class Lifecycle:
    """Owns the engine's start and close (through the data plane) and the other servers of this process."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.on_fatal: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # (start, stop) coroutine functions of other servers in this process (the gRPC server)
        self.hooks: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def startup(self) -> None:
        """Start the engine in the background (the server listens meanwhile: liveness 200, readiness 503 until it
        is warm), then the other servers."""
        self.spawn(self._start_engine())
        for start, _ in self.hooks:
            await start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload_quietly()))

    async def _start_engine(self) -> None:
        try:
            await self.plane.start()
        except Exception as exc:
            log.critical("cannot start: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        for view in self.plane.views().values():
            d = view.desc
            log.info("ready: %s:%s variant=%s providers=%s", view.name, view.version, d.variant, d.providers)
        settle_heap()

    async def reload_quietly(self) -> None:
        try:
            await self.plane.reload(None, None)
        except Exception as exc:
            log.error("SIGHUP reload failed; still serving the old model: %s", exc)

    async def shutdown(self) -> None:
        self.plane.draining = True
        for _, stop in self.hooks:
            await stop()
        await self.plane.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain-aware SIGTERM (readiness first, listener later, exit status 0)."""

    def __init__(self, config: uvicorn.Config, plane: DataPlane, drain_delay_s: float) -> None:
        super().__init__(config)
        self.plane = plane
        self.drain_delay_s = drain_delay_s
        self.failed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        """uvicorn's shutdown (listeners closed first), with connections closed only once the gate opens."""
        GATE.hold()
        release = asyncio.ensure_future(GATE.release_after_barrier())
        await super().shutdown(sockets)
        await release

    def fail(self) -> None:
        self.failed = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's, this does not re-raise the signal after shutdown, so a drained exit is status 0.
        if self.plane.draining:  # a second signal: stop waiting
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.plane.draining = True  # readiness 503; requests are still served until the listener closes
        log.info("signal %d: draining (readiness 503; stop accepting in %.1f s)", sig, self.drain_delay_s)
        if self.drain_delay_s > 0 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, self.drain_delay_s, self._stop)
        else:
            self.should_exit = True

    def _stop(self) -> None:
        self.should_exit = True
