"""The naive baseline: FastAPI + ONNX Runtime, one ``session.run`` per request, no batching.

This is what most people write first, and on a small CPU it is a strong baseline: a batch of one pads nothing.
It is deliberately idiomatic rather than tuned: a pydantic request model, a plain ``def`` endpoint (FastAPI runs
it in its thread pool, so several requests may run the session at once) and FastAPI's default JSON response.

It speaks the bertserve request/response shape of ``POST /v1/predict`` and answers ``/readyz``, so the same load
drives both. Its one session uses the service's session options (see
:func:`bench.ceiling.make_session`) on every core, as a per-request server usually is set up; the service
instead splits the cores between single-threaded workers, which is part of its serving strategy.

Run: ``python -m bench.naive_server --model-dir DIR --port 8001 [--variant fp32] [--threads N]``
(uvicorn with its standard extras: uvloop and httptools where installed, like the service).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.ceiling import cuda_active, input_names, make_session
from service.bundle import load_bundle
from service.config import Settings
from service.modelio import Encoder, TooLong, pad_feeds, softmax


class PredictRequest(BaseModel):
    inputs: str | list[str]
    top_k: int | None = None
    truncate: bool = True


class Model:
    """Bundle, session and tokenizer; ``predict`` tokenizes, runs and soft-maxes one request."""

    def __init__(self, model_dir: Path, variant: str, threads: int, provider: str) -> None:
        bundle = load_bundle(model_dir)
        self.manifest = bundle.manifest
        self.session: ort.InferenceSession = make_session(bundle.model_path(variant), threads, provider)
        if provider == "cuda" and not cuda_active(self.session):
            raise SystemExit("naive_server: CUDA execution provider could not be created")
        self.input_names = input_names(self.session)
        # the service's model I/O contract: same tokenizer set-up, same padding (to this request's longest input)
        self.encoder = Encoder.from_file(bundle.tokenizer_path, self.manifest.max_length)

    def predict(self, request: PredictRequest) -> dict[str, object]:
        texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
        if not texts:
            raise HTTPException(422, "inputs must not be empty")
        try:
            sequences = self.encoder.encode(texts, truncate=request.truncate)
        except TooLong as exc:
            raise HTTPException(422, f"an input is longer than {self.manifest.max_length} tokens") from exc
        feeds = pad_feeds(sequences, self.encoder.pad_id, self.input_names)
        probs = softmax(np.asarray(self.session.run(None, feeds)[0], dtype=np.float32))
        labels = self.manifest.labels
        k = len(labels) if request.top_k is None else max(1, min(request.top_k, len(labels)))
        predictions = []
        for row in probs:
            order = np.argsort(-row)[:k]
            predictions.append([{"label": labels[i], "score": float(row[i])} for i in order])
        return {"model": self.manifest.name, "version": self.manifest.version, "predictions": predictions}


def create_app(model: Model) -> FastAPI:
    app = FastAPI(title="naive baseline")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/predict")
    def predict(request: PredictRequest) -> dict[str, object]:
        return model.predict(request)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads; 0 = the service's intra_op_threads or all cores"
    )
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    # one session, on the service's intra_op_threads if set, else on every usable core (the usual single-session
    # set-up; the service itself splits the cores between its workers)
    threads = args.threads or Settings().intra_op_threads or len(os.sched_getaffinity(0))
    model = Model(args.model_dir, args.variant, threads, args.provider)
    uvicorn.run(create_app(model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
