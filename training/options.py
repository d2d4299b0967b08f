"""What ``fit`` is asked to do: :class:`FitOptions` (the CLI fills it from flags; tests and tiny.py build it) and
the checked :class:`Request` derived from it. Kept apart from the pipeline so that every step can read them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``BERTSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/bertserve``, else ``~/.cache/bertserve``."""
    if os.environ.get("BERTSERVE_CACHE_DIR"):
        return Path(os.environ["BERTSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bertserve"


@dataclass
class FitOptions:
    """Everything ``fit`` needs; the CLI fills it from flags, tests and tiny.py construct it directly."""

    data: str
    output: Path
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None  # sentence pairs: the second text's column
    multi_label: bool = False
    label_separator: str = ";"
    thresholds: str = "per-label"  # multi-label decisions: "0.5" or "per-label" (training.calibrate.THRESHOLD_RULES)
    base_model: Path | None = None
    base_model_name: str | None = None  # what the manifest calls the base model; default: derived
    epochs: int = 1
    max_length: int = 256
    batch_size: int = 16  # the global batch, over all processes and accumulation steps
    grad_accum: int = 1
    max_steps: int | None = None
    patience: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    freeze_layers: int = -1
    seed: int = 42
    precision: str = "fp32"  # training precision: fp32, bf16 (autocast), fp16 (autocast + loss scaling, CUDA)
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None  # optimizer steps; a checkpoint also follows every epoch
    keep_checkpoints: int = 2
    resume: bool = False
    report_to: tuple[str, ...] = ()  # "tensorboard", "mlflow"
    logging_dir: Path = Path("runs")
    log_every: int = 10  # optimizer steps between tracked loss / learning-rate points
    run_name: str | None = None  # tracker run name; default NAME-VERSION
    cache_dir: Path | None = None  # the Arrow data cache; default default_cache_dir()
    num_proc: int = 1  # processes tokenizing the data (datasets.map)
    optimize: bool = False
    quantize: str | None = None
    fp16: bool = False
    name: str | None = None
    version: str | None = None
    device: str | None = None
    parity_texts: int = 64
    parity_tolerance: float = 1e-4
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None: library defaults
    progress: bool = True
    command: str | None = None  # the CLI invocation, recorded in the manifest for provenance
    extra_dataset_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A checked ``fit`` request: where the bundle goes, what it is called, which checkpoint it starts from."""

    output: Path
    name: str
    version: str
    base_dir: Path
