"""Every error the service answers with: one taxonomy, one mapping to HTTP status, gRPC code and rejection reason.

Each class carries its HTTP status, a machine-readable ``type`` (unique: it names the class on the wire between
processes), the gRPC status code name (a string, so this module does not import grpc) and the ``reason`` label
it is counted under in ``bertserve_rejected_total`` (None: not a rejection, or counted where it is detected).
Every class is built the same way, ``cls(message, headers)``, so :func:`from_wire` can rebuild any of them.
Protocol modules turn a :class:`ServeError` into their own error shape; none of them decides a status on its own.
"""

from __future__ import annotations

from typing import ClassVar


class ServeError(Exception):
    """Base of every error a client can be answered with."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = "bad_request"
    grpc: ClassVar[str] = "INVALID_ARGUMENT"
    reason: ClassVar[str | None] = "invalid"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServeError):
    status, type = 400, "bad_request"


class Unprocessable(ServeError):
    status, type = 422, "validation_error"


class UnsupportedMediaType(ServeError):
    status, type = 415, "unsupported_media_type"


class Unauthorized(ServeError):
    status, type, grpc, reason = 401, "unauthorized", "UNAUTHENTICATED", "unauthorized"

    def __init__(
        self,
        message: str = "missing or invalid API key; send `Authorization: Bearer <key>`",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, headers or {"WWW-Authenticate": "Bearer"})


class Forbidden(ServeError):
    status, type, grpc, reason = 403, "forbidden", "PERMISSION_DENIED", "unauthorized"


class NotFound(ServeError):
    status, type, grpc, reason = 404, "not_found", "NOT_FOUND", None


class Conflict(ServeError):
    status, type, grpc, reason = 409, "conflict", "FAILED_PRECONDITION", None


class PayloadTooLarge(ServeError):
    status, type, grpc, reason = 413, "payload_too_large", "RESOURCE_EXHAUSTED", "too_large"


class TextTooLong(Unprocessable):
    type = "text_too_long"


class QueueFull(ServeError):
    """The queue cannot take the request's sequences; retry after the ``Retry-After`` header's seconds."""

    status, type, grpc, reason = 429, "queue_full", "RESOURCE_EXHAUSTED", "queue_full"

    @classmethod
    def retry_in(cls, seconds: int) -> QueueFull:
        return cls(f"queue full; retry after {seconds} s", {"Retry-After": str(seconds)})


class NotReady(ServeError):
    status, type, grpc, reason = 503, "not_ready", "UNAVAILABLE", "not_ready"


class Draining(NotReady):
    """The model no longer accepts work (shutdown, unload or a model swap in progress)."""

    type = "draining"


class DeadlineExceeded(ServeError):
    """The request's deadline passed before its inputs were computed (counted where detected)."""

    status, type, grpc, reason = 504, "deadline_exceeded", "DEADLINE_EXCEEDED", None


class InferenceFailed(ServeError):
    """The batch holding the request raised in the model runtime; only that batch's requests fail."""

    status, type, grpc, reason = 500, "inference_failed", "INTERNAL", None


class Disconnected(Exception):
    """The client went away before its answer was ready: normal, counted, never logged above debug."""

    type = "disconnected"


# The error table, for the README and the tests: class -> (HTTP status, type, gRPC code).
TABLE: tuple[type[ServeError], ...] = (
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unprocessable,
    TextTooLong,
    QueueFull,
    InferenceFailed,
    NotReady,
    Draining,
    DeadlineExceeded,
)


_BY_TYPE: dict[str, type[ServeError]] = {cls.type: cls for cls in TABLE}  # unique types: tests/unit/test_errors.py


def to_wire(exc: BaseException) -> tuple[str, str, dict[str, str]]:
    """(type, message, headers) of an error raised in the engine process, for the API process that asked."""
    if isinstance(exc, ServeError):
        return exc.type, exc.message, exc.headers
    if isinstance(exc, Disconnected):
        return Disconnected.type, "", {}
    return InferenceFailed.type, f"{type(exc).__name__}: {exc}", {}


def from_wire(kind: str, message: str, headers: dict[str, str]) -> Exception:
    """The error :func:`to_wire` described, rebuilt in the API process (an unknown type fails the request)."""
    if kind == Disconnected.type:
        return Disconnected()
    cls = _BY_TYPE.get(kind)
    if cls is None:
        return InferenceFailed(f"{kind}: {message}")
    return cls(message, headers)
