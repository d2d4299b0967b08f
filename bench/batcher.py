"""bertserve without HTTP: the service's own data plane and engine (tokenizer, batcher, sessions) in-process.

Closed loop, like the load generator: ``--concurrency`` asyncio clients each submit one text (or
``--inputs-per-request``) through ``DataPlane.infer`` (what every protocol calls) and submit the next as soon
as the answer is back. Everything a request costs in the service except HTTP (parsing, JSON, the event loop's
socket work, the load generator and loopback TCP on the same cores) is in here, so ``ceiling / this / the HTTP
service`` splits the gap between the ceiling and the service into the batcher's share and HTTP's share.
Settings come from ``BERTSERVE_*`` exactly as for ``python -m service``.

CLI: ``python -m bench.batcher --model-dir DIR [--concurrency 64] [--duration 10] [--warmup 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench.workload import emit_report, latency_ms, load_texts, make_texts
from service.config import Settings
from service.core import DataPlane, LocalEngine
from service.engine import Engine
from service.metrics import Metrics


async def drive(
    plane: DataPlane, texts: list[str], concurrency: int, inputs_per_request: int, warmup: float, duration: float
) -> dict[str, Any]:
    """Run the closed loop for ``warmup + duration`` seconds; count only requests that finish in the window."""
    cursor = 0
    latencies: list[float] = []
    window_start = time.perf_counter() + warmup
    window_end = window_start + duration

    async def client() -> None:
        nonlocal cursor
        while time.perf_counter() < window_end:
            batch = [texts[(cursor + i) % len(texts)] for i in range(inputs_per_request)]
            cursor += inputs_per_request
            started = time.perf_counter()
            await plane.infer(plane.model(None), batch, timeout_s=60)
            finished = time.perf_counter()
            if window_start <= started and finished <= window_end:
                latencies.append(finished - started)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "inputs_per_request": inputs_per_request,
        "window_s": duration,
        "completed": len(lat),
        "requests_per_s": len(lat) / duration,
        "inputs_per_s": len(lat) * inputs_per_request / duration,
        "latency_ms": latency_ms(lat) if lat else None,
    }


async def run(
    settings: Settings, texts: list[str], concurrency: int, inputs_per_request: int, warmup: float, duration: float
) -> dict[str, Any]:
    metrics = Metrics()
    engine = Engine(settings, metrics)
    await engine.start()
    plane = DataPlane(settings, LocalEngine(engine), metrics)
    variant = plane.model(None).desc.variant
    try:
        result = await drive(plane, texts, concurrency, inputs_per_request, warmup, duration)
    finally:
        await engine.close()
    batches = next(iter(metrics.batch_size.collect())).samples
    count = sum(s.value for s in batches if s.name.endswith("_count"))
    total = sum(s.value for s in batches if s.name.endswith("_sum"))
    result["mean_batch_size"] = total / count if count else None
    result["variant"] = variant
    result["settings"] = settings.model_dump(mode="json", exclude={"api_key"})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batcher", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--texts", type=Path, help="JSON list of texts (default: the BBC workload)")
    parser.add_argument("--n-texts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", "-c", type=int, default=64)
    parser.add_argument("--inputs-per-request", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.inputs_per_request < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("concurrency and inputs per request must be >= 1, duration > 0, warm-up >= 0")
    settings = Settings(model_dir=args.model_dir, variant=args.variant, provider=args.provider)
    texts = load_texts(args.texts) if args.texts else make_texts(args.n_texts, args.seed)
    result = asyncio.run(run(settings, texts, args.concurrency, args.inputs_per_request, args.warmup, args.duration))
    lat = result["latency_ms"] or {}
    print(
        f"in-process bertserve c={args.concurrency} x{args.inputs_per_request}: {result['inputs_per_s']:.1f} "
        f"inputs/s, p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms, "
        f"mean batch {result['mean_batch_size'] or 0:.1f}",
        file=sys.stderr,
    )
    emit_report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
