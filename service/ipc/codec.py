"""The messages between API processes and the engine process, one typed record each.

msgspec Structs encoded as msgpack arrays (``array_like``: field names are not sent, the schema is this file),
tagged so one decoder per direction tells the kinds apart. Token ids and logits travel as raw little-endian
bytes. Errors travel as (type, message, headers) of service/errors.py's table, so the API process rebuilds the
same error class (:func:`service.errors.from_wire`).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from service import errors
from service.modelio import TokenSeq


class Seq(msgspec.Struct, array_like=True):
    ids: bytes  # int64, little-endian
    segment: int  # where the second text of a pair starts (len(ids) for a single text)


class Request(msgspec.Struct, array_like=True):
    rid: int
    model: str
    version: str
    seqs: list[Seq]
    deadline: float  # time.monotonic() of the engine's host (the processes share one clock)
    trace: tuple[str, int] | None  # the request span's (128-bit trace id as hex, span id), for the batch span


class Submit(msgspec.Struct, tag="submit", array_like=True):
    requests: list[Request]


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    rids: list[int]  # requests whose clients went away


class Call(msgspec.Struct, tag="call", array_like=True):
    rid: int
    method: str  # one of service.ipc.server.EngineServer.METHODS
    args: list[Any]


class Outcome(msgspec.Struct, array_like=True):
    """A finished request: what service.batching.Job holds, as bytes and numbers."""

    logits: bytes  # float32 [rows, labels]
    scores: bytes
    rows: int
    predicted: list[list[int]]
    queue_s: float
    inference_s: float
    batches: list[tuple[int, float, float]]


class Failure(msgspec.Struct, array_like=True):
    type: str
    message: str
    headers: dict[str, str]


class Reply(msgspec.Struct, array_like=True):
    rid: int
    outcome: Outcome | None = None  # a Submit's answer
    value: Any = None  # a Call's answer
    failure: Failure | None = None


class Results(msgspec.Struct, tag="results", array_like=True):
    generation: int  # changes whenever the engine's model table does
    ready: bool  # the engine is ready and every API process has its model table
    replies: list[Reply]


ToEngine = Submit | Cancel | Call

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_api = msgspec.msgpack.Decoder(Results)


def encode(message: Submit | Cancel | Call | Results) -> bytes:
    return _encoder.encode(message)


def decode_for_engine(frame: bytes) -> Submit | Cancel | Call:
    return _to_engine.decode(frame)


def decode_for_api(frame: bytes) -> Results:
    return _to_api.decode(frame)


def failure(exc: BaseException) -> Failure:
    kind, message, headers = errors.to_wire(exc)
    return Failure(kind, message, headers)


def error(failed: Failure) -> Exception:
    return errors.from_wire(failed.type, failed.message, failed.headers)


def seqs_of(seqs: list[TokenSeq]) -> list[Seq]:
    return [Seq(s.ids.tobytes(), s.segment) for s in seqs]


def token_seqs(seqs: list[Seq]) -> list[TokenSeq]:
    return [TokenSeq(np.frombuffer(s.ids, dtype=np.int64), s.segment) for s in seqs]


def outcome(job: Any) -> Outcome:
    """A finished service.batching.Job as an Outcome."""
    logits = np.ascontiguousarray(job.logits, dtype=np.float32)
    scores = np.ascontiguousarray(job.scores, dtype=np.float32)
    return Outcome(
        logits.tobytes(), scores.tobytes(), len(logits), job.predicted, job.queue_s, job.inference_s, job.batches
    )


def array(raw: bytes, rows: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32).reshape(rows, -1)
