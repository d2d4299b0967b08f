"""Open Inference Protocol (KServe v2 REST, as Triton speaks it) over the neutral data plane.

Supports Triton's binary tensor data extension (``Inference-Header-Content-Length``), which ``tritonclient.http``
and ``perf_analyzer`` use by default for inputs and outputs, and the classification extension
(``"classification": k`` on an output returns ``"score:index:label"`` strings).

Model: input ``text`` (BYTES, shape [n] or [n, 1]), plus ``text_pair`` of the same shape for pair models;
outputs ``logits`` (FP32, [n, labels]) and ``labels`` (BYTES, [n]: the predicted labels of each input joined
by ``,`` — one label for single-label models, any number, possibly none, for multi-label models).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from service.core import DataPlane, InferResult, ModelView
from service.errors import BadRequest, Unprocessable
from service.frontend.http import Ctx, Reply, authorize, loads, read_body

INPUT_NAME = "text"
PAIR_NAME = "text_pair"
OUTPUTS = ("logits", "labels")
LABEL_SEPARATOR = ","
HEADER_LENGTH = b"inference-header-content-length"
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_FIELDS = frozenset({"name", "parameters"})


def _extra(where: str, given: dict[str, Any], allowed: frozenset[str]) -> None:
    if not allowed.issuperset(given):
        extra = sorted(set(given) - allowed)[:5]
        raise Unprocessable("; ".join(f"{where}{k}: Extra inputs are not permitted" for k in extra))


def _check_request(payload: Any) -> dict[str, Any]:
    """The request's structure (422, as a schema would say it); the semantics are checked in parse_inputs (400)."""
    if not isinstance(payload, dict):
        raise Unprocessable(f"body: expected a JSON object, not {type(payload).__name__}")
    _extra("", payload, REQUEST_FIELDS)
    if "id" in payload and payload["id"] is not None and not isinstance(payload["id"], str):
        raise Unprocessable("id: expected a string")
    if not isinstance(payload.get("parameters", {}), dict):
        raise Unprocessable("parameters: expected an object")
    inputs = payload.get("inputs")
    if inputs is None:
        raise Unprocessable("inputs: Field required")
    if not isinstance(inputs, list) or not inputs:
        raise Unprocessable("inputs: expected a non-empty list of input tensors")
    for i, tensor in enumerate(inputs):
        where = f"inputs.{i}."
        if not isinstance(tensor, dict):
            raise Unprocessable(f"inputs.{i}: expected an object")
        _extra(where, tensor, INPUT_FIELDS)
        for key in ("name", "shape", "datatype"):
            if key not in tensor:
                raise Unprocessable(f"{where}{key}: Field required")
        if not isinstance(tensor["name"], str) or not isinstance(tensor["datatype"], str):
            raise Unprocessable(f"{where}name and datatype: expected strings")
        shape = tensor["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise Unprocessable(f"{where}shape: expected a list of integers")
        if not isinstance(tensor.get("parameters", {}), dict):
            raise Unprocessable(f"{where}parameters: expected an object")
        if "data" in tensor and tensor["data"] is not None and not isinstance(tensor["data"], list):
            raise Unprocessable(f"{where}data: expected a list")
    outputs = payload.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise Unprocessable("outputs: expected a list")
        for i, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise Unprocessable(f"outputs.{i}.name: Field required")
            _extra(f"outputs.{i}.", out, OUTPUT_FIELDS)
            if not isinstance(out.get("parameters", {}), dict):
                raise Unprocessable(f"outputs.{i}.parameters: expected an object")
    return payload


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


def tensor_texts(tensor: dict[str, Any], binary: memoryview, offset: int) -> tuple[list[str], int]:
    """One BYTES input's strings (from JSON data or the binary section at ``offset``) and the next offset."""
    name = tensor["name"]
    if tensor["datatype"] != "BYTES":
        raise BadRequest(f"input {name!r} must have datatype BYTES, not {tensor['datatype']!r}")
    shape = tensor["shape"]
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise BadRequest(f"input {name!r} must have shape [n] or [n, 1], not {shape}")
    size = tensor.get("parameters", {}).get("binary_data_size")
    items: list[Any]
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"binary_data_size {size!r} does not match the {len(binary)} binary bytes sent")
        items = decode_bytes_tensor(bytes(binary[offset : offset + size]))
        offset += size
    elif tensor.get("data") is not None:
        items = _flatten(tensor["data"])
    else:
        raise BadRequest(f"input {name!r} has neither data nor binary_data_size")
    if len(items) != shape[0]:
        raise BadRequest(f"input {name!r} has shape {shape} but {len(items)} elements")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"element {i} of {name!r} is not valid UTF-8") from None
        if not isinstance(item, str):
            raise BadRequest(f"element {i} of {name!r} must be a string, not {type(item).__name__}")
        texts.append(item)
    return texts, offset


def parse_inputs(req: dict[str, Any], binary: bytes, view: ModelView) -> tuple[list[str], list[str] | None]:
    """``text`` (and ``text_pair`` for pair models) as lists of strings."""
    inputs = req["inputs"]
    expected = (INPUT_NAME, PAIR_NAME) if view.pair else (INPUT_NAME,)
    names = [t["name"] for t in inputs]
    for name in names:
        if name not in expected:
            raise BadRequest(f"unknown input {name!r}; this model takes {' and '.join(map(repr, expected))}")
    if len(inputs) != len(expected) or set(names) != set(expected):
        what = "exactly one input named 'text'" if not view.pair else "two inputs, 'text' and 'text_pair'"
        raise BadRequest(f"expected {what}, got {len(inputs)}")
    view_bin = memoryview(binary)
    offset = 0
    found: dict[str, list[str]] = {}
    for tensor in inputs:  # binary sections follow the order of the inputs in the header
        found[tensor["name"]], offset = tensor_texts(tensor, view_bin, offset)
    texts = found[INPUT_NAME]
    pairs = found.get(PAIR_NAME)
    if pairs is not None and len(pairs) != len(texts):
        raise BadRequest(f"inputs 'text' and 'text_pair' must have the same shape ({len(texts)} vs {len(pairs)})")
    return texts, pairs


def infer_options(req: dict[str, Any]) -> tuple[bool, float | None]:
    params = req.get("parameters", {})
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise BadRequest("parameter 'truncate' must be a boolean")
    timeout = params.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0):
        raise BadRequest("parameter 'timeout_s' must be a positive number")
    return truncate, timeout


def requested_outputs(req: dict[str, Any]) -> list[dict[str, Any]]:
    requested = req.get("outputs") or [{"name": n} for n in OUTPUTS]
    for out in requested:
        if out["name"] not in OUTPUTS:
            raise BadRequest(f"unknown output {out['name']!r}; outputs are {list(OUTPUTS)}")
        k = out.get("parameters", {}).get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise BadRequest("parameter 'classification' must be a positive integer")
    return requested


def encode_outputs(
    req: dict[str, Any], result: InferResult, requested: list[dict[str, Any]]
) -> tuple[dict[str, Any], bytes]:
    """The response header (model, outputs) and the binary section (empty when every output is JSON)."""
    view = result.model
    labels = view.labels
    n = len(result.predicted)
    logits = result.logits
    binary_default = bool(req.get("parameters", {}).get("binary_data_output", False))
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in requested:
        params = out.get("parameters", {})
        k = params.get("classification")
        data: np.ndarray | list[bytes]
        if k is not None:
            source = logits if out["name"] == "logits" else result.scores
            top = np.argsort(-source, axis=1, kind="stable")[:, : min(k, len(labels))]
            data = [f"{source[i, j]:f}:{j}:{labels[j]}".encode() for i in range(n) for j in top[i]]
            dtype, shape = "BYTES", [n, top.shape[1]]
        elif out["name"] == "logits":
            data, dtype, shape = logits, "FP32", list(logits.shape)
        else:
            data = [LABEL_SEPARATOR.join(labels[i] for i in row).encode() for row in result.predicted]
            dtype, shape = "BYTES", [n]
        tensor: dict[str, Any] = {"name": out["name"], "datatype": dtype, "shape": shape}
        if params.get("binary_data", binary_default):
            raw = data.tobytes() if isinstance(data, np.ndarray) else encode_bytes_tensor(data)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data.ravel().tolist() if isinstance(data, np.ndarray) else [v.decode() for v in data]
        tensors.append(tensor)
    header: dict[str, Any] = {"model_name": view.name, "model_version": view.version, "outputs": tensors}
    if req.get("id") is not None:
        header["id"] = req["id"]
    return header, b"".join(chunks)


def split_body(ctx: Ctx, body: bytes) -> tuple[bytes, bytes]:
    header_length = ctx.headers.get(HEADER_LENGTH)
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"invalid Inference-Header-Content-Length {header_length.decode('latin-1')!r}")
    cut = int(header_length)
    return body[:cut], body[cut:]


def infer_handler(plane: DataPlane) -> Any:
    settings = plane.settings
    limit = plane.limits.max_body_bytes

    async def infer(ctx: Ctx) -> Reply:
        authorize(ctx.headers, settings)
        view = plane.model(ctx.params["name"], ctx.params.get("version"))
        json_part, binary = split_body(ctx, await read_body(ctx, limit))
        req = _check_request(loads(json_part, "inference request"))
        texts, pairs = parse_inputs(req, binary, view)
        requested = requested_outputs(req)
        truncate, timeout = infer_options(req)
        result = await plane.infer(
            view, texts, pairs, truncate=truncate, timeout_s=timeout, gone=ctx.gone, timing=ctx.timing, span=ctx.span
        )
        header, chunks = encode_outputs(req, result, requested)
        head = orjson.dumps(header)
        if not chunks:
            return Reply(head, timed=True)
        return Reply(
            head + chunks,
            headers=[(b"inference-header-content-length", b"%d" % len(head))],
            content_type=b"application/octet-stream",
            timed=True,
        )

    return infer


def model_metadata(view: ModelView) -> dict[str, Any]:
    inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
    if view.pair:
        inputs.append({"name": PAIR_NAME, "datatype": "BYTES", "shape": [-1]})
    return {
        "name": view.name,
        "versions": [view.version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, len(view.labels)]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "labels": list(view.labels),
            "max_length": view.max_length,
            "variant": view.desc.variant,
            "problem_type": view.manifest.get("problem_type", "single_label"),
            "labels_output_separator": LABEL_SEPARATOR,
        },
    }
