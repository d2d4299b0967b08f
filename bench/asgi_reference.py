"""The reference front end: a raw ASGI app with bertserve's ``POST /v1/predict`` shape and no model behind it.

Why it exists: ``bench.frontend`` reports bertserve's throughput as a ratio to this app, measured in the same
run on the same machine. It does what any Python front end must do per request and nothing more: uvicorn with
uvloop and httptools (as the service runs), read the body, parse it with orjson, check ``{"inputs": str |
[str]}``, and serialize one fixed prediction per input in bertserve's response shape
(``{"model", "version", "predictions": [[{"label", "score"}...]], "labels": [[...]]}``, 3 labels). The gap
between this and bertserve is the cost of bertserve's own request path (framework, validation, tokenization,
batching hand-off, metrics).

Usage: ``python -m bench.asgi_reference --port P [--host 127.0.0.1] [--workers N]``; ``GET /readyz`` is 200.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 1 << 20
MAX_INPUTS = 64
LABELS = ("positive", "neutral", "negative")
# One prediction per input, sorted by score as bertserve sorts them; built per request like a real answer.
_SCORES = (0.91, 0.06, 0.03)
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _prediction() -> list[dict[str, Any]]:
    return [{"label": label, "score": score} for label, score in zip(LABELS, _SCORES, strict=True)]


def _error(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": message, "type": kind})


def validate(payload: Any) -> list[str] | str:
    """The texts of a request, or an error message (a str); the minimal checks bertserve also makes."""
    if not isinstance(payload, dict):
        return "body must be a JSON object"
    inputs = payload.get("inputs")
    if isinstance(inputs, str):
        return [inputs] if inputs else "inputs must not be empty"
    if isinstance(inputs, list) and inputs:
        if len(inputs) > MAX_INPUTS:
            return f"at most {MAX_INPUTS} inputs per request"
        if all(isinstance(text, str) and text for text in inputs):
            return inputs
        return "every input must be a non-empty string"
    return "inputs must be a string or a non-empty list of strings"


def predict_body(texts: list[str]) -> bytes:
    """bertserve's response for ``texts``, serialized once."""
    predictions = [_prediction() for _ in texts]
    labels = [[LABELS[0]] for _ in texts]
    return orjson.dumps({"model": "reference", "version": "1", "predictions": predictions, "labels": labels})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it is larger than MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI callable: ``POST /v1/predict``, ``GET /readyz`` and ``GET /healthz``; 404 otherwise."""
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/v1/predict" and method == "POST":
        raw = await _read_body(receive)
        if raw is None:
            await _respond(send, 413, _error("request body too large", "payload_too_large"))
            return
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _respond(send, 400, _error("body is not valid JSON", "invalid_json"))
            return
        texts = validate(payload)
        if isinstance(texts, str):
            await _respond(send, 422, _error(texts, "validation_error"))
            return
        await _respond(send, 200, predict_body(texts))
    elif path in ("/readyz", "/healthz") and method == "GET":
        await _respond(send, 200, b'{"status":"ok"}')
    else:
        await _respond(send, 404, _error("not found", "not_found"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.asgi_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one socket, shared)")
    args = parser.parse_args(argv)
    uvicorn.run(
        "bench.asgi_reference:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
