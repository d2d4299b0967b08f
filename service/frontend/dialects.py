"""Other servers' classification APIs, so their clients work unchanged: TEI's ``POST /predict`` and vLLM's
``POST /classify``.

Both are hot routes (registered with :meth:`Front.route`, run by the shared kit: timing headers, metrics,
access log) over the same data plane, batcher and API key as the native API; FastAPI declares them only for
the OpenAPI document. Each keeps its server's request, response and error shapes:

- TEI (router/src/http/types.rs, server.rs): ``{"inputs": text | [texts] | [a, b] (pair models) | [[a, b], ...],
  "truncate": false, "raw_scores": false, "truncation_direction": "Right"}`` -> ``[{"score", "label"}...]``
  sorted by score for one input, a list of such lists for several; errors ``{"error", "error_type"}`` with
  TEI's error types (validation, tokenizer, overloaded, unhealthy, backend, empty). Like TEI, ``truncate``
  defaults to false: a text over the model's length is an error unless the client asks for truncation.
- vLLM (entrypoints/.../classify/protocol.py): ``{"model", "input": text | [texts], "truncate_prompt_tokens"}``
  -> ``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs", "num_classes"}],
  "usage"}``; errors ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status, as
  vLLM's ErrorInfo has it. Unknown request fields are ignored, as vLLM's OpenAIBaseModel does.

Statuses are bertserve's error table (errors.py), the same as the native API's, so a 4xx means the same thing
on every route; only the body is the dialect's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI

from service.config import Settings
from service.core import DataPlane, InferResult
from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotFound,
    NotReady,
    QueueFull,
    ServeError,
    TextTooLong,
    Unprocessable,
)
from service.frontend.app import ERROR_DOCS, Front, delegate
from service.frontend.http import Ctx, Handler, Kit, Reply, authorize, check_json_content_type, loads, read_body
from service.frontend.native import parse_predict

TEI_FIELDS = frozenset({"inputs", "truncate", "raw_scores", "truncation_direction", "model"})

ErrorBody = Callable[[ServeError], bytes]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- errors in each dialect's shape ---------------------------------------------------------------------------
def tei_error(exc: ServeError) -> bytes:
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


VLLM_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def vllm_error(exc: ServeError) -> bytes:
    """vLLM's ``{"error": {"message", "type", "param", "code"}}`` (code: the HTTP status)."""
    param = "model" if isinstance(exc, NotFound) else None
    kind = VLLM_TYPES.get(exc.status, "BadRequestError")
    return orjson.dumps({"error": {"message": exc.message, "type": kind, "param": param, "code": exc.status}})


def in_dialect(handler: Handler, error_body: ErrorBody, kit: Kit) -> Handler:
    """Answer the handler's ServeErrors in the dialect's shape (counted as the kit counts its own)."""

    async def run(ctx: Ctx) -> Reply:
        try:
            return await handler(ctx)
        except ServeError as exc:
            if exc.reason is not None:
                kit.metrics.rejected.labels(exc.reason).inc()
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            return Reply(error_body(exc), exc.status, extra)

    return run


async def _payload(ctx: Ctx, plane: DataPlane) -> Any:
    authorize(ctx.headers, plane.settings)
    check_json_content_type(ctx)
    payload = loads(await read_body(ctx, plane.limits.max_body_bytes))
    if not plane.ready:
        plane.model(None)  # NotReady with the reason
    return payload


def _model_name(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    name = payload.get("model")
    if name is not None and not isinstance(name, str):
        raise Unprocessable(f"model: expected a string, not {_kind(name)}")
    return name or None


# -- TEI --------------------------------------------------------------------------------------------------------
def tei_predict_handler(plane: DataPlane) -> Handler:
    async def predict(ctx: Ctx) -> Reply:
        payload = await _payload(ctx, plane)
        view = plane.model(_model_name(payload))
        if not isinstance(payload, dict):
            raise Unprocessable(f"body: expected a JSON object, not {_kind(payload)}")
        if not TEI_FIELDS.issuperset(payload):
            extra = sorted(set(payload) - TEI_FIELDS)[:5]
            raise Unprocessable("; ".join(f"{k}: unknown field" for k in extra))
        direction = payload.get("truncation_direction", "Right")
        if not isinstance(direction, str) or direction.lower() not in ("right", "left"):
            raise Unprocessable('truncation_direction: expected "Right" or "Left"')
        if direction.lower() == "left":
            raise Unprocessable('truncation_direction: only "Right" is supported')
        native = {k: payload[k] for k in ("inputs", "raw_scores") if k in payload}
        native["truncate"] = False if payload.get("truncate") is None else payload["truncate"]
        args = parse_predict(native, view.pair)
        result = await plane.infer(
            view, args.texts, args.pairs, truncate=args.truncate, gone=ctx.gone, timing=ctx.timing
        )
        return Reply(encode_tei(result, args.raw_scores, args.single), timed=True)

    return predict


def encode_tei(result: InferResult, raw_scores: bool, single: bool) -> bytes:
    """``[{"score", "label"}...]`` sorted by score, per input; one input unwrapped, as TEI answers."""
    values = (result.logits if raw_scores else result.scores).tolist()
    names = result.model.labels
    rows = [
        [{"score": row[i], "label": names[i]} for i in sorted(range(len(row)), key=row.__getitem__, reverse=True)]
        for row in values
    ]
    return orjson.dumps(rows[0] if single else rows)


# -- vLLM ------------------------------------------------------------------------------------------------------
def vllm_classify_handler(plane: DataPlane) -> Handler:
    async def classify(ctx: Ctx) -> Reply:
        payload = await _payload(ctx, plane)
        if not isinstance(payload, dict):
            raise Unprocessable(f"body: expected a JSON object, not {_kind(payload)}")
        view = plane.model(_model_name(payload))
        if view.pair:
            raise Unprocessable(f"model {view.name!r} classifies text pairs; /classify takes single texts")
        if "input" not in payload:
            raise Unprocessable("input: Field required")
        given = payload["input"]
        if isinstance(given, str):
            texts = [given]
        elif isinstance(given, list) and all(isinstance(t, str) for t in given):
            texts = given
        else:
            raise Unprocessable(f"input: expected a text or a list of texts, not {_kind(given)}")
        cut = payload.get("truncate_prompt_tokens")
        if cut is not None and (not isinstance(cut, int) or isinstance(cut, bool) or cut not in (-1, view.max_length)):
            raise Unprocessable(
                f"truncate_prompt_tokens: expected null, -1 or the model's max length "
                f"{view.max_length} (truncation to fewer tokens is not supported), not {cut!r}"[:200]
            )
        result = await plane.infer(view, texts, None, truncate=cut is not None, gone=ctx.gone, timing=ctx.timing)
        tokens = sum(len(seq) for seq in view.encoder.encode(texts, None, True))
        return Reply(encode_vllm(result, view.name, tokens), timed=True)

    return classify


def encode_vllm(result: InferResult, model: str, tokens: int) -> bytes:
    labels = result.model.labels
    scores = result.scores.tolist()
    data = [
        {
            "index": i,
            "label": labels[int(max(range(len(row)), key=row.__getitem__))],
            "probs": row,
            "num_classes": len(row),
        }
        for i, row in enumerate(scores)
    ]
    return orjson.dumps(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )


# -- registration ----------------------------------------------------------------------------------------------
TEI_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                },
            ]
        },
        "truncate": {"type": "boolean", "default": False},
        "raw_scores": {"type": "boolean", "default": False},
        "truncation_direction": {"type": "string", "enum": ["Right", "right"]},
        "model": {"type": "string"},
    },
}
VLLM_REQUEST = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "truncate_prompt_tokens": {"type": "integer", "nullable": True},
    },
}


TEI_ERROR = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
VLLM_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "integer"},
            },
        }
    },
}


def error_docs(schema: dict[str, Any], with_auth: bool) -> dict[int | str, dict[str, Any]]:
    """The dialect's statuses (the native table's) documented with the dialect's own error body."""
    return {
        code: {"description": doc["description"], "content": {"application/json": {"schema": schema}}}
        for code, doc in ERROR_DOCS.items()
        if code != 401 or with_auth
    }


def register(api: FastAPI, front: Front, settings: Settings, plane: DataPlane, kit: Kit) -> None:
    """The TEI and vLLM routes: hot handlers, and their FastAPI declarations for the OpenAPI document."""
    routes = (
        (
            "/predict",
            in_dialect(tei_predict_handler(plane), tei_error, kit),
            TEI_REQUEST,
            TEI_ERROR,
            "TEI",
            "Classify with TEI's request and response (text-embeddings-inference /predict)",
        ),
        (
            "/classify",
            in_dialect(vllm_classify_handler(plane), vllm_error, kit),
            VLLM_REQUEST,
            VLLM_ERROR,
            "vLLM",
            "Classify with vLLM's request and response (vLLM /classify)",
        ),
    )
    for path, handler, schema, error_schema, tag, summary in routes:
        front.route("POST", path, handler)
        api.add_api_route(
            path,
            delegate(kit, path, handler),
            methods=["POST"],
            tags=[tag],
            summary=summary,
            responses=error_docs(error_schema, settings.api_key is not None),
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        )
