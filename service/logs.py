"""Logging: text or JSON lines, a request id on every line about a request, and no secret in any line.

- `configure_logging` installs one handler on the root logger and routes uvicorn's loggers to it, so everything the
  process logs goes through the same request-id filter, redaction filter and formatter. (Uvicorn must be started
  with `log_config=None`, or it installs its own handlers again.)
- `request_id` is a ContextVar: set it once per request (asyncio tasks copy the context), every line logged while
  it is set carries it, in whichever module the line is logged.
- Redaction is a filter on the handler rather than care at each call site, because the lines that leak keys are the
  ones nobody meant to write (a logged header dict, an exception message quoting a request). The filter rewrites
  the record itself (message with args merged, exception and stack text, extra fields, request id) and the
  formatter scrubs the finished line once more, so a secret is caught whatever path it takes into the output.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal

__all__ = [
    "ACCESS_LOGGER",
    "REDACTED",
    "Redactor",
    "access_logger",
    "configure_logging",
    "log_access",
    "new_request_id",
    "request_id",
    "valid_request_id",
]

REDACTED = "[REDACTED]"
ACCESS_LOGGER = "bertserve.access"

#: The id of the request being handled in this context (None outside requests).
request_id: ContextVar[str | None] = ContextVar("bertserve_request_id", default=None)

access_logger = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# `Authorization: <scheme> <credentials>` in any spelling a log line can carry it: an HTTP header line, a dict or
# tuple repr (`'authorization': 'Bearer x'`, `(b'authorization', b'Bearer x')`), `authorization=...`. The value
# ends at a quote, whitespace after the credentials, or a separator. A comma separates only after a quote (a tuple
# repr), so prose such as "authorization, then ..." is left alone.
_AUTH_HEADER = (
    r"(?P<auth>(?:proxy-)?authorization|x-api-key|api[-_]?key)"  # the header (or setting) name
    r"""(?P<sep>['"]\s*[:=,]\s*(?:b?['"])?|\s*[:=]\s*(?:b?['"])?)"""  # `: `, `=`, `': '`, `', b'`
    r"(?:(?:bearer|basic|token|apikey)\s+)?"  # an optional scheme
    r"""[^\s'",;)}\]]+"""  # the credentials
)
_BEARER = r"(?P<bearer>\bbearer\s+)[A-Za-z0-9\-._~+/]+=*"


class Redactor:
    """Replaces configured secret values and credential patterns in text with REDACTED."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        literals = sorted({s for s in secrets if s}, key=len, reverse=True)
        parts = [_AUTH_HEADER, _BEARER] + [f"(?:{re.escape(s)})" for s in literals]
        self._pattern = re.compile("|".join(parts), re.IGNORECASE)
        # Substrings without which no alternative can match: checked on the lower-cased text first, because
        # `in` scans at memchr speed while the regex, case-insensitive with a dozen alternatives, costs
        # microseconds per line, and almost no line holds anything to redact.
        self._triggers = ("auth", "key", "bearer", *(s.lower() for s in literals))

    def _replace(self, match: re.Match[str]) -> str:
        if match.group("auth") is not None:
            return f"{match.group('auth')}{match.group('sep')}{REDACTED}"
        if match.group("bearer") is not None:
            return f"{match.group('bearer')}{REDACTED}"
        return REDACTED

    def __call__(self, text: str) -> str:
        lower = text.lower()
        for trigger in self._triggers:
            if trigger in lower:
                return self._pattern.sub(self._replace, text)
        return text

    def value(self, value: Any) -> Any:
        """A redacted copy of a field value: strings scrubbed, containers walked, other values left alone
        unless their text shows a secret (then their redacted text replaces them)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            return {self(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
        scrubbed = self(text)
        return scrubbed if scrubbed != text or isinstance(value, bytes | bytearray) else value


class RedactFilter(logging.Filter):
    """Handler filter: rewrites every record so that no secret survives into any formatter."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        # Merge args into the message first: a secret can hide in either, and the formatter would merge them anyway.
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = self.redact.value(fields)
        rid = getattr(record, "request_id", None)
        if rid:
            record.request_id = self.redact(rid)
        return True


class RequestIdFilter(logging.Filter):
    """Handler filter: stamps the current request id (or keeps one the caller passed in `extra`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


_second: list[Any] = [None, ""]  # the last second formatted, and its text: lines come many to a second


def _utc_iso(created: float) -> str:
    """ISO 8601 UTC with milliseconds (`2026-11-30T21:08:01.123Z`); the seconds part is formatted once a second."""
    second = int(created)
    if _second[0] != second:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = second
    return f"{_second[1]}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the record's `fields`, exc/stack."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        out.update(
            time=_utc_iso(record.created),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            request_id=getattr(record, "request_id", None),
        )  # the core keys win over fields of the same name
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return self.redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message key=value ...`: for people reading a terminal."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self.redact = redactor

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return self.redact(line)


#: Loggers that uvicorn configures with their own handlers: sent to the root handler instead.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def configure_logging(level: str, fmt: Literal["text", "json"], secrets: Sequence[str] = ()) -> None:
    """Route all of the process's logging through one stderr handler with request ids and redaction.

    Idempotent: calling it again (a reload with a new key) replaces the handler. `secrets` are values that must
    never appear in output (the API key); `Authorization`/`Bearer` credentials are redacted whatever their value.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("bertserve")
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter(redactor))
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "bertserve":  # ours, from an earlier call: replaced
            root.removeHandler(old)
            old.close()
        else:  # someone else's (a test's capture handler, a library's): stamped and redacted too
            for f in [f for f in old.filters if isinstance(f, RequestIdFilter | RedactFilter)]:
                old.removeFilter(f)
            old.addFilter(RequestIdFilter())
            old.addFilter(RedactFilter(redactor))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:  # whatever configured them before (uvicorn's own config, a library): the root decides
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
    logging.captureWarnings(True)


def log_access(method: str, route: str, status: int, duration_ms: float) -> None:
    """One access-log line (logger `bertserve.access`, INFO): `GET /v1/predict 200 3.2ms` plus the same as fields.

    `route` should be the route template (`/v2/models/{name}/infer`), not the raw path, so that lines group.
    Costs one isEnabledFor check when the access logger is off (its level above INFO, or disabled).
    """
    if not access_logger.isEnabledFor(logging.INFO):
        return
    fields = {"method": method, "route": route, "status": status, "duration_ms": round(duration_ms, 3)}
    access_logger.info("%s %s %d %.1fms", method, route, status, duration_ms, extra={"fields": fields})


_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A fresh request id: this process's 32 random bits and a counter, 16 hex digits in all.

    No system call per request: os.urandom releases the GIL for its syscall, and on the event-loop thread that
    invites a switch to the inference threads on every request (a visible share of the event loop's samples
    under load). Unique within a process by the counter, across processes and restarts by the random prefix.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def valid_request_id(value: str) -> bool:
    """Whether a client's X-Request-ID may be used as is: 1-128 characters of [A-Za-z0-9._:-].

    Anything else (spaces, quotes, control characters, newlines) could forge or break log lines: generate one.
    """
    return _REQUEST_ID.fullmatch(value) is not None
