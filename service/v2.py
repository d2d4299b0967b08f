"""Open Inference Protocol (KServe v2 REST, as Triton speaks it), over the same engine as the native API.

Supports Triton's binary tensor data extension (``Inference-Header-Content-Length``), which the real
``tritonclient.http`` client uses by default for inputs and outputs, and the classification extension
(``"classification": k`` on an output returns ``"score:index:label"`` strings).

Model: one input ``text`` (BYTES, shape [n] or [n, 1]); outputs ``logits`` (FP32, [n, classes]) and
``labels`` (BYTES, [n], the argmax label).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from service.api import (
    ERROR_DOCS,
    AppState,
    BadRequest,
    NotFound,
    NotReady,
    authorize,
    check_texts,
    deadline_for,
    error_response,
    infer_current,
    json_response,
    read_body,
    validate,
)
from service.engine import Engine

INPUT_NAME = "text"
OUTPUTS = ("logits", "labels")
HEADER_LENGTH = "inference-header-content-length"


class V2Input(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    shape: list[int]
    datatype: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class V2Output(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[V2Input] = Field(min_length=1)
    outputs: list[V2Output] | None = None


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("binary BYTES tensor is truncated (incomplete length prefix)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest("binary BYTES tensor is truncated (element longer than the data)")
        out.append(raw[offset : offset + size])
        offset += size
    return out


def encode_bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def parse_texts(req: V2InferRequest, binary: bytes) -> list[str]:
    if len(req.inputs) != 1:
        raise BadRequest(f"expected exactly one input named {INPUT_NAME!r}, got {len(req.inputs)}")
    tensor = req.inputs[0]
    if tensor.name != INPUT_NAME:
        raise BadRequest(f"unknown input {tensor.name!r}; this model takes one input {INPUT_NAME!r}")
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {INPUT_NAME!r} must have datatype BYTES, not {tensor.datatype!r}")
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)) or tensor.shape[0] < 0:
        raise BadRequest(f"input {INPUT_NAME!r} must have shape [n] or [n, 1], not {tensor.shape}")
    count = tensor.shape[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise BadRequest(f"binary_data_size {size!r} does not match the {len(binary)} binary bytes sent")
        items: list[Any] = decode_bytes_tensor(binary[:size])
    elif tensor.data is not None:
        items = _flatten(tensor.data)
    else:
        raise BadRequest(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
    if len(items) != count:
        raise BadRequest(f"input {INPUT_NAME!r} has shape {tensor.shape} but {len(items)} elements")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"element {i} of {INPUT_NAME!r} is not valid UTF-8") from None
        if not isinstance(item, str):
            raise BadRequest(f"element {i} of {INPUT_NAME!r} must be a string, not {type(item).__name__}")
        texts.append(item)
    return texts


def model_metadata(engine: Engine) -> dict[str, Any]:
    r = engine.runtime
    return {
        "name": r.name,
        "versions": [r.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, len(r.labels)]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": r.labels, "max_length": r.max_length, "variant": r.variant},
    }


def add_v2_routes(app: FastAPI, state: AppState) -> None:
    settings = state.settings

    def find_model(name: str, version: str | None) -> Engine:
        if state.draining:
            raise NotReady("server is draining")
        engine = state.current()
        r = engine.runtime
        if name != r.name:
            raise NotFound(f"unknown model {name!r}; this server serves {r.name!r}")
        if version not in (None, "", r.version):
            raise NotFound(f"model {name!r} has no version {version!r}; it serves version {r.version!r}")
        return engine

    @app.get("/v2", tags=["v2"])
    async def server_metadata() -> Response:
        return json_response(
            {"name": "bertserve", "version": app.version, "extensions": ["binary_tensor_data", "classification"]}
        )

    @app.get("/v2/health/live", tags=["v2"])
    async def live(request: Request) -> Response:
        if settings.auth_all:
            authorize(request, settings)
        return json_response({"live": True})

    @app.get("/v2/health/ready", tags=["v2"], responses={503: ERROR_DOCS[503]})
    async def ready(request: Request) -> Response:
        if settings.auth_all:
            authorize(request, settings)
        if not state.ready or state.draining:
            return error_response(503, "not_ready", "server is not ready")
        return json_response({"ready": True})

    @app.get("/v2/models/{name}", tags=["v2"], responses={404: {}, 503: ERROR_DOCS[503]})
    async def metadata(name: str) -> Response:
        return json_response(model_metadata(find_model(name, None)))

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"], responses={404: {}, 503: ERROR_DOCS[503]})
    async def metadata_version(name: str, version: str) -> Response:
        return json_response(model_metadata(find_model(name, version)))

    @app.get("/v2/models/{name}/ready", tags=["v2"], responses={404: {}, 503: ERROR_DOCS[503]})
    async def model_ready(name: str) -> Response:
        find_model(name, None)
        return json_response({"name": name, "ready": True})

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"], responses={404: {}, 503: ERROR_DOCS[503]})
    async def model_version_ready(name: str, version: str) -> Response:
        find_model(name, version)
        return json_response({"name": name, "ready": True})

    request_schema = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_defs = request_schema.pop("$defs", {})
    infer_doc: dict[str, Any] = {
        "tags": ["v2"],
        "responses": {k: v for k, v in ERROR_DOCS.items() if k != 415} | {404: {}},
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request_schema}},
            }
        },
    }

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # first call: add the nested models the request body refers to
            base_openapi().setdefault("components", {}).setdefault("schemas", {}).update(request_defs)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/v2/models/{name}/infer", **infer_doc)
    async def infer(name: str, request: Request) -> Response:
        return await run_infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_doc)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await run_infer(request, name, version)

    async def run_infer(request: Request, name: str, version: str | None) -> Response:
        authorize(request, settings)
        engine = find_model(name, version)
        body = await read_body(request, settings.max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise BadRequest(f"invalid Inference-Header-Content-Length {header_length!r}")
            json_part, binary = body[: int(header_length)], body[int(header_length) :]
        else:
            json_part, binary = body, b""
        try:
            payload = orjson.loads(json_part)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"inference request is not valid JSON: {exc}") from None
        req = validate(V2InferRequest, payload)
        texts = parse_texts(req, binary)
        check_texts(texts, settings.max_client_batch)
        requested = req.outputs or [V2Output(name=n) for n in OUTPUTS]
        for out in requested:
            if out.name not in OUTPUTS:
                raise BadRequest(f"unknown output {out.name!r}; outputs are {list(OUTPUTS)}")
        truncate = req.parameters.get("truncate", True)
        if not isinstance(truncate, bool):
            raise BadRequest("parameter 'truncate' must be a boolean")
        timeout = req.parameters.get("timeout_s")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise BadRequest("parameter 'timeout_s' must be a positive number")
        engine, outputs = await infer_current(request, state, engine, texts, truncate, deadline_for(settings, timeout))
        if outputs is None:
            return error_response(499, "client_closed_request", "client disconnected")
        r = engine.runtime
        logits = np.stack([o.logits for o in outputs]).astype(np.float32)
        binary_default = bool(req.parameters.get("binary_data_output", False))
        tensors: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for out in requested:
            k = out.parameters.get("classification")
            if k is not None:
                if not isinstance(k, int) or k < 1:
                    raise BadRequest("parameter 'classification' must be a positive integer")
                source = logits if out.name == "logits" else np.stack([o.probs for o in outputs])
                top = np.argsort(-source, axis=1)[:, : min(k, len(r.labels))]
                values = [f"{source[i, j]:f}:{j}:{r.labels[j]}".encode() for i in range(len(texts)) for j in top[i]]
                dtype, shape, data = "BYTES", [len(texts), top.shape[1]], values
            elif out.name == "logits":
                dtype, shape, data = "FP32", list(logits.shape), logits
            else:
                dtype, shape = "BYTES", [len(texts)]
                data = [r.labels[int(i)].encode() for i in logits.argmax(axis=1)]
            tensor: dict[str, Any] = {"name": out.name, "datatype": dtype, "shape": shape}
            if out.parameters.get("binary_data", binary_default):
                raw = data.tobytes() if isinstance(data, np.ndarray) else encode_bytes_tensor(data)
                tensor["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                tensor["data"] = (
                    data.ravel().tolist() if isinstance(data, np.ndarray) else [v.decode() for v in data]
                )
            tensors.append(tensor)
        result: dict[str, Any] = {"model_name": r.name, "model_version": r.version, "outputs": tensors}
        if req.id is not None:
            result["id"] = req.id
        if not chunks:
            return json_response(result)
        header = orjson.dumps(result)
        return Response(
            header + b"".join(chunks),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
