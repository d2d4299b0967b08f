"""Overload and faults over real HTTP, with real models built here (random weights, real ONNX Runtime):

- at ten times the measured capacity, with a small queue, the server sheds load with fast 429s, the requests it
  admits keep bounded latency, its resident memory stays bounded, and it serves normally once the load stops;
- a batch that really fails inside ONNX Runtime fails only the requests in that batch (500, JSON error) and the
  server keeps serving.

Capacity has to be set by inference, not by HTTP, for "ten times capacity" to mean anything: a client on the
same 2 cores cannot offer ten times what the HTTP layer handles for the tiny test model. So the overload test
uses a bigger random-init BERT (4 layers, hidden 256: ~30 ms per 250-token sequence on one thread), served with
one intra-op thread, and requests of four such texts: ~8 requests/s of capacity, so ten times that is ~80
requests/s, which a plain asyncio client offers on time even on a busy machine.

The failure test uses a model whose embedding table is smaller than its tokenizer's vocabulary (a real packaging
mistake): any text with a token id past the table makes ONNX Runtime's Gather raise "indices element out of data
bounds" for the whole batch, while texts of common words compute normally.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from service.bundle import TOKENIZER_NAME

LABELS = ["negative", "neutral", "positive"]
LONG_TEXT = "the film was great and the actors were good " * 30  # truncated to max_length tokens
INPUTS = 4  # long texts per overload request: inference, not HTTP, must set the capacity
SMALL_VOCAB = 5000  # ids of common words and of the warm-up text are below; "zebra" (29145) is not
GOOD_TEXTS = ["the film was good", "it was bad", "a fine day", "the film was good and it was fine"]
BAD_TEXTS = ["a zebra", "quixotic zebra", "the xylophone was good"]


def build_random_bundle(
    out: Path,
    tokenizer_dir: Path,
    *,
    version: str = "1",
    vocab_size: int = 30522,
    hidden: int = 32,
    layers: int = 2,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """A bundle around a random-init BertForSequenceClassification, exported by torch.onnx (fp32 variant only),
    with the tokenizer files of ``tokenizer_dir`` and a manifest written by ``service.bundle.write_manifest``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from service.bundle import INPUT_NAMES, Manifest, Variant, write_manifest

    out.mkdir(parents=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden % 4 == 0 else 1,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, max_length),
        num_labels=len(LABELS),
    )
    model = BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    ids = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in the sample, so the mask is not traced as a constant
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {"logits": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about shape-only branches in transformers' mask code
        torch.onnx.export(
            Logits(),
            (ids, mask, torch.zeros_like(ids)),
            str(out / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes=axes,
        )
    for name in (TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    manifest = Manifest(
        name="random",
        version=version,
        labels=LABELS,
        max_length=max_length,
        opset=17,
        base_model=f"random-init BERT ({layers} layers, hidden {hidden}, vocab {vocab_size})",
        variants={"fp32": Variant(file="model.onnx")},
    )
    write_manifest(out, manifest)
    return out


def rss(server: Any) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- overload ------------------------------------------------------------------------------------------------
MAX_QUEUE = 16
MAX_BATCH = 8


@pytest.fixture(scope="module")
def heavy_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    return build_random_bundle(
        tmp_path_factory.mktemp("heavy") / "heavy", tiny_bundle, hidden=256, layers=4, max_length=256
    )


def predict_request(port: int, texts: list[str]) -> bytes:
    body = json.dumps({"inputs": texts}).encode()
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, one request per connection at a time.

    httpx's connection pool costs milliseconds of client CPU per request once hundreds are pending, so at ten
    times capacity the client, not the server, would become the bottleneck and the test would measure it.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        try:
            writer.write(raw)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append(conn)
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def closed_loop(port: int, concurrency: int, seconds: float) -> tuple[int, list[float], Counter[int]]:
    """``concurrency`` clients back to back for ``seconds``: (completed 200s, their latencies, statuses)."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    end = time.monotonic() + seconds
    client = RawClient(port)
    raw = predict_request(port, [LONG_TEXT] * INPUTS)

    async def worker() -> None:
        while time.monotonic() < end:
            t0 = time.monotonic()
            status, _, _ = await client.send(raw)
            statuses[status] += 1
            if status == 200:
                latencies.append(time.monotonic() - t0)

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 30)
    finally:
        client.close()
    return statuses[200], latencies, statuses


async def open_loop(port: int, rate: float, seconds: float) -> list[tuple[float, int, float, str | None]]:
    """Send at a fixed ``rate`` whatever the answers (open loop) for ``seconds``.
    Returns (send offset, status or 0 for a transport error, latency, Retry-After) per request."""
    results: list[tuple[float, int, float, str | None]] = []
    client = RawClient(port)
    raw = predict_request(port, [LONG_TEXT] * INPUTS)

    async def one(at: float) -> None:
        t0 = time.monotonic()
        try:
            status, headers, _ = await client.send(raw)
        except (OSError, asyncio.IncompleteReadError):
            results.append((at, 0, time.monotonic() - t0, None))
            return
        results.append((at, status, time.monotonic() - t0, headers.get("retry-after")))

    tasks = []
    start = time.monotonic()
    try:
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(time.monotonic() - start)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        client.close()
    return sorted(results)


def test_ten_times_capacity_sheds_fast_keeps_latency_and_memory_bounded(start_server: Any, heavy_bundle: Path) -> None:
    server = start_server(
        model_dir=heavy_bundle, max_queue=MAX_QUEUE, max_batch_size=MAX_BATCH, intra_op_threads=1, warmup_runs=1
    )
    # capacity: enough closed-loop clients to keep the worker busy, never enough to fill the queue
    assert 3 * INPUTS <= MAX_QUEUE
    asyncio.run(closed_loop(server.port, 2, 1.0))  # warm the connection pool and arenas
    done, _, statuses = asyncio.run(closed_loop(server.port, 3, 4.0))
    assert set(statuses) == {200}, statuses
    capacity = done / 4.0  # requests of INPUTS sequences per second
    single = pct(asyncio.run(closed_loop(server.port, 1, 1.0))[1], 50)
    rss_before = rss(server)

    rate = 10 * capacity
    seconds = 5.0
    wall = time.monotonic()
    results = asyncio.run(open_loop(server.port, rate, seconds))
    wall = time.monotonic() - wall
    rss_peak_after = rss(server)
    by_status = Counter(status for _, status, _, _ in results)
    shed = [lat for _, status, lat, _ in results if status == 429]
    served = [lat for _, status, lat, _ in results if status == 200]
    offered = len(results) / max(results[-1][0], 1e-9) if results else 0.0
    bound = 3 * (MAX_QUEUE + MAX_BATCH) / (capacity * INPUTS) + 0.5  # queue ahead + own batch, slack for a busy box
    print(
        f"\noverload: capacity {capacity:.1f} req/s (p50 alone {single * 1e3:.0f} ms); offered {offered:.0f} req/s "
        f"for {seconds:.0f} s ({len(results)} requests, wall {wall:.1f} s); statuses {dict(by_status)}; "
        f"429 p50/p99 {pct(shed, 50) * 1e3:.1f}/{pct(shed, 99) * 1e3:.1f} ms; accepted p50/p99 "
        f"{pct(served, 50) * 1e3:.0f}/{pct(served, 99) * 1e3:.0f} ms (bound {bound * 1e3:.0f} ms); "
        f"RSS {rss_before / 2**20:.1f} -> {rss_peak_after / 2**20:.1f} MiB"
    )

    assert offered >= 7 * capacity, f"the client offered only {offered:.0f} req/s, not ~10x {capacity:.1f}"
    assert set(by_status) <= {200, 429}, f"overload must shed with 429, not fail: {dict(by_status)}"
    assert by_status[429] > len(results) / 2, "ten times capacity was not shed"
    assert len(served) >= 0.5 * capacity * seconds, "the server stopped doing useful work under overload"
    assert all(ra is not None and int(ra) >= 1 for _, s, _, ra in results if s == 429), "429 without Retry-After"
    # Fast refusal: absolute (with room for other work on a shared 2-core box; measured ~10 ms p50, ~20 ms p99)
    # and relative to a served request (~1.4 s here): a 429 that waited in the queue would cost as much.
    assert pct(shed, 50) < 0.1 and pct(shed, 99) < 0.5, "429s are not fast"
    assert pct(shed, 99) < 0.25 * pct(served, 50), "a refusal cost a sizeable part of a served request"
    assert pct(served, 99) < bound, f"accepted latency p99 {pct(served, 99):.2f} s over the {bound:.2f} s bound"
    assert rss_peak_after - rss_before < 64 * 2**20, "resident memory grew under overload"
    assert server.metric("bertserve_rejected_total", {"reason": "queue_full"}) == by_status[429]

    # load stopped: the queue empties and the server serves normally again
    deadline = time.monotonic() + 10
    while server.metric("bertserve_queue_depth") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("bertserve_queue_depth") == 0
    assert server.client.get("/readyz").status_code == 200
    after = []
    for _ in range(10):
        t0 = time.monotonic()
        r = server.client.post("/v1/predict", json={"inputs": [LONG_TEXT] * INPUTS})
        after.append(time.monotonic() - t0)
        assert r.status_code == 200, r.text
    assert pct(after, 50) < 3 * single + 0.05, f"after overload p50 {pct(after, 50):.3f} s vs {single:.3f} s before"
    assert rss(server) - rss_before < 64 * 2**20


# -- a failing batch -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mismatched_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """Embedding table of SMALL_VOCAB rows behind a 30522-token tokenizer."""
    bundle = build_random_bundle(tmp_path_factory.mktemp("mismatch") / "mismatch", tiny_bundle, vocab_size=SMALL_VOCAB)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / TOKENIZER_NAME))
    assert all(max(tok.encode(t).ids) < SMALL_VOCAB for t in GOOD_TEXTS)
    assert all(max(tok.encode(t).ids) >= SMALL_VOCAB for t in BAD_TEXTS)
    return bundle


def test_a_failing_batch_fails_only_its_own_requests(start_server: Any, mismatched_bundle: Path) -> None:
    server = start_server(model_dir=mismatched_bundle, max_wait_ms=20, max_batch_size=8)
    client = server.client
    # alone: a bad text is a JSON 500, a good one is served, and the server is fine
    r = client.post("/v1/predict", json={"inputs": BAD_TEXTS[0]})
    assert r.status_code == 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error", "type", "request_id"} and r.json()["type"] == "inference_failed"
    assert "inference failed" in r.json()["error"]
    assert client.post("/v1/predict", json={"inputs": GOOD_TEXTS[0]}).status_code == 200
    assert server.metric("bertserve_batch_failures_total") == 1

    # a burst of single-text requests, 1 bad in 8, co-batched by the dynamic batcher
    texts = [BAD_TEXTS[i % len(BAD_TEXTS)] if i % 8 == 3 else GOOD_TEXTS[i % len(GOOD_TEXTS)] for i in range(160)]
    seqs_before = server.metric("bertserve_batch_size_sum")
    failures_before = server.metric("bertserve_batch_failures_total")

    responses = server.predict_concurrently(texts, concurrency=48)
    codes = Counter(r.status_code for r in responses)
    failed_batches = server.metric("bertserve_batch_failures_total") - failures_before
    computed = server.metric("bertserve_batch_size_sum") - seqs_before  # sequences of the batches that succeeded
    bad_sent = sum(t in BAD_TEXTS for t in texts)
    good_failed = sum(r.status_code == 500 for r, t in zip(responses, texts, strict=True) if t in GOOD_TEXTS)
    print(
        f"\nfailing batches: {len(texts)} requests ({bad_sent} bad), statuses {dict(codes)}, "
        f"{failed_batches:.0f} batches failed, {good_failed} good requests shared a failed batch"
    )

    assert set(codes) <= {200, 500}, codes
    for r, text in zip(responses, texts, strict=True):
        if text in BAD_TEXTS:
            assert r.status_code == 500 and r.json()["type"] == "inference_failed", r.text
        elif r.status_code == 200:
            assert len(r.json()["predictions"][0]) == len(LABELS)
        else:
            assert r.json()["type"] == "inference_failed"
    # every 500 is exactly a sequence of a failed batch: sent - computed in successful batches
    assert codes[500] == len(texts) - computed, (codes, computed)
    assert 1 <= failed_batches <= bad_sent
    assert good_failed <= failed_batches * 7  # at most the other members of the failed batches
    assert codes[200] >= len(texts) - bad_sent * 8

    # a request spanning a good and a bad text fails as a whole; the server keeps serving afterwards
    r = client.post("/v1/predict", json={"inputs": [GOOD_TEXTS[0], BAD_TEXTS[0]]})
    assert r.status_code == 500 and r.json()["type"] == "inference_failed"
    for text in GOOD_TEXTS * 3:
        assert client.post("/v1/predict", json={"inputs": text}).status_code == 200
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [BAD_TEXTS[1]]}]}
    r = client.post("/v2/models/random/infer", json=v2)
    assert r.status_code == 500 and r.json()["type"] == "inference_failed"
    assert client.get("/readyz").status_code == 200
    assert server.proc.poll() is None
