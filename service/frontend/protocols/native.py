"""bertserve's own REST API: ``POST /v1/predict`` (a hot route), ``GET /v1/models`` and ``POST /v1/admin/reload``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.config import Settings
from service.core import DataPlane, InferResult
from service.errors import Forbidden
from service.frontend.kit import (
    Ctx,
    ErrorResponse,
    HotRoute,
    Inputs,
    Reply,
    Routes,
    authorize,
    body_schema,
    convert,
    error_docs,
    json_request,
    json_response,
    loads,
    operation,
    read_body,
    split_inputs,
)


class PredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    """One text, a list of texts, or for pair models one pair [a, b] or a list of pairs (at most
    BERTSERVE_MAX_CLIENT_BATCH inputs)."""

    inputs: Inputs
    model: str | None = None  # optional when one model is served
    version: str | None = None  # default: the latest served
    top_k: Annotated[int, msgspec.Meta(ge=1)] | None = None  # only the k most likely labels; null: all
    truncate: bool = True  # cut texts longer than the model's max_length; false: such a text is a 422
    raw_scores: bool = False  # logits instead of calibrated probabilities
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None  # capped by BERTSERVE_MAX_REQUEST_TIMEOUT_S


class LabelScore(msgspec.Struct):
    label: str
    score: float


class PredictResponse(msgspec.Struct):
    model: str
    version: str
    predictions: list[list[LabelScore]]  # per input, labels by descending score
    labels: list[list[str]]  # per input: [argmax] (single-label) or every label over its threshold (multi-label)


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    model_dir: str | None = None  # bundle directory; default: the configured one
    variant: str | None = None  # variant to serve; default: the configured one


def encode_predictions(result: InferResult, top_k: int | None, raw_scores: bool) -> bytes:
    """``{"model", "version", "predictions": [[{"label", "score"}...]], "labels": [[...]]}`` as bytes.

    Rows are sorted by score. One orjson call on plain lists and dicts (cheaper than building Structs per label).
    """
    view = result.model
    values = result.logits if raw_scores else result.scores
    n_labels = values.shape[1]
    k = n_labels if top_k is None else min(top_k, n_labels)
    names = view.labels
    rows = values.tolist()
    if n_labels <= 32:  # a Python sort of a few floats is cheaper than numpy's per-call overhead
        order = [sorted(range(n_labels), key=row.__getitem__, reverse=True)[:k] for row in rows]
    else:
        order = np.argsort(-values, axis=1, kind="stable")[:, :k].tolist()
    predictions = [[{"label": names[i], "score": row[i]} for i in idx] for row, idx in zip(rows, order, strict=True)]
    labels = [[names[i] for i in predicted] for predicted in result.predicted]
    return orjson.dumps({"model": view.name, "version": view.version, "predictions": predictions, "labels": labels})


def models_document(plane: DataPlane) -> list[dict[str, Any]]:
    """What is being served, per model version: labels, task, limits, providers really in use, batching."""
    out = []
    for view in plane.views().values():
        d, m = view.desc, view.manifest
        variants = m.get("variants", {})
        policy = d.policy
        out.append(
            {
                "name": view.name,
                "version": view.version,
                "task": m.get("task"),
                "problem_type": m.get("problem_type", "single_label"),
                "text_pair": view.pair,
                "labels": list(view.labels),
                "thresholds": m.get("thresholds"),
                "calibration": m.get("calibration"),
                "max_length": view.max_length,
                "variant": d.variant,
                "variants": sorted(variants),
                "providers": d.providers,
                "base_model": m.get("base_model"),
                "created": m.get("created"),
                "dataset": m.get("dataset"),
                "metrics": {name: v.get("metrics") for name, v in variants.items()},
                "parity": {name: v.get("parity") for name, v in variants.items()},
                "drift_reference": m.get("reference") is not None,
                "batching": {
                    "max_batch_size": policy["max_batch_size"],
                    "max_batch_tokens": policy["max_batch_tokens"],
                    "max_padding_ratio": policy["max_padding_ratio"],
                    "max_wait_ms": policy["max_wait_s"] * 1000.0,
                    "batch_lookahead": policy["batch_lookahead"],
                    "max_queue": policy["max_queue"],
                    "max_client_batch": plane.limits.max_client_batch,
                    "inference_workers": policy["inference_workers"],
                    "intra_op_threads": d.threads,
                    "solo_threads": d.solo_threads,
                },
            }
        )
    return out


def routes(settings: Settings, plane: DataPlane) -> Routes:
    limit = plane.limits.max_body_bytes

    async def predict(ctx: Ctx) -> Reply:
        request = await json_request(ctx, settings, plane, PredictRequest)
        view = plane.model(request.model, request.version)
        texts, pairs, _ = split_inputs(request.inputs, view.pair)
        result = await plane.infer(view, texts, pairs, ctx.call, truncate=request.truncate, timeout_s=request.timeout_s)
        return Reply(encode_predictions(result, request.top_k, request.raw_scores), timed=True)

    statuses = (400, 404, 413, 415, 422, 429, 503, 504, *((401,) if settings.api_key else ()))
    hot = HotRoute(
        "POST",
        "/v1/predict",
        predict,
        operation(
            "Classify one text, a list of texts, or text pairs",
            "inference",
            PredictRequest,
            {"content": {"application/json": {"schema": body_schema(PredictResponse)}}},
            error_docs(*sorted(statuses)),
        ),
    )

    router = APIRouter()

    @router.get("/v1/models", tags=["models"], responses=error_docs(503))
    async def models() -> Response:
        """What is being served: labels, task, limits, the providers really in use, batching, metrics."""
        if not plane.ready:
            plane.model(None)
        documents = models_document(plane)
        top = documents[0] if len(documents) == 1 else {}
        return json_response({**top, "models": documents})

    @router.post(
        "/v1/admin/reload",
        tags=["admin"],
        responses=error_docs(400, 401, 403, 409, 413, 422, 503),
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": body_schema(ReloadRequest)}}}},
    )
    async def admin_reload(request: Request) -> Response:
        """Load a bundle (default: the configured directory), warm it, swap it in; needs the admin key."""
        if settings.admin_key is None:
            raise Forbidden("the admin API is disabled; set BERTSERVE_ADMIN_API_KEY or BERTSERVE_API_KEY to enable it")
        headers = dict(request.scope["headers"])
        authorize(headers, settings, admin=True)
        raw = await read_body(request.receive, headers, limit)
        body = convert(loads(raw), ReloadRequest) if raw.strip() else ReloadRequest()
        desc = await plane.reload(body.model_dir, body.variant)
        return json_response(
            {"name": desc.name, "version": desc.version, "variant": desc.variant, "providers": desc.providers}
        )

    return Routes([hot], router, (PredictRequest, PredictResponse, ReloadRequest, ErrorResponse))
