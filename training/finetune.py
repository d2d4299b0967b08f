"""Fine-tuning ``BertForSequenceClassification``: the model, the recipe's parts, precision, PyTorch-side evaluation.

The recipe is the standard one for BERT fine-tuning (Devlin et al., appendix A.3), kept small and explicit:
AdamW with decoupled weight decay (not on biases and LayerNorm), linear warm-up then linear decay to zero,
gradient-norm clipping at 1.0, seeds fixed for Python, numpy and torch. The loop that uses them, with the
best-epoch selection, distribution and checkpoints, is :mod:`training.loop`.

Precision: ``bf16`` runs the forward pass under ``torch.autocast`` in bfloat16 (CPU and CUDA; the weights, the
optimizer and the exported graph stay float32); ``fp16`` does the same in float16 with a dynamic loss scale
(``torch.amp.GradScaler``), which is a CUDA recipe: on a CPU it is refused.

Training runs with PyTorch's fused scaled-dot-product attention (SDPA): measured on this CPU it made a MiniLM
training step about 25% faster than the "eager" matmul + softmax attention. For export the same weights are
switched to "eager" (:func:`use_eager_attention`), because that graph is what ONNX Runtime's transformer
optimizer recognizes and fuses into its Attention operator; the two agree to ~1e-8.
"""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training.distributed import all_sum, gather_rows, shard
from training.encoding import TokenRows
from training.errors import TrainingError
from training.metrics import classification_report, multilabel_report
from training.world import World

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever a config file says


# A transformers BertForSequenceClassification: typed as Any because torch's nn.Module resolves unknown attributes
# (model.config, model.bert) to Tensor | Module, which would need a cast on every use without catching anything.
HFModel = Any


Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: the same values give the same optimizer steps at any world size."""

    epochs: int = 1
    batch_size: int = 16  # the global batch: rows per optimizer step over all processes and accumulation steps
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_batch_size: int = 64
    freeze_layers: int = -1  # embeddings + this many bottom encoder layers stay frozen; -1 trains everything
    grad_accum: int = 1  # micro-batches per optimizer step on each process
    max_steps: int | None = None  # stop after this many optimizer steps
    patience: int | None = None  # stop after this many epochs without a better validation score
    precision: Precision = "fp32"


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_macro_f1: float
    seconds: float
    examples_per_s: float
    val_micro_f1: float | None = None  # multi-label only
    val_rows: int = 0  # rows scored over all processes: the validation split's size, never more
    steps: int = 0  # optimizer steps in this epoch (fewer than a full epoch when --max-steps stopped it)


@dataclass
class TrainResult:
    best_epoch: int
    history: list[EpochLog] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0
    stopped: str | None = None  # "max_steps" or "patience" when the run ended before its last epoch
    resumed_from: int | None = None  # the checkpoint step a resumed run started from
    resumed_exact: bool | None = None  # whether that resume continues bit for bit (same world size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU; asking for CUDA on a machine without it is an error."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {requested}: CUDA is not available on this machine")
    return torch.device(requested)


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 trains only on CUDA (loss scaling is a GPU recipe); bf16 needs a GPU that has it, or a CPU."""
    if precision not in PRECISIONS:
        raise TrainingError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError(
            f"--precision fp16 needs a CUDA device (float16 training with loss scaling); this run is on {device}: "
            "use --precision bf16 on a CPU, or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support")


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The forward pass's precision: float32 as is, or bfloat16 / float16 autocast on the run's device."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_model(model_dir: Path, labels: list[str], multi_label: bool = False) -> HFModel:
    """A classification head of ``len(labels)`` classes on a local BERT checkpoint, loaded offline.

    ``multi_label`` sets transformers' ``problem_type="multi_label_classification"``: the loss becomes
    binary cross-entropy per label on float 0/1 targets instead of softmax cross-entropy on a class id.
    """
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier weights newly initialized" report is expected here
    hf_logging.disable_progress_bar()
    try:
        model = BertForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            problem_type="multi_label_classification" if multi_label else "single_label_classification",
            local_files_only=True,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{model_dir}: cannot load a BERT checkpoint from it ({exc})") from exc
    return model


def use_eager_attention(model: HFModel) -> HFModel:
    """Switch attention to the plain-ops implementation that exports to a fusable ONNX pattern."""
    model.set_attn_implementation("eager")
    return model


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value).to(device) for name, value in batch.items()}


def freeze_bottom(model: HFModel, layers: int) -> int:
    """Freeze the embeddings and the ``layers`` lowest encoder layers; returns how many parameters still train.

    Autograd then stops at the first trainable layer: no backward pass through the frozen layers and no dense
    30,522 x 384 embedding gradient or AdamW state for it. Measured on this 2-core CPU, BBC defaults: the epoch
    took 486 s instead of ~560 s with embeddings + layer 0 frozen, but test accuracy fell to 96.9% (97.3-97.8%
    training everything), so the default (-1) trains all; it is there for larger models on small machines.
    """
    if layers >= 0:
        bert = model.bert
        encoder_layers = bert.encoder.layer
        if layers > len(encoder_layers):
            raise TrainingError(f"--freeze-layers {layers}: the model has only {len(encoder_layers)} encoder layers")
        for module in [bert.embeddings, *encoder_layers[:layers]]:
            for param in module.parameters():
                param.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_for(model: HFModel, config: TrainConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr rises linearly over ``warmup`` steps, then falls linearly to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict_logits(
    model: HFModel,
    encoded: TokenRows,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    world: World | None = None,
) -> np.ndarray:
    """Logits for every row of ``encoded`` in its original order (batches are length-sorted internally).

    Under torchrun each process scores a disjoint share of the rows and the shares are gathered, so every process
    gets the same full array and no row is counted twice. ``model`` must be the plain model, not the DDP wrapper:
    the processes run different numbers of batches here, and a wrapped forward would wait for the others.
    """
    world = world or World()
    model.eval()
    rows = shard(encoded.lengths, world) if world.distributed else np.arange(len(encoded))
    out = np.zeros((len(rows), model.config.num_labels), dtype=np.float32)
    lengths = encoded.lengths[rows]
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        local = order[start : start + batch_size]
        with autocast(device, precision):
            logits = model(**to_device(encoded.batch(rows[local].tolist()), device)).logits
        out[local] = logits.float().cpu().numpy()
    return gather_rows(world, out, len(encoded), encoded.lengths, device)


@dataclass(frozen=True)
class ValScore:
    """One validation pass: what the best epoch is chosen by (``key``, higher is better) and what is logged."""

    loss: float
    accuracy: float  # multi-label: subset accuracy at threshold 0.5
    macro_f1: float
    micro_f1: float | None  # multi-label only
    rows: int = 0  # rows scored, over all processes

    @property
    def key(self) -> tuple[float, float]:
        return (self.micro_f1 if self.micro_f1 is not None else self.macro_f1, -self.loss)


def evaluate_torch(
    model: HFModel,
    encoded: TokenRows,
    targets: np.ndarray,
    labels: list[str],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    world: World | None = None,
) -> ValScore:
    """Metrics and mean loss (cross-entropy, or binary cross-entropy for [n, labels] targets) on one split.

    Multi-label decisions here use 0.5: the per-label thresholds are chosen later, on the exported graph.
    Under torchrun every process returns the same score, computed from all rows exactly once.
    """
    world = world or World()
    logits = torch.from_numpy(predict_logits(model, encoded, batch_size, device, precision, world))
    rows = int(all_sum(world, [len(shard(encoded.lengths, world)) if world.distributed else len(encoded)], device)[0])
    if targets.ndim == 2:
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets)))
        ml = multilabel_report(targets, (logits >= 0).numpy(), labels)
        return ValScore(loss, ml.subset_accuracy, ml.macro_f1, ml.micro_f1, rows)
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(targets)))
    report = classification_report(targets, logits.numpy().argmax(axis=1), labels)
    return ValScore(loss, report.accuracy, report.macro_f1, None, rows)


def history_dicts(result: TrainResult) -> list[dict[str, Any]]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(log).items()} for log in result.history]
