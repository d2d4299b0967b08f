"""The same comparison on a GPU: CUDA execution provider, fp32 and fp16 graphs, I/O binding.

The ceiling here is raw ONNX Runtime on CUDA (inputs bound from host memory, logits bound on the device and
copied back once: see :func:`bench.ceiling.make_runner`), batch sizes up to 256; the naive server and bertserve
run with the CUDA provider (``BERTSERVE_PROVIDER=cuda``, so the service refuses to start rather than quietly
falling back to CPU). The printed ratio is bertserve's best throughput over the raw ORT CUDA ceiling (target
>= 0.8).

When the bundle has no ``fp16`` variant, one is made in a temporary copy of the bundle (ONNX Runtime's float16
converter, inputs and outputs kept fp32), so the service can serve it like any other variant.

Exits 0 with a message when CUDA cannot really be used: onnxruntime-gpu lists the CUDA provider as available
even on machines without a GPU or without the CUDA libraries, and then silently runs on CPU, so the check is
``session.get_providers()`` of a real session, not ``get_available_providers()``.

Usage: ``python -m bench.gpu --model-dir models/bbc [--variant fp32,fp16] [any bench.run option]``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from bench import report as bench_report
from bench import run
from bench.ceiling import CUDA, cuda_active, make_session
from service.bundle import VARIANT_FILES, Variant, load_bundle, write_manifest

GPU_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CEILING_RATIO_TARGET = 0.8


def cuda_status(model_path: Path) -> tuple[bool, str]:
    """(usable, explanation): usable only if a real session on ``model_path`` runs on the CUDA provider."""
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider"
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(4)  # the fallback logs a scary error; we explain it ourselves
    try:
        session = make_session(model_path, threads=1, provider="cuda")
    except Exception as exc:  # any failure to create the session means: no usable CUDA here
        return False, f"creating a CUDA session failed: {exc}"
    finally:
        ort.set_default_logger_severity(previous)
    if not cuda_active(session):
        return False, (
            f"CUDA is listed as available but the session runs on {session.get_providers()} "
            "(no GPU, or missing CUDA/cuDNN libraries)"
        )
    return True, "CUDA execution provider active"


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"


def bundle_with_fp16(model_dir: Path, work: Path) -> Path:
    """``model_dir`` itself if it has an fp16 variant, else a copy with ``model.fp16.onnx`` added."""
    bundle = load_bundle(model_dir)
    if "fp16" in bundle.manifest.variants:
        return model_dir
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        import onnx
    except ImportError as exc:
        raise SystemExit("bench.gpu: making an fp16 variant needs the `onnx` package (extra [train])") from exc
    copy = work / bundle.path.name
    shutil.copytree(bundle.path, copy)
    model = OnnxModel(onnx.load(str(bundle.model_path("fp32"))))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(copy / VARIANT_FILES["fp16"]))
    variants = dict(bundle.manifest.variants) | {"fp16": Variant(file=VARIANT_FILES["fp16"])}
    write_manifest(copy, bundle.manifest.model_copy(update={"variants": variants}))
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = run.build_parser()
    parser.prog = "python -m bench.gpu"
    parser.description = __doc__.split("\n")[0]
    parser.set_defaults(variant="fp32,fp16", batch_sizes=GPU_BATCH_SIZES)
    args = parser.parse_args(argv)
    args.provider = "cuda"
    bundle = load_bundle(args.model_dir)
    usable, why = cuda_status(bundle.model_path("fp32"))
    if not usable:
        print(f"bench.gpu: no usable GPU, nothing measured: {why}")
        return 0
    device = gpu_name()
    print(f"bench.gpu: {why} on {device}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        variants = [v for v in args.variant.split(",") if v]
        if "fp16" in variants:
            args.model_dir = bundle_with_fp16(args.model_dir, Path(tmp))
        cfg = run.config_from_args(args)
        report, json_path, png_path = run.run_comparison(cfg)
    print(f"GPU: {device}")
    print(bench_report.format_report(report))
    print("\nbertserve best / raw ONNX Runtime CUDA ceiling (target >= 0.8):")
    for variant, block in report["variants"].items():
        ratio = ((block.get("ratios") or {}).get("best_vs_ceiling") or {}).get("bertserve")
        verdict = "-" if ratio is None else ("met" if ratio >= CEILING_RATIO_TARGET else "NOT met")
        shown = "-" if ratio is None else f"{ratio:.3f}"
        print(f"  {variant:<5s} {shown} [{verdict}]")
    print(f"\nwrote {json_path} and {png_path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
