"""The in-process ceiling: the bundle's ONNX graph driven directly, no HTTP, no queue, no event loop.

Whatever a server adds can only cost time, so the best throughput measured here, with the same texts, tokenizer and
ONNX Runtime settings as the service, is what no server on this machine can beat. Every batch size runs in arrival
order (padded to the longest in each batch) and length-sorted (the best a batcher could do; the sorted batches are
visited in a shuffled order, so a run cut short by ``--max-seconds`` still sees every length), with the tokenizer
inside the timed loop (what a server must also do: this is the ceiling) and pre-tokenized (what tokenizing costs).

Each of those runs once per thread layout ``WxT``: W sessions of T intra-op threads each, computing W batches at
once (ONNX Runtime and the tokenizer release the GIL). By default the layouts are the two the service uses: one
session on every core (a batch that runs alone) and ``inference_workers`` sessions of ``intra_op_threads`` (the busy
service); on a small CPU two single-threaded batches at once beat one two-threaded batch. The best of every layout
is the ceiling; the batch-1 latency is the single-session one, what a lone client gets.

CLI: ``python -m bench.ceiling --model-dir DIR [--variant fp32] [--texts texts.json] [--json out.json]``: a line per
run on stderr, the report (every run, the best, the best pre-tokenized, batch 1) as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.procs import ints
from bench.workload import length_summary, load_texts, make_texts
from service.bundle import load_bundle
from service.config import Settings
from service.modelio import FEED_NAMES, Encoder, TokenSeq, pad_feeds
from service.runtime import session_options

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layout:
    """``workers`` sessions of ``threads`` intra-op threads each, computing batches at the same time."""

    workers: int
    threads: int

    def __str__(self) -> str:
        return f"{self.workers}x{self.threads}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        workers, _, threads = text.strip().partition("x")
        layout = cls(int(workers), int(threads))
        if layout.workers < 1 or layout.threads < 1:
            raise ValueError(f"layout {text!r}: workers and threads must be >= 1")
        return layout


def service_layouts(intra_op_threads: int | None = None) -> list[Layout]:
    """The layouts the service runs with its settings (BERTSERVE_* as the service reads them): solo (one session,
    all its threads) and busy (``inference_workers`` x intra-op threads); ``intra_op_threads`` overrides the latter."""
    settings = Settings(intra_op_threads=intra_op_threads) if intra_op_threads else Settings()
    solo = max(settings.solo_thread_count, settings.threads)  # no solo session: a lone batch runs on a worker's
    return list(dict.fromkeys([Layout(1, solo), Layout(settings.inference_workers, settings.threads)]))


def make_session(model_path: Path, threads: int, provider: str = "cpu") -> ort.InferenceSession:
    """A session with the service's own options (``service.runtime.session_options``, spinning as the service's
    ``ort_spinning`` setting says), so only the serving strategy differs between the ceiling and the service."""
    options = session_options(threads, Settings().ort_spinning)
    providers = [CUDA, CPU] if provider == "cuda" else [CPU]
    return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)


def cuda_active(session: ort.InferenceSession) -> bool:
    """True only if CUDA really runs the graph: onnxruntime-gpu lists CUDA as available even without a GPU and
    silently falls back to CPU, so ask the session, not ``get_available_providers()``."""
    return bool(session.get_providers()[0] == CUDA)


def input_names(session: ort.InferenceSession) -> tuple[str, ...]:
    """The model-I/O feeds this graph takes, in :data:`service.modelio.FEED_NAMES` order."""
    taken = {i.name for i in session.get_inputs()}
    return tuple(name for name in FEED_NAMES if name in taken)


def make_runner(session: ort.InferenceSession, io_binding: bool) -> Callable[[Feeds], Any]:
    """``feeds -> logits``; with I/O binding (CUDA) inputs are copied to the device once and logits back."""
    output = session.get_outputs()[0].name
    if not io_binding:
        return lambda feeds: session.run([output], feeds)[0]

    def run_bound(feeds: Feeds) -> Any:
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(output, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run_bound


def batches_for(lengths: Sequence[int], batch_size: int, order: str, seed: int) -> list[list[int]]:
    """Index batches: arrival order as given, or sorted by length then visited in a shuffled order."""
    indices = sorted(range(len(lengths)), key=lambda i: lengths[i]) if order == "sorted" else list(range(len(lengths)))
    groups = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if order == "sorted":
        random.Random(seed).shuffle(groups)
    return groups


def _drive(
    groups: Sequence[list[int]], runners: Sequence[Callable[[int], object]], max_seconds: float
) -> tuple[list[list[int]], list[float], float]:
    """Run ``runner(n)`` for the groups in order, ``len(runners)`` at once, until done or ``max_seconds``: workers
    take the next group from a shared counter, as the service's workers take the next batch from its queue.
    Returns the groups done, each one's latency and the wall time."""
    done: list[list[int]] = []
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(range(len(groups)))
    start = time.perf_counter()

    def work(runner: Callable[[int], object]) -> None:
        while True:
            with lock:
                n = next(cursor, None) if time.perf_counter() - start <= max_seconds else None
            if n is None:
                return
            t0 = time.perf_counter()
            runner(n)
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                done.append(groups[n])

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, latencies, time.perf_counter() - start


def measure(
    texts: Sequence[str],
    ids: Sequence[TokenSeq],
    encoder: Encoder,
    runs: Sequence[Callable[[Feeds], Any]],
    names: Sequence[str],
    layout: Layout,
    batch_size: int,
    order: str,
    tokenize: bool,
    max_seconds: float,
    seed: int = 0,
) -> dict[str, Any]:
    """One pass over the texts (or as much as fits in ``max_seconds``) in batches of ``batch_size``, one worker per
    session in ``runs``."""
    lengths = [len(s) for s in ids]
    groups = batches_for(lengths, batch_size, order, seed)

    def feeds_of(group: Sequence[int]) -> Feeds:
        return pad_feeds([ids[i] for i in group], encoder.pad_id, names)

    def tokenized(group: Sequence[int]) -> Feeds:
        return pad_feeds(encoder.encode([texts[i] for i in group]), encoder.pad_id, names)

    prepared = None if tokenize else [feeds_of(g) for g in groups]
    for run in runs:
        for g in groups[:2]:  # warm each session's arena for these shapes; not timed
            run(feeds_of(g))

    def runner(run: Callable[[Feeds], Any]) -> Callable[[int], object]:
        if prepared is not None:
            return lambda n: run(prepared[n])
        return lambda n: run(tokenized(groups[n]))

    done, latencies, seconds = _drive(groups, [runner(r) for r in runs], max_seconds)
    sequences = sum(len(g) for g in done)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in done)
    return {
        "workers": layout.workers,
        "threads": layout.threads,
        "batch_size": batch_size,
        "order": order,
        "tokenize": tokenize,
        "sequences": sequences,
        "seconds": round(seconds, 3),
        "sequences_per_s": round(sequences / seconds, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        "padding_ratio": round(padded / sum(lengths[i] for g in done for i in g), 3),
    }


def run_ceiling(
    model_dir: Path,
    variant: str,
    texts: Sequence[str],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    orders: Sequence[str] = ("arrival", "sorted"),
    tokenize_modes: Sequence[bool] = (True, False),
    max_seconds: float = 20.0,
    layouts: Sequence[Layout] | None = None,
    provider: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every (layout, batch size, order, tokenization) run; returns every result and the summary."""
    bundle = load_bundle(model_dir)
    layouts = list(layouts or service_layouts())
    model_path = bundle.model_path(variant)
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    ids = encoder.encode(texts)
    results: list[dict[str, Any]] = []
    for layout in layouts:
        sessions = [make_session(model_path, layout.threads, provider) for _ in range(layout.workers)]
        if provider == "cuda" and not all(cuda_active(s) for s in sessions):
            raise RuntimeError(f"CUDA execution provider not active (session uses {sessions[0].get_providers()})")
        names = input_names(sessions[0])
        runs = [make_runner(s, io_binding=provider == "cuda") for s in sessions]
        for tokenize in tokenize_modes:
            for batch_size in batch_sizes:
                for order in orders:
                    if batch_size == 1 and order == "sorted" and "arrival" in orders:
                        continue  # a batch of one has no padding: sorted is the same run
                    r = measure(
                        texts, ids, encoder, runs, names, layout, batch_size, order, tokenize, max_seconds, seed
                    )
                    results.append(r)
                    if log:
                        log(f"ceiling {variant} {layout} " + " ".join(f"{k}={v}" for k, v in r.items()))
        del sessions, runs  # free one layout's sessions (memory, thread pools) before the next

    def best(pool: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(pool, key=lambda r: r["sequences_per_s"]) if pool else None

    return {
        "variant": variant,
        "model_file": model_path.name,
        "layouts": [str(layout) for layout in layouts],
        "tokens": length_summary([len(s) for s in ids]),
        "results": results,
        "best": best([r for r in results if r["tokenize"]]),
        "best_pretokenized": best([r for r in results if not r["tokenize"]]),
        # batch 1 on one session: the latency a lone client can get (with the most threads, if several)
        "batch1": best([r for r in results if r["tokenize"] and r["batch_size"] == 1 and r["workers"] == 1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=ints, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per run")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per worker; 0 = as the service")
    parser.add_argument(
        "--layouts",
        type=lambda text: [Layout.parse(x) for x in text.split(",") if x],
        help="WxT,... sessions x intra-op threads each (default: the service's solo and busy layouts)",
    )
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    texts = load_texts(args.texts) if args.texts else make_texts(args.n_texts, args.seed)
    report = run_ceiling(
        args.model_dir,
        args.variant,
        texts,
        batch_sizes=args.batch_sizes,
        max_seconds=args.max_seconds,
        layouts=args.layouts or service_layouts(args.threads or None),
        provider=args.provider,
        seed=args.seed,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
