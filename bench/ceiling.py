"""The in-process ceiling: the bundle's ONNX graph driven directly, no HTTP, no queue, no event loop.

Whatever a server adds (parsing, scheduling, copies, JSON) can only cost time, so the best throughput measured
here, with the same texts, tokenizer and ONNX Runtime settings as the service, is what no server on this machine
can beat. Every batch size in ``--batch-sizes`` is run in arrival order (the texts as they come, padded to the
longest in each batch) and length-sorted (batches of similar lengths, the best a batcher could do), each with the
fast tokenizer inside the timed loop (what a server must also do: this is the ceiling) and pre-tokenized (to show
what tokenization costs). Sorted batches are visited in a shuffled order, so a run cut short by
``--max-seconds`` still sees the whole length distribution.

Each of those runs once per thread layout ``WxT``: W sessions of T intra-op threads each, computing W batches at
once from one shared list (W Python threads; ONNX Runtime and the tokenizer release the GIL). By default the
layouts are the two the service uses: one session on every core (a batch that runs alone, the solo lane) and
``inference_workers`` sessions of ``intra_op_threads`` (the busy service). On a small CPU two single-threaded
batches at once beat one two-threaded batch, so measuring only one session would understate the ceiling. The
best of every layout is the ceiling; the batch-1 latency is the single-session one, which is what a lone client
can get.

Each variant's achieved FLOP/s is also reported as a fraction of the CPU's fp32 peak (cores x FLOP/cycle x
clock), with matrix-multiply FLOPs computed from the graph's own dimensions and the real (unpadded) lengths, and
again for the padded lengths the hardware actually executed.

CLI: ``python -m bench.ceiling --model-dir DIR [--variant fp32] [--texts texts.json] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.workload import emit_report, latency_ms, length_summary, load_texts, make_texts
from service.bundle import load_bundle
from service.config import Settings
from service.modelio import FEED_NAMES, Encoder, TokenSeq, pad_feeds
from service.runtime import session_options as service_session_options

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


# -- session settings: the service's own Settings, so only the serving strategy differs ---------------------
def naive_threads(settings: Settings | None = None) -> int:
    """The naive server's one session: the service's ``intra_op_threads`` if set, else every usable core (the
    usual single-session setup; the service itself splits the cores between its workers)."""
    return (settings or Settings()).intra_op_threads or len(os.sched_getaffinity(0))


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
    """The layouts the service runs with its settings (``Settings()``: BERTSERVE_* as the service reads them):
    solo (one session, all its threads), busy (``inference_workers`` x intra-op threads).
    ``intra_op_threads`` overrides the per-worker threads."""
    settings = Settings(intra_op_threads=intra_op_threads) if intra_op_threads else Settings()
    solo = max(settings.solo_thread_count, settings.threads)  # no solo session: a lone batch runs on a worker's
    layouts = [Layout(1, solo), Layout(settings.inference_workers, settings.threads)]
    return list(dict.fromkeys(layouts))


def session_options(threads: int, spinning: bool | None = None) -> ort.SessionOptions:
    """The service's session options (service.runtime.ModelRuntime): full graph optimization, sequential
    execution, ``threads`` intra-op threads, no memory patterns (shapes change every batch), spinning as the
    service's ``ort_spinning`` setting says (off by default)."""
    spin = Settings().ort_spinning if spinning is None else spinning
    return service_session_options(threads, spin)


def make_session(
    model_path: Path, threads: int, provider: str = "cpu", spinning: bool | None = None
) -> ort.InferenceSession:
    providers = [CUDA, CPU] if provider == "cuda" else [CPU]
    return ort.InferenceSession(str(model_path), sess_options=session_options(threads, spinning), providers=providers)


def cuda_active(session: ort.InferenceSession) -> bool:
    """True only if CUDA really runs the graph: onnxruntime-gpu lists CUDA as available even without a GPU
    and silently falls back to CPU, so ask the session, not ``get_available_providers()``."""
    return session.get_providers()[0] == CUDA


# -- FLOPs and peak ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelDims:
    """The encoder dimensions that decide matmul FLOPs, read from the graph's weight shapes."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int

    def flops(self, seq_len: int) -> float:
        """Multiply-add FLOPs (x2) of one sequence: per layer QKV + output projections 8sH^2, feed-forward
        4sHI, attention scores and weighted values 4s^2H; plus the pooler 2H^2. Element-wise ops ignored."""
        s, h, i = seq_len, self.hidden, self.intermediate
        return self.layers * (8 * s * h * h + 4 * s * h * i + 4 * s * s * h) + 2 * h * h


def model_dims(model_path: Path) -> ModelDims | None:
    """Infer layers/hidden/intermediate from 2-D initializer shapes (works for fp32, fused and int8 graphs).

    hidden H is the width of the word-embedding table (the initializer with the most rows); the feed-forward
    width I is the most common other dimension of [H, I] / [I, H] weights, and each layer has one of each.
    """
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = [tuple(int(d) for d in init.dims) for init in graph.initializer if len(init.dims) == 2]
    if not shapes:
        return None
    vocab, hidden = max(shapes, key=lambda s: s[0])
    others: Counter[int] = Counter()
    for a, b in shapes:
        if a == hidden and b not in (hidden, 3 * hidden) and b > hidden:
            others[b] += 1
        elif b == hidden and a not in (hidden, vocab) and a > hidden and a % hidden == 0:
            others[a] += 1
    if not others:
        return None
    intermediate = others.most_common(1)[0][0]
    layers = others[intermediate] // 2
    return ModelDims(layers, hidden, intermediate, vocab) if layers else None


def _cpu_flags_and_clock() -> tuple[set[str], float | None, str]:
    flags: set[str] = set()
    mhz: float | None = None
    model = "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags, mhz, model
    if m := re.search(r"^flags\s*:\s*(.*)$", text, re.M):
        flags = set(m.group(1).split())
    if m := re.search(r"^model name\s*:\s*(.*)$", text, re.M):
        model = m.group(1).strip()
    if m := re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M):
        mhz = float(m.group(1))
    max_file = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    with contextlib.suppress(OSError, ValueError):  # the boost clock, where exposed, is the honest peak
        mhz = max(mhz or 0.0, int(max_file.read_text()) / 1000.0)
    return flags, mhz, model


def cpu_peak() -> dict[str, Any]:
    """fp32 peak FLOP/s of the cores this process may use: cores x FLOP/cycle x clock.

    FLOP/cycle assumes two FMA pipes per core: 2 x 8 lanes x 2 = 32 with AVX2+FMA, 64 with AVX-512,
    16 with AVX only, 8 otherwise. The clock is the kernel's max frequency where exposed, else /proc/cpuinfo.
    """
    flags, mhz, model = _cpu_flags_and_clock()
    if "avx512f" in flags:
        per_cycle = 64
    elif {"avx2", "fma"} <= flags:
        per_cycle = 32
    elif "avx" in flags:
        per_cycle = 16
    else:
        per_cycle = 8
    cores = len(os.sched_getaffinity(0))
    peak = cores * per_cycle * mhz * 1e6 if mhz else None
    return {"cpu": model, "cores": cores, "flop_per_cycle_per_core": per_cycle, "clock_mhz": mhz, "peak_flops": peak}


# -- the measurement -----------------------------------------------------------------------------------
def input_names(session: ort.InferenceSession) -> tuple[str, ...]:
    """The model-I/O feeds this graph takes, in :data:`service.modelio.FEED_NAMES` order."""
    taken = {i.name for i in session.get_inputs()}
    return tuple(name for name in FEED_NAMES if name in taken)


def build_feeds(encoder: Encoder, texts: Sequence[str], names: Sequence[str] = FEED_NAMES) -> dict[str, np.ndarray]:
    """Texts -> padded int64 feeds exactly as the service builds them: :class:`service.modelio.Encoder` (the
    bundle's tokenizer, truncating at max_length) then :func:`service.modelio.pad_feeds` (the tokenizer's pad
    id). The ceiling has no padding of its own, so it cannot disagree with the service about it."""
    return pad_feeds(encoder.encode(texts), encoder.pad_id, names)


def make_runner(session: ort.InferenceSession, io_binding: bool) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``feeds -> logits``; with I/O binding (CUDA) inputs are copied to the device once and logits back."""
    output = session.get_outputs()[0].name
    if not io_binding:
        return lambda feeds: session.run([output], feeds)[0]

    def run_bound(feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(output, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run_bound


@dataclass
class VariantResult:
    workers: int
    threads: int
    batch_size: int
    order: str
    tokenize: bool
    sequences: int
    seconds: float
    sequences_per_s: float
    batch_latency_ms: dict[str, float]
    real_tokens: int
    padded_tokens: int
    padding_ratio: float
    useful_flops_per_s: float | None
    executed_flops_per_s: float | None
    fraction_of_peak: float | None
    executed_fraction_of_peak: float | None


def batches_for(lengths: Sequence[int], batch_size: int, order: str, seed: int) -> list[list[int]]:
    """Index batches: arrival order as given, or sorted by length then visited in a shuffled order."""
    indices = list(range(len(lengths)))
    if order == "sorted":
        indices.sort(key=lambda i: lengths[i])
    groups = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if order == "sorted":
        random.Random(seed).shuffle(groups)
    return groups


def _drive(
    groups: Sequence[list[int]],
    runners: Sequence[Callable[[int], object]],
    max_seconds: float,
) -> tuple[list[list[int]], list[float], float]:
    """Run ``runner(n)`` for the groups in order, ``len(runners)`` at once, until done or ``max_seconds``.

    Returns the groups done, each one's latency and the wall time. Workers take the next group from a shared
    counter, as the service's workers take the next batch from its queue.
    """
    perf = time.perf_counter
    done: list[list[int]] = []
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(range(len(groups)))
    start = perf()

    def work(runner: Callable[[int], object]) -> None:
        while True:
            with lock:
                n = next(cursor, None) if perf() - start <= max_seconds else None
            if n is None:
                return
            t0 = perf()
            runner(n)
            t1 = perf()
            with lock:
                latencies.append(t1 - t0)
                done.append(groups[n])

    if len(runners) == 1:
        work(runners[0])
    else:
        threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return done, latencies, perf() - start


def measure(
    texts: Sequence[str],
    ids: Sequence[TokenSeq],
    encoder: Encoder,
    runs: Sequence[Callable[[dict[str, np.ndarray]], np.ndarray]],
    names: Sequence[str],
    batch_size: int,
    order: str,
    tokenize: bool,
    max_seconds: float,
    dims: ModelDims | None,
    peak: float | None,
    seed: int = 0,
    threads: int = 0,
) -> VariantResult:
    """One pass over the texts (or as much as fits in ``max_seconds``) in batches of ``batch_size``, with one
    worker per session in ``runs`` (``threads`` intra-op threads each, recorded in the result)."""
    lengths = [len(s) for s in ids]
    groups = batches_for(lengths, batch_size, order, seed)

    def feeds_of(group: Sequence[int]) -> dict[str, np.ndarray]:
        return pad_feeds([ids[i] for i in group], encoder.pad_id, names)

    prepared = None if tokenize else [feeds_of(g) for g in groups]
    for run in runs:
        for g in groups[:2]:  # warm each session's arena for these shapes; not timed
            run(feeds_of(g))

    def runner(run: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Callable[[int], object]:
        if prepared is not None:
            return lambda n: run(prepared[n])
        return lambda n: run(build_feeds(encoder, [texts[i] for i in groups[n]], names))

    done, latencies, seconds = _drive(groups, [runner(r) for r in runs], max_seconds)
    sequences = sum(len(g) for g in done)
    real = sum(lengths[i] for g in done for i in g)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in done)
    useful = executed = None
    if dims is not None:
        useful = sum(dims.flops(lengths[i]) for g in done for i in g) / seconds
        executed = sum(len(g) * dims.flops(max(lengths[i] for i in g)) for g in done) / seconds
    lat = sorted(latencies)
    return VariantResult(
        workers=len(runs),
        threads=threads,
        batch_size=batch_size,
        order=order,
        tokenize=tokenize,
        sequences=sequences,
        seconds=seconds,
        sequences_per_s=sequences / seconds,
        batch_latency_ms=latency_ms(lat),
        real_tokens=real,
        padded_tokens=padded,
        padding_ratio=padded / real,
        useful_flops_per_s=useful,
        executed_flops_per_s=executed,
        fraction_of_peak=useful / peak if useful is not None and peak else None,
        executed_fraction_of_peak=executed / peak if executed is not None and peak else None,
    )


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
    """Measure every (layout, batch size, order, tokenization) run and return the JSON-able report."""
    bundle = load_bundle(model_dir)
    layouts = list(layouts or service_layouts())
    model_path = bundle.model_path(variant)
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    ids = encoder.encode(texts)
    dims = model_dims(model_path)
    peak_info = cpu_peak()
    peak = peak_info["peak_flops"] if provider == "cpu" else None
    results: list[VariantResult] = []
    providers_in_use: list[str] = []
    names: tuple[str, ...] = FEED_NAMES
    for layout in layouts:
        sessions = [make_session(model_path, layout.threads, provider) for _ in range(layout.workers)]
        if provider == "cuda" and not all(cuda_active(s) for s in sessions):
            raise RuntimeError(f"CUDA execution provider not active (session uses {sessions[0].get_providers()})")
        providers_in_use = sessions[0].get_providers()
        names = input_names(sessions[0])
        runs = [make_runner(s, io_binding=provider == "cuda") for s in sessions]
        for tokenize in tokenize_modes:
            for batch_size in batch_sizes:
                for order in orders:
                    if batch_size == 1 and order == "sorted" and "arrival" in orders:
                        continue  # a batch of one has no padding: sorted is the same run
                    r = measure(
                        texts,
                        ids,
                        encoder,
                        runs,
                        names,
                        batch_size,
                        order,
                        tokenize,
                        max_seconds,
                        dims,
                        peak,
                        seed,
                        threads=layout.threads,
                    )
                    results.append(r)
                    if log:
                        frac = f" {100 * r.fraction_of_peak:.1f}% of peak" if r.fraction_of_peak else ""
                        log(
                            f"ceiling {variant} {layout} bs={batch_size:<3d} {order:<7s} tokenize={tokenize!s:<5s} "
                            f"{r.sequences_per_s:8.1f} seq/s  batch p50={r.batch_latency_ms['p50']:7.2f}ms  "
                            f"padding x{r.padding_ratio:.2f}{frac}"
                        )
        del sessions, runs  # free one layout's sessions (memory, thread pools) before the next

    def best(tokenized: bool) -> dict[str, Any] | None:
        pool = [r for r in results if r.tokenize == tokenized]
        return asdict(max(pool, key=lambda r: r.sequences_per_s)) if pool else None

    def batch1(tokenized: bool) -> dict[str, Any] | None:
        """Batch 1 on one session: the latency a lone client can get (with the most threads, if several)."""
        pool = [r for r in results if r.tokenize == tokenized and r.batch_size == 1 and r.workers == 1]
        return asdict(max(pool, key=lambda r: r.threads)) if pool else None

    return {
        "model_dir": str(bundle.path),
        "model": bundle.manifest.name,
        "version": bundle.manifest.version,
        "variant": variant,
        "model_file": model_path.name,
        "provider": provider,
        "providers_in_use": providers_in_use,
        "layouts": [str(layout) for layout in layouts],
        "onnxruntime": ort.__version__,
        "n_texts": len(texts),
        "tokens": length_summary([len(s) for s in ids]),
        "model_dims": asdict(dims) if dims else None,
        "cpu": peak_info,
        "results": [asdict(r) for r in results],
        "best": best(True),
        "best_pretokenized": best(False),
        "batch1": batch1(True),
        "batch1_pretokenized": batch1(False),
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=_ints, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--orders", default="arrival,sorted")
    parser.add_argument("--no-pretokenized", action="store_true", help="skip the runs without tokenization")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per variant")
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
        orders=[o for o in args.orders.split(",") if o],
        tokenize_modes=(True,) if args.no_pretokenized else (True, False),
        max_seconds=args.max_seconds,
        layouts=args.layouts or service_layouts(args.threads or None),
        provider=args.provider,
        seed=args.seed,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
