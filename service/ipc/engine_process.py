"""The engine process: prepare every model (a bad bundle stops the server before it listens), then serve the
API processes (service/ipc/server.py) until SIGTERM; SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from service.engine import Engine
from service.ipc.child import settings_for_child
from service.ipc.server import EngineServer
from service.metrics import Metrics
from service.tracing import setup_tracing

log = logging.getLogger("bertserve.ipc")


def main(settings_dump: dict[str, Any], path: str, conn: Connection, parent: int) -> None:
    settings = settings_for_child(settings_dump, parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor orchestrates shutdown
    tracing = setup_tracing()
    engine = Engine(settings, Metrics(), tracing)
    try:
        engine.prepare()
    except Exception as exc:
        conn.send(("error", str(exc)))
        sys.exit(2)
    conn.send(("prepared", None))

    async def serve() -> None:
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
        uvloop.run(serve())
    finally:
        tracing.shutdown()


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    """Warm-up failed: the engine cannot serve; exit so the supervisor stops the server with a message."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("cannot start: %s", task.exception())
        os._exit(2)


async def _reload_quietly(engine: Engine) -> None:
    try:
        await engine.reload(None, None)
    except Exception as exc:
        log.error("SIGHUP reload failed; still serving the old model: %s", exc)
