"""Every error the service answers with: one taxonomy, one mapping to HTTP status, gRPC code and rejection reason.

Each class carries its HTTP status, a machine-readable ``type``, the gRPC status code name (a string, so this
module does not import grpc) and the ``reason`` label it is counted under in ``bertserve_rejected_total`` (None:
not a rejection, or counted where it is detected). Protocol modules turn a :class:`ServeError` into their own
error shape; none of them decides a status on its own.
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

    def __init__(self, message: str = "missing or invalid API key; send `Authorization: Bearer <key>`") -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


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
    """The queue cannot take the request's sequences; retry after ``retry_after`` seconds."""

    status, type, grpc, reason = 429, "queue_full", "RESOURCE_EXHAUSTED", "queue_full"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s", {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


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
