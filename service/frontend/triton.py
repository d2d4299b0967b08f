"""Triton's HTTP protocol extensions: model configuration, statistics and the model repository.

These are what Triton's own tools read before anything else: ``perf_analyzer`` asks for
``GET /v2/models/{m}/config`` first (and stops with "failed to get model config" without it), reads
``/stats`` around each measurement, and ``tritonclient``'s ``get_model_repository_index`` / ``load_model`` /
``unload_model`` speak the repository extension. The JSON shapes follow Triton's documents
(docs/protocol/extension_model_configuration.md, extension_statistics.md, extension_model_repository.md):
a model configuration is the ``ModelConfig`` protobuf as JSON with its field names, statistics are
``{"model_stats": [...]}`` with ``{count, ns}`` durations.

The documents are built here once, as plain dicts, and the gRPC front end (service/frontend/grpc.py, started
from :func:`register`) parses the same dicts into its protobuf messages, so HTTP and gRPC cannot disagree.
None of these routes is on the hot path, so they are ordinary FastAPI routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.config import Settings
from service.core import DataPlane, ModelView
from service.errors import BadRequest, PayloadTooLarge
from service.frontend import v2
from service.frontend.app import ERROR_DOCS, Front, json_response
from service.frontend.http import Kit, authorize, loads

EXTENSIONS = ("model_configuration", "statistics", "model_repository")
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


# -- documents (shared with gRPC) ------------------------------------------------------------------------------
def _param(value: Any) -> dict[str, str]:
    return {"string_value": str(value)}


def _tensor(name: str, data_type: str, dims: list[int]) -> dict[str, Any]:
    return {
        "name": name,
        "data_type": data_type,
        "format": "FORMAT_NONE",
        "dims": dims,
        "is_shape_tensor": False,
        "allow_ragged_batch": False,
        "optional": False,
    }


def model_config(view: ModelView, settings: Settings, max_client_batch: int) -> dict[str, Any]:
    """Triton's model configuration for a served model, with the batching settings really in force.

    It follows the v2 model metadata, as Triton's do (perf_analyzer reads both and sizes its inputs from the
    metadata): metadata ``text`` of shape ``[-1, 1]`` is a batched model, ``max_batch_size`` the client batch
    limit and dims ``[1]``; metadata ``[-1]`` (what v2.model_metadata says today) is ``max_batch_size`` 0 with
    dims ``[-1]``, so perf_analyzer needs ``--shape text:1``. ``dynamic_batching`` reports the batcher's policy
    (its largest batch as the preferred size, its fill wait as the queue delay); the token budget and padding
    bound, which Triton has no field for, are in ``parameters``.
    """
    policy = view.desc.policy
    gpu = any(p.startswith(("CUDA", "Tensorrt")) for p in view.desc.providers)
    metadata = v2.model_metadata(view)
    batched = len(metadata["inputs"][0]["shape"]) == 2
    batch, dims = (max_client_batch, [1]) if batched else (0, [-1])
    inputs = [_tensor(t["name"], "TYPE_STRING", dims) for t in metadata["inputs"]]
    lead = [] if batched else [-1]
    keep = settings.version_policy
    return {
        "name": view.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"latest": {"num_versions": keep}} if keep else {"all": {}},
        "max_batch_size": batch,
        "input": inputs,
        "output": [
            {
                "name": "logits",
                "data_type": "TYPE_FP32",
                "dims": [*lead, len(view.labels)],
                "label_filename": "",
                "is_shape_tensor": False,
            },
            {
                "name": "labels",
                "data_type": "TYPE_STRING",
                "dims": dims,
                "label_filename": "",
                "is_shape_tensor": False,
            },
        ],
        "dynamic_batching": {
            "preferred_batch_size": [int(policy["max_batch_size"])],
            "max_queue_delay_microseconds": round(float(policy["max_wait_s"]) * 1e6),
            "preserve_ordering": False,
        },
        "instance_group": [
            {
                "name": view.name,
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": int(policy["workers"]),
                "gpus": [0] if gpu else [],
            }
        ],
        "default_model_filename": "model.onnx",
        "parameters": {
            "labels": _param(",".join(view.labels)),
            "max_length": _param(view.max_length),
            "variant": _param(view.desc.variant),
            "providers": _param(",".join(view.desc.providers)),
            "max_batch_tokens": _param(policy["max_batch_tokens"]),
            "max_padding_ratio": _param(policy["max_padding_ratio"]),
            "max_queue": _param(policy["max_queue"]),
        },
    }


def _duration(count: Any, seconds: Any) -> dict[str, int]:
    return {"count": int(count), "ns": round(float(seconds) * 1e9)}


def model_stat(name: str, version: str, s: dict[str, Any]) -> dict[str, Any]:
    """One ``$model_stat`` from a batcher's BatchStats counters.

    Input preparation (padding) and output extraction (scores) run inside the timed batch, so their time is in
    ``compute_infer``; ``compute_input`` / ``compute_output`` report the same count with 0 ns. Tokenizing
    happens in the API process, before the request reaches the queue. Per-batch-size statistics are not kept
    (``bertserve_batch_size`` in /metrics has the distribution), so ``batch_stats`` is empty.
    """
    compute = s.get("compute_count", 0)
    return {
        "name": name,
        "version": version,
        "last_inference": int(s.get("last_inference_ms", 0)),
        "inference_count": int(s.get("inference_count", 0)),
        "execution_count": int(s.get("execution_count", 0)),
        "inference_stats": {
            "success": _duration(s.get("success_count", 0), s.get("success_s", 0.0)),
            "fail": _duration(s.get("fail_count", 0), s.get("fail_s", 0.0)),
            "queue": _duration(s.get("queue_count", 0), s.get("queue_s", 0.0)),
            "compute_input": _duration(compute, 0.0),
            "compute_infer": _duration(compute, s.get("compute_s", 0.0)),
            "compute_output": _duration(compute, 0.0),
            "cache_hit": _duration(0, 0.0),
        },
        "batch_stats": [],
    }


async def statistics(plane: DataPlane, name: str | None, version: str | None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for every served version, one model, or one version (404 when unknown)."""
    if name:
        plane.model(name, version or None)  # NotFound / NotReady with the usual messages
    stats = await plane.engine.stats()
    rows = [
        model_stat(n, v, s)
        for (n, v), s in sorted(stats.items())
        if (not name or n == name) and (not version or v == version)
    ]
    return {"model_stats": rows}


async def repository_index(plane: DataPlane, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's ``$repository_index_response``: name, version, state (READY, LOADING, UNAVAILABLE), reason."""
    entries = await plane.engine.repository_index()
    return [
        {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
        for e in entries
        if not ready_only or e.state == "READY"
    ]


# -- HTTP routes ----------------------------------------------------------------------------------------------
def register(api: FastAPI, front: Front, settings: Settings, plane: DataPlane, kit: Kit) -> None:
    """Triton's extensions over HTTP, and the KServe v2 gRPC server (started by the lifecycle when enabled)."""
    api.state.extensions = [*getattr(api.state, "extensions", []), *EXTENSIONS]
    limit = plane.limits.max_client_batch
    not_found: dict[int | str, dict[str, Any]] = {404: ERROR_DOCS[404], 503: ERROR_DOCS[503]}

    def guard(request: Request) -> None:
        if settings.auth_all:
            authorize(dict(request.scope["headers"]), settings)

    @api.get("/v2/models/stats", tags=["v2"])
    async def all_stats(request: Request) -> Response:
        """Triton's statistics extension: every served model version."""
        guard(request)
        return json_response(await statistics(plane, None, None))

    # Before the v2 metadata route GET /v2/models/{name}, which would otherwise take "stats" for a model name.
    api.router.routes.insert(0, api.router.routes.pop())

    @api.get("/v2/models/{name}/config", tags=["v2"], responses=not_found)
    async def config(name: str) -> Response:
        """Triton's model configuration (what perf_analyzer reads first)."""
        return json_response(model_config(plane.model(name), settings, limit))

    @api.get("/v2/models/{name}/versions/{version}/config", tags=["v2"], responses=not_found)
    async def config_version(name: str, version: str) -> Response:
        return json_response(model_config(plane.model(name, version), settings, limit))

    @api.get("/v2/models/{name}/stats", tags=["v2"], responses=not_found)
    async def stats(request: Request, name: str) -> Response:
        guard(request)
        return json_response(await statistics(plane, name, None))

    @api.get("/v2/models/{name}/versions/{version}/stats", tags=["v2"], responses=not_found)
    async def stats_version(request: Request, name: str, version: str) -> Response:
        guard(request)
        return json_response(await statistics(plane, name, version))

    protected: dict[int | str, dict[str, Any]] = {k: ERROR_DOCS[k] for k in (400, 401, 404, 422)}

    async def options(request: Request) -> dict[str, Any]:
        """Authorize (the admin key), then the optional JSON body of a repository call ({} when empty)."""
        authorize(dict(request.scope["headers"]), settings, admin=True)
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {settings.max_body_bytes} bytes")
        if not raw.strip():
            return {}
        payload = loads(raw)
        if not isinstance(payload, dict):
            raise BadRequest("body: expected a JSON object")
        return payload

    @api.post("/v2/repository/index", tags=["v2"], responses=protected)
    async def index(request: Request) -> Response:
        """Triton's repository index: every model in the repository, its state and why; API key."""
        payload = await options(request)
        ready = payload.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest("ready: expected true or false")
        return json_response(await repository_index(plane, ready))

    @api.post("/v2/repository/models/{name}/load", tags=["v2"], responses=protected)
    async def load(request: Request, name: str) -> Response:
        """Load (or reload) every served version of a repository model; protected by the API key."""
        await options(request)
        await plane.engine.load(name)
        return Response(status_code=200)

    @api.post("/v2/repository/models/{name}/unload", tags=["v2"], responses=protected)
    async def unload(request: Request, name: str) -> Response:
        """Stop serving a model: what was admitted is answered first; protected by the API key."""
        await options(request)
        await plane.engine.unload(name)
        return Response(status_code=200)

    from service.frontend import grpc as grpc_frontend

    grpc_frontend.register(api, front, settings, plane, kit)
