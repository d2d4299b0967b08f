"""Helpers for the training tests: tiny data with uneven classes, the fit command line, torchrun, served logits.

Every run is a real process (``python -m training fit``, or torchrun starting it) on the tiny 2-layer BERT of
training/tiny.py, so each takes seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.bundle import load_bundle
from service.modelio import Encoder, pad_feeds
from training.tiny import TINY_LABELS, tiny_dataset, write_rows, write_tiny_base_model

REPO = Path(__file__).resolve().parents[2]
# 80 + 80 + 71 rows: the validation split has 8 + 8 + 7 = 23 rows, which two processes cannot split evenly
CLASS_SIZES = (80, 80, 71)


def uneven_rows(seed: int = 0) -> list[tuple[str, str]]:
    rows = tiny_dataset(n_per_class=max(CLASS_SIZES), seed=seed)
    kept: list[tuple[str, str]] = []
    left = dict(zip(TINY_LABELS, CLASS_SIZES, strict=True))
    for text, label in rows:
        if left[label] > 0:
            left[label] -= 1
            kept.append((text, label))
    return kept


def write_uneven_csv(path: Path) -> Path:
    return write_rows(path, ["text", "label"], uneven_rows())


def write_tiny_work(directory: Path) -> Path:
    """A working directory for tiny fits: the random tiny base model in ``base/``, the uneven CSV in ``data.csv``."""
    write_tiny_base_model(directory / "base", seed=0)
    write_uneven_csv(directory / "data.csv")
    return directory


def fit_args(data: Path, base: Path, output: Path, cache: Path, *extra: str, epochs: int = 4) -> list[str]:
    """A tiny recipe: global batch 8, max length 64, one thread per process, quiet but for the log lines."""
    return [
        "fit",
        "--data",
        str(data),
        "--base-model",
        str(base),
        "--output",
        str(output),
        "--cache-dir",
        str(cache),
        "--epochs",
        str(epochs),
        "--max-length",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--threads",
        "1",
        "--version",
        "1",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun_argv(nproc: int, args: Sequence[str], *launcher: str) -> list[str]:
    """``torchrun --nproc-per-node N [launcher flags] -m training ARGS`` (torchrun as a module: same interpreter)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *(launcher or ("--standalone",)),
        "-m",
        "training",
        *args,
    ]


def env() -> dict[str, str]:
    """The test's environment for child processes, with this checkout first on the import path."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(argv: Sequence[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout, check=False)


def fit_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "training", *args]


def served_logits(bundle_dir: Path, texts: list[str]) -> np.ndarray:
    """The fp32 graph's logits, fed exactly as the service feeds it."""
    bundle = load_bundle(bundle_dir)
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    feeds = pad_feeds(encoder.encode(texts), encoder.pad_id, bundle.manifest.inputs)
    session = ort.InferenceSession(str(bundle.model_path("fp32")), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], feeds)
    return np.asarray(logits)


def probe_texts() -> list[str]:
    return [text for text, _ in tiny_dataset(n_per_class=20, seed=7)]


def gradient_after_one_step(rank: int, world_size: int, accum: int, base: str, init: str, out: str) -> None:
    """One optimizer step of the real loop's stepper on 7 rows, laid out as ``world_size`` x ``accum``; rank 0
    saves AdamW's first moment, which after one step is 0.1 x the (clipped) gradient of the global batch."""
    import torch
    import torch.distributed as dist

    from training.encoding import checkpoint_encoder, encode
    from training.finetune import TrainConfig, load_model
    from training.loop import _Stepper
    from training.world import World

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = load_model(Path(base), list(TINY_LABELS)).eval()  # no dropout: every layout must compute the same
    rows = tiny_dataset(n_per_class=3, seed=3)[:7]
    encoded = encode(checkpoint_encoder(Path(base), 64), [text for text, _ in rows])
    targets = torch.tensor([TINY_LABELS.index(label) for _, label in rows])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    config = TrainConfig(batch_size=8, grad_accum=accum, lr=1e-3, max_grad_norm=1e9)
    stepper = _Stepper(ddp, encoded, targets, config, World(rank, world_size, rank, world_size), torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(stepper.optimizer, lambda step: 1.0)
    stepper(list(range(7)), scheduler)
    if rank == 0:
        names = {id(p): n for n, p in model.named_parameters()}
        moments = {names[id(p)]: s["exp_avg"] for p, s in stepper.optimizer.state.items()}
        torch.save(moments, out)
    if world_size > 1:
        dist.destroy_process_group()
