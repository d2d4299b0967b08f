"""vLLM's classification route, ``POST /classify``, so vLLM's clients work unchanged (its classify protocol).

``{"model", "input": text | [texts], "truncate_prompt_tokens"}`` -> ``{"id", "object": "list", "created", "model",
"data": [{"index", "label", "probs", "num_classes"}], "usage"}``; errors ``{"error": {"message", "type", "param",
"code"}}`` with ``code`` the HTTP status, as vLLM's ErrorInfo has it. Unknown request fields are ignored, as
vLLM's OpenAIBaseModel does. Statuses are bertserve's error table, the same as every route's.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import orjson

from service.config import Settings
from service.core import DataPlane, InferResult
from service.errors import NotFound, ServeError, Unprocessable
from service.frontend.kit import (
    Ctx,
    HotRoute,
    Reply,
    Routes,
    body_schema,
    error_docs,
    json_request,
    operation,
)


class ClassificationRequest(msgspec.Struct):  # unknown fields ignored, as vLLM's
    input: str | list[str]
    model: str | None = None
    truncate_prompt_tokens: int | None = None  # null, -1 or the model's max length


class ClassificationData(msgspec.Struct):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    data: list[ClassificationData]
    usage: dict[str, int | None]


class VllmErrorInfo(msgspec.Struct):
    message: str
    type: str
    code: int
    param: str | None = None


class VllmError(msgspec.Struct):
    error: VllmErrorInfo


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


def vllm_error(exc: ServeError, _: str) -> bytes:
    """vLLM's ``{"error": {"message", "type", "param", "code"}}`` (code: the HTTP status)."""
    param = "model" if isinstance(exc, NotFound) else None
    kind = VLLM_TYPES.get(exc.status, "BadRequestError")
    return orjson.dumps({"error": {"message": exc.message, "type": kind, "param": param, "code": exc.status}})


def encode_vllm(result: InferResult, model: str) -> bytes:
    labels = result.model.labels
    scores = result.scores.tolist()
    data = [
        {"index": i, "label": labels[max(range(len(row)), key=row.__getitem__)], "probs": row, "num_classes": len(row)}
        for i, row in enumerate(scores)
    ]
    usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens, "completion_tokens": 0}
    return orjson.dumps(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {**usage, "prompt_tokens_details": None},
        }
    )


def routes(settings: Settings, plane: DataPlane) -> Routes:

    async def classify(ctx: Ctx) -> Reply:
        request = await json_request(ctx, settings, plane, ClassificationRequest)
        view = plane.model(request.model)
        if view.pair:
            raise Unprocessable(f"model {view.name!r} classifies text pairs; /classify takes single texts")
        texts = [request.input] if isinstance(request.input, str) else request.input
        cut = request.truncate_prompt_tokens
        if cut is not None and cut not in (-1, view.max_length):
            raise Unprocessable(
                f"truncate_prompt_tokens: expected null, -1 or the model's max length "
                f"{view.max_length} (truncation to fewer tokens is not supported), not {cut!r}"[:200]
            )
        result = await plane.infer(view, texts, None, ctx.call, truncate=cut is not None)
        return Reply(encode_vllm(result, view.name), timed=True)

    statuses = (400, 404, 413, 415, 422, 429, 503, 504, *((401,) if settings.api_key else ()))
    ok = {"content": {"application/json": {"schema": body_schema(ClassificationResponse)}}}
    summary = "Classify with vLLM's request and response (vLLM /classify)"
    errors = error_docs(*sorted(statuses), schema=body_schema(VllmError))
    doc = operation(summary, "vLLM", ClassificationRequest, ok, errors)
    schemas = (ClassificationRequest, ClassificationResponse, VllmError)
    return Routes([HotRoute("POST", "/classify", classify, doc, vllm_error)], None, schemas)
