"""Placeholder with the agreed API until the logging module lands (replaced wholesale)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_logger = logging.getLogger("bertserve.access")


def configure_logging(level: str, fmt: str = "text", secrets: Sequence[str] = ()) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def new_request_id() -> str:
    return os.urandom(8).hex()


def valid_request_id(value: str) -> bool:
    return bool(_ID.match(value))


def log_access(method: str, route: str, status: int, duration_ms: float) -> None:
    access_logger.info("%s %s %d %.2fms", method, route, status, duration_ms)
