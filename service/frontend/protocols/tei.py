"""Hugging Face text-embeddings-inference's classification route, ``POST /predict``, so TEI's clients work
unchanged (router/src/http/types.rs and server.rs in TEI's repository).

``{"inputs": text | [texts] | [a, b] (pair models) | [[a, b], ...], "truncate": false, "raw_scores": false,
"truncation_direction": "Right"}`` -> ``[{"score", "label"}...]`` sorted by score for one input, a list of such
lists for several. Errors are TEI's ``{"error", "error_type"}`` with TEI's error types (validation, tokenizer,
overloaded, unhealthy, backend, empty); statuses are bertserve's error table, the same as every route's. Like
TEI, ``truncate`` defaults to false: a text over the model's length is an error unless the client asks.
"""

from __future__ import annotations

import msgspec
import orjson

from service.config import Settings
from service.core import DataPlane, InferResult
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    QueueFull,
    ServeError,
    TextTooLong,
    Unprocessable,
)
from service.frontend.kit import (
    Ctx,
    HotRoute,
    Inputs,
    Reply,
    Routes,
    body_schema,
    error_docs,
    json_request,
    operation,
    split_inputs,
)


class TeiPredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: Inputs
    truncate: bool | None = None  # default false, as TEI's
    raw_scores: bool = False
    truncation_direction: str = "Right"  # "Right" (or "right"); "Left" is refused
    model: str | None = None  # bertserve's addition, for several models


class TeiScore(msgspec.Struct):
    score: float
    label: str


class TeiError(msgspec.Struct):
    error: str
    error_type: str


def tei_error(exc: ServeError, _: str) -> bytes:
    """TEI's ``{"error", "error_type"}``; the type from TEI's ErrorType enum, by what went wrong."""
    if isinstance(exc, TextTooLong):
        kind = "tokenizer"
    elif isinstance(exc, QueueFull):
        kind = "overloaded"
    elif isinstance(exc, NotReady):
        kind = "unhealthy"
    elif isinstance(exc, InferenceFailed | DeadlineExceeded):
        kind = "backend"
    elif "empty" in exc.message:
        kind = "empty"
    else:
        kind = "validation"
    return orjson.dumps({"error": exc.message, "error_type": kind})


def encode_tei(result: InferResult, raw_scores: bool, single: bool) -> bytes:
    """``[{"score", "label"}...]`` sorted by score, per input; one input unwrapped, as TEI answers."""
    values = (result.logits if raw_scores else result.scores).tolist()
    names = result.model.labels
    rows = [
        [{"score": row[i], "label": names[i]} for i in sorted(range(len(row)), key=row.__getitem__, reverse=True)]
        for row in values
    ]
    return orjson.dumps(rows[0] if single else rows)


def routes(settings: Settings, plane: DataPlane) -> Routes:

    async def predict(ctx: Ctx) -> Reply:
        request = await json_request(ctx, settings, plane, TeiPredictRequest)
        if request.truncation_direction.lower() not in ("right", "left"):
            raise Unprocessable('truncation_direction: expected "Right" or "Left"')
        if request.truncation_direction.lower() == "left":
            raise Unprocessable('truncation_direction: only "Right" is supported')
        view = plane.model(request.model)
        texts, pairs, single = split_inputs(request.inputs, view.pair)
        result = await plane.infer(view, texts, pairs, ctx.call, truncate=bool(request.truncate))
        return Reply(encode_tei(result, request.raw_scores, single), timed=True)

    error = body_schema(TeiError)
    statuses = (400, 404, 413, 415, 422, 429, 503, 504, *((401,) if settings.api_key else ()))
    ok = {
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "array", "items": body_schema(TeiScore)},
                        {"type": "array", "items": {"type": "array", "items": body_schema(TeiScore)}},
                    ]
                }
            }
        }
    }
    summary = "Classify with TEI's request and response (text-embeddings-inference /predict)"
    doc = operation(summary, "TEI", TeiPredictRequest, ok, error_docs(*sorted(statuses), schema=error))
    return Routes(
        [HotRoute("POST", "/predict", predict, doc, tei_error)], None, (TeiPredictRequest, TeiScore, TeiError)
    )
