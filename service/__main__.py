"""`python -m service`: settings -> app -> uvicorn, with a drain-aware SIGTERM.

On SIGTERM readiness turns 503 at once; requests keep being served for BERTSERVE_DRAIN_DELAY_S (so load
balancers see the pod leave before it stops listening), then uvicorn stops accepting, waits for in-flight
requests (which include everything queued in the batcher) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from service.api import AppState, create_app
from service.bundle import BundleError
from service.config import Settings, parse_args
from service.engine import Engine
from service.metrics import Metrics
from service.runtime import ProviderError

log = logging.getLogger("bertserve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.failed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        self.state.on_fatal = self.fail
        await super().serve(sockets)

    def fail(self) -> None:
        self.failed = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's, this does not re-raise the signal after shutdown, so a drained exit is status 0.
        if self.state.draining:  # a second signal: stop waiting
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True  # readiness 503; requests are still served until uvicorn stops accepting
        delay = self.state.settings.drain_delay_s
        log.info("signal %d: draining (readiness 503; stop accepting in %.1f s)", sig, delay)
        if delay > 0 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._stop)
        else:
            self.should_exit = True

    def _stop(self) -> None:
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    try:
        settings: Settings = parse_args(argv)
    except Exception as exc:  # pydantic's message names the bad setting
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    metrics = Metrics()
    try:  # verify the bundle and create the session before listening: a bad bundle never serves
        engine = Engine.load(settings, metrics)
    except (BundleError, ProviderError) as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. a model file ONNX Runtime cannot parse: one line, not a traceback
        print(f"error: cannot start: {settings.model_dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, engine, metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",
        http="auto",
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = DrainingServer(config, app.state.bertserve)
    try:
        server.run()
    except SystemExit as exc:  # start-up failure raised in the lifespan
        return int(exc.code or 2) if isinstance(exc.code, int) else 2
    if not server.started or server.failed:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
