"""`python -m service`: settings -> processes -> serve.

One API process (the default): the engine runs in this process and a request is a method call away from the
batcher. With ``--api-workers N`` (N > 1) this process becomes a supervisor (service/ipc/supervisor.py): one
engine process per device and N API processes that share the HTTP and gRPC ports. SIGTERM drains: see
service/frontend/lifecycle.py.
"""

from __future__ import annotations

import os
import sys

# The service's parallelism comes from requests (API processes, inference threads); the tokenizer's own rayon
# pool only competes with them for the same cores (docs/SERVICE.md). It reads the variable when it first runs,
# so set it before anything tokenizes; a user's value wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ONNX Runtime's official Linux builds (1.29+) initialise Microsoft's 1DS telemetry on import: a device id written
# under ~/.cache (a warning on a read-only root filesystem) and events for upload. A server, often air-gapped,
# sends nothing anywhere unless its operator says so; ORT reads the variable at import, so set it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from service.config import Settings, parse_args
from service.logs import configure_logging


def run_in_process(settings: Settings) -> int:
    """One process: verify the bundle(s) and create the sessions before listening (a bad bundle never serves),
    then serve; the engine warms up while the server already answers liveness."""
    from service.core import DataPlane
    from service.engine import Engine
    from service.frontend.server import serve
    from service.metrics import Metrics
    from service.tracing import setup_tracing

    metrics = Metrics()
    tracing = setup_tracing()
    engine = Engine(settings, metrics, tracing)
    try:
        engine.prepare()
    except Exception as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    return serve(settings, DataPlane(settings, engine, metrics), metrics, tracing)


def main(argv: list[str] | None = None) -> int:
    try:
        settings: Settings = parse_args(argv)
    except Exception as exc:  # pydantic's message names the bad setting
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    if settings.api_workers > 1:
        from service.ipc.supervisor import supervise

        return supervise(settings)
    return run_in_process(settings)


if __name__ == "__main__":
    sys.exit(main())
