"""The Open Inference Protocol (KServe v2, as Triton speaks it) as data: the inference request, its tensors, the
responses and documents. Both of its transports use this module: HTTP (protocols/v2_http.py) and gRPC
(protocols/v2_grpc.py, which builds the same request records from protobuf messages), so they cannot disagree.

Model: input ``text`` (BYTES, shape [n] or [n, 1]), plus ``text_pair`` of the same shape for pair models; outputs
``logits`` (FP32, [n, labels]) and ``labels`` (BYTES, [n]: the predicted labels of each input joined by ``,``:
one label for single-label models, any number, possibly none, for multi-label models). Triton's binary tensor
data extension (BYTES as 4-byte little-endian length + bytes; ``binary_data_size`` per tensor) and its
classification extension (``"classification": k`` on an output returns ``"score:index:label"`` strings) are
supported, as are Triton's documents that its tools read: model configuration, statistics, repository index
(docs/protocol/extension_*.md in Triton's server repository; a configuration is the ``ModelConfig`` protobuf as
JSON with its field names, statistics are ``{"model_stats": [...]}`` with ``{count, ns}`` durations).
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec
import numpy as np

from service.catalog import RepositoryEntry
from service.config import Settings
from service.core import InferResult, ModelView
from service.errors import BadRequest

INPUT_NAME = "text"
PAIR_NAME = "text_pair"
OUTPUTS = ("logits", "labels")
LABEL_SEPARATOR = ","
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository")


# -- the inference request (one declaration: it validates and documents) ---------------------------------------
class RequestInput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    data: list[Any] | None = None  # JSON tensor data (row-major, nested or flat); absent with binary data


class RequestOutput(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class InferenceRequest(msgspec.Struct, forbid_unknown_fields=True):
    inputs: Annotated[list[RequestInput], msgspec.Meta(min_length=1)]
    id: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(msgspec.Struct):
    model_name: str
    model_version: str
    outputs: list[ResponseOutput]
    id: str | None = None


SCHEMAS: tuple[type[msgspec.Struct], ...] = (InferenceRequest, InferenceResponse)


# -- tensors --------------------------------------------------------------------------------------------------
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


def tensor_texts(tensor: RequestInput, binary: memoryview, offset: int) -> tuple[list[str], int]:
    """One BYTES input's strings (from JSON data or the binary section at ``offset``) and the next offset."""
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {name!r} must have datatype BYTES, not {tensor.datatype!r}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise BadRequest(f"input {name!r} must have shape [n] or [n, 1], not {shape}")
    size = tensor.parameters.get("binary_data_size")
    items: list[Any]
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise BadRequest(f"binary_data_size {size!r} does not match the {len(binary)} binary bytes sent")
        items = decode_bytes_tensor(bytes(binary[offset : offset + size]))
        offset += size
    elif tensor.data is not None:
        items = _flatten(tensor.data)
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


def parse_inputs(req: InferenceRequest, binary: bytes, view: ModelView) -> tuple[list[str], list[str] | None]:
    """``text`` (and ``text_pair`` for pair models) as lists of strings."""
    expected = (INPUT_NAME, PAIR_NAME) if view.pair else (INPUT_NAME,)
    names = [t.name for t in req.inputs]
    for name in names:
        if name not in expected:
            raise BadRequest(f"unknown input {name!r}; this model takes {' and '.join(map(repr, expected))}")
    if len(names) != len(expected) or set(names) != set(expected):
        what = "exactly one input named 'text'" if not view.pair else "two inputs, 'text' and 'text_pair'"
        raise BadRequest(f"expected {what}, got {len(names)}")
    raw = memoryview(binary)
    offset = 0
    found: dict[str, list[str]] = {}
    for tensor in req.inputs:  # binary sections follow the order of the inputs in the header
        found[tensor.name], offset = tensor_texts(tensor, raw, offset)
    texts = found[INPUT_NAME]
    pairs = found.get(PAIR_NAME)
    if pairs is not None and len(pairs) != len(texts):
        raise BadRequest(f"inputs 'text' and 'text_pair' must have the same shape ({len(texts)} vs {len(pairs)})")
    return texts, pairs


def infer_options(req: InferenceRequest) -> tuple[bool, float | None]:
    """The request parameters bertserve reads: ``truncate`` (default true) and ``timeout_s``."""
    truncate = req.parameters.get("truncate", True)
    if not isinstance(truncate, bool):
        raise BadRequest("parameter 'truncate' must be a boolean")
    timeout = req.parameters.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0):
        raise BadRequest("parameter 'timeout_s' must be a positive number")
    return truncate, timeout


def requested_outputs(req: InferenceRequest) -> list[RequestOutput]:
    requested = req.outputs or [RequestOutput(name) for name in OUTPUTS]
    for out in requested:
        if out.name not in OUTPUTS:
            raise BadRequest(f"unknown output {out.name!r}; outputs are {list(OUTPUTS)}")
        k = out.parameters.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise BadRequest("parameter 'classification' must be a positive integer")
    return requested


def encode_outputs(
    req: InferenceRequest, result: InferResult, requested: list[RequestOutput], binary_default: bool
) -> tuple[dict[str, Any], bytes]:
    """The response header (model, outputs) and the binary section (empty when every output is JSON)."""
    view = result.model
    labels = view.labels
    n = len(result.predicted)
    logits = result.logits
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in requested:
        k = out.parameters.get("classification")
        data: np.ndarray | list[bytes]
        if k is not None:
            source = logits if out.name == "logits" else result.scores
            top = np.argsort(-source, axis=1, kind="stable")[:, : min(k, len(labels))]
            data = [f"{source[i, j]:f}:{j}:{labels[j]}".encode() for i in range(n) for j in top[i]]
            dtype, shape = "BYTES", [n, top.shape[1]]
        elif out.name == "logits":
            data, dtype, shape = logits, "FP32", list(logits.shape)
        else:
            data = [LABEL_SEPARATOR.join(labels[i] for i in row).encode() for row in result.predicted]
            dtype, shape = "BYTES", [n]
        tensor: dict[str, Any] = {"name": out.name, "datatype": dtype, "shape": shape}
        if out.parameters.get("binary_data", binary_default):
            raw = data.tobytes() if isinstance(data, np.ndarray) else encode_bytes_tensor(data)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data.ravel().tolist() if isinstance(data, np.ndarray) else [v.decode() for v in data]
        tensors.append(tensor)
    header: dict[str, Any] = {"model_name": view.name, "model_version": view.version, "outputs": tensors}
    if req.id is not None:
        header["id"] = req.id
    return header, b"".join(chunks)


# -- documents ------------------------------------------------------------------------------------------------
def model_metadata(view: ModelView) -> dict[str, Any]:
    inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
    if view.pair:
        inputs.append({"name": PAIR_NAME, "datatype": "BYTES", "shape": [-1]})
    return {
        "name": view.name,
        "versions": [view.version],
        "platform": PLATFORM,
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


def model_config(view: ModelView, settings: Settings) -> dict[str, Any]:
    """Triton's model configuration for a served model, with the batching settings really in force.

    It follows the v2 model metadata, as Triton's do (perf_analyzer reads both and sizes its inputs from the
    metadata): metadata ``text`` of shape ``[-1, 1]`` is a batched model, ``max_batch_size`` the client batch
    limit and dims ``[1]``; metadata ``[-1]`` (what :func:`model_metadata` says) is ``max_batch_size`` 0 with
    dims ``[-1]``, so perf_analyzer needs ``--shape text:1``. ``dynamic_batching`` reports the batcher's policy
    (its largest batch as the preferred size, its fill wait as the queue delay); the token budget and padding
    bound, which Triton has no field for, are in ``parameters``.
    """
    policy = view.desc.policy
    gpu = any(p.startswith(("CUDA", "Tensorrt")) for p in view.desc.providers)
    metadata = model_metadata(view)
    batched = len(metadata["inputs"][0]["shape"]) == 2
    batch, dims = (settings.max_client_batch, [1]) if batched else (0, [-1])
    lead = [] if batched else [-1]
    keep = settings.version_policy
    string_out = {"label_filename": "", "is_shape_tensor": False}
    return {
        "name": view.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"latest": {"num_versions": keep}} if keep else {"all": {}},
        "max_batch_size": batch,
        "input": [_tensor(t["name"], "TYPE_STRING", dims) for t in metadata["inputs"]],
        "output": [
            {"name": "logits", "data_type": "TYPE_FP32", "dims": [*lead, len(view.labels)], **string_out},
            {"name": "labels", "data_type": "TYPE_STRING", "dims": dims, **string_out},
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
                "count": int(policy["inference_workers"]),
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


def statistics(stats: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for the given (model, version) counters."""
    return {"model_stats": [model_stat(n, v, s) for (n, v), s in sorted(stats.items())]}


def repository_index(entries: list[RepositoryEntry]) -> list[dict[str, str]]:
    """Triton's ``$repository_index_response``: name, version, state (READY, LOADING, UNAVAILABLE), reason."""
    return [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]
