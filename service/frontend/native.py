"""The native REST protocol: ``POST /v1/predict`` (hot), ``GET /v1/models``, ``POST /v1/admin/reload``.

Request validation is explicit (a few isinstance checks) rather than a pydantic model per request: the same
statuses and messages (``field: what is wrong``), at a fraction of the cost. The pydantic schema in
service/schemas.py still documents the body in the OpenAPI document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.core import DataPlane, InferResult
from service.errors import Unprocessable
from service.frontend.http import Ctx, Reply, check_json_content_type, loads, read_body

FIELDS = frozenset({"inputs", "model", "version", "top_k", "truncate", "raw_scores", "timeout_s"})


@dataclass(slots=True)
class PredictArgs:
    texts: list[str]
    pairs: list[str] | None
    single: bool  # one text (or one pair) rather than a list
    model: str | None
    version: str | None
    top_k: int | None
    truncate: bool
    raw_scores: bool
    timeout_s: float | None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _opt_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise Unprocessable(f"{key}: expected a string, not {_kind(value)}")
    return value


def _flag(payload: dict[str, Any], key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if not isinstance(value, bool):
        raise Unprocessable(f"{key}: expected true or false, not {_kind(value)}")
    return value


def parse_predict(payload: Any, pair_model: bool) -> PredictArgs:
    """Validate a predict body; ``inputs`` is a text, a list of texts, or for pair models [a, b] / [[a, b], ...]."""
    if not isinstance(payload, dict):
        raise Unprocessable(f"body: expected a JSON object, not {_kind(payload)}")
    if not FIELDS.issuperset(payload):
        extra = sorted(set(payload) - FIELDS)
        shown = "; ".join(f"{k}: Extra inputs are not permitted" for k in extra[:5])
        raise Unprocessable(shown + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""))
    if "inputs" not in payload:
        raise Unprocessable("inputs: Field required")
    inputs = payload["inputs"]
    pairs: list[str] | None = None
    if isinstance(inputs, str):
        texts, single = [inputs], True
    elif isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        if pair_model and len(inputs) == 2:  # one pair
            texts, pairs, single = [inputs[0]], [inputs[1]], True
        else:
            texts, single = inputs, False
    elif (
        isinstance(inputs, list)
        and inputs
        and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in inputs)
    ):
        texts, pairs, single = [p[0] for p in inputs], [p[1] for p in inputs], False
    else:
        raise Unprocessable(
            f"inputs: expected a text, a list of texts, or text pairs [[a, b], ...], not {_kind(inputs)} "
            "(lists may hold only strings, or only pairs of strings)"
        )
    top_k = payload.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise Unprocessable(f"top_k: expected a positive integer or null, not {top_k!r}"[:200])
    timeout = payload.get("timeout_s")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0 or math.isinf(timeout)
    ):
        raise Unprocessable(f"timeout_s: expected a positive number of seconds or null, not {timeout!r}"[:200])
    return PredictArgs(
        texts=texts,
        pairs=pairs,
        single=single,
        model=_opt_str(payload, "model"),
        version=_opt_str(payload, "version"),
        top_k=top_k,
        truncate=_flag(payload, "truncate", True),
        raw_scores=_flag(payload, "raw_scores", False),
        timeout_s=float(timeout) if timeout is not None else None,
    )


def encode_predictions(result: InferResult, top_k: int | None, raw_scores: bool) -> bytes:
    """``{"model", "version", "predictions": [[{"label", "score"}...]], "labels": [[...]]}`` as bytes.

    Rows are sorted by score. One orjson call on plain lists and dicts: measured 2.5 us for one input and three
    labels, against 4.3 us for assembling pre-encoded fragments.
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


def predict_handler(plane: DataPlane) -> Any:
    limit = plane.limits.max_body_bytes
    settings = plane.settings
    from service.frontend.http import authorize

    async def predict(ctx: Ctx) -> Reply:
        authorize(ctx.headers, settings)
        check_json_content_type(ctx)
        payload = loads(await read_body(ctx, limit))
        if not plane.ready:
            plane.model(None)  # raises NotReady with the reason
        name = payload.get("model") if isinstance(payload, dict) and isinstance(payload.get("model"), str) else None
        version = payload.get("version") if isinstance(payload, dict) else None
        view = plane.model(name, version if isinstance(version, str) else None)
        args = parse_predict(payload, view.pair)
        result = await plane.infer(
            view,
            args.texts,
            args.pairs,
            truncate=args.truncate,
            timeout_s=args.timeout_s,
            gone=ctx.gone,
            timing=ctx.timing,
            span=ctx.span,
        )
        return Reply(encode_predictions(result, args.top_k, args.raw_scores), timed=True)

    return predict


def models_document(plane: DataPlane) -> list[dict[str, Any]]:
    """What is being served, per model version: labels, task, limits, providers really in use, batching."""
    out = []
    for view in plane.views().values():
        d, m = view.desc, view.manifest
        variants = m.get("variants", {})
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
                    "max_batch_size": d.policy["max_batch_size"],
                    "max_batch_tokens": d.policy["max_batch_tokens"],
                    "max_padding_ratio": d.policy["max_padding_ratio"],
                    "max_wait_ms": d.policy["max_wait_s"] * 1000.0,
                    "lookahead": d.policy["lookahead"],
                    "max_queue": d.policy["max_queue"],
                    "max_client_batch": plane.limits.max_client_batch,
                    "workers": d.policy["workers"],
                    "intra_op_threads": d.threads,
                    "solo_threads": d.solo_threads,
                },
            }
        )
    return out
