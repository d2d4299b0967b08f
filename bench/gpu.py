"""The demo benchmark on a GPU: CUDA execution provider, fp32 and fp16 graphs, I/O binding.

The ceiling is raw ONNX Runtime on CUDA (inputs bound from host memory, logits bound on the device and copied back
once: :func:`bench.ceiling.make_runner`), batch sizes up to 256; the servers run with ``BERTSERVE_PROVIDER=cuda``
(the service refuses to start rather than quietly fall back to CPU). Printed last: bertserve's best throughput over
the CUDA ceiling. Without an ``fp16`` variant, one is made in a temporary copy of the bundle (ONNX Runtime's float16
converter, inputs and outputs kept fp32). Exits 0 with a message when CUDA cannot really be used: onnxruntime-gpu
lists CUDA even without a GPU and then runs on CPU, so the check is a real session's ``get_providers()``.

Usage: ``python -m bench.gpu --model-dir models/bbc [--variant fp32,fp16] [any bench.run option]``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from bench import run, tables
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
    argv = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
    return "unknown GPU"


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
    parser.set_defaults(variant=["fp32", "fp16"], batch_sizes=GPU_BATCH_SIZES)
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
        if "fp16" in args.variant:
            args.model_dir = bundle_with_fp16(args.model_dir, Path(tmp))
        cfg = run.Config(**vars(args))
        summary = run.run_comparison(cfg)
    summary["host"]["gpu"] = device
    path = tables.write_summary(summary, cfg.json, "gpu")
    print(f"GPU: {device}")
    print(tables.demo_table(summary))
    print(f"\nbertserve best / raw ONNX Runtime CUDA ceiling (target >= {CEILING_RATIO_TARGET}):")
    for variant, block in summary["variants"].items():
        ratio = max((p["vs_ceiling"] or 0 for p in block["points"] if p["server"] == "bertserve"), default=None)
        verdict = "-" if not ratio else ("met" if ratio >= CEILING_RATIO_TARGET else "NOT met")
        print(f"  {variant:<5s} {'-' if not ratio else f'{ratio:.3f}'} [{verdict}]")
    print(f"\nsummary: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
