"""Fine-tuning ``BertForSequenceClassification``: the training loop and PyTorch-side evaluation.

The recipe is the standard one for BERT fine-tuning (Devlin et al., appendix A.3), kept small and explicit:
AdamW with decoupled weight decay (not on biases and LayerNorm), linear warm-up then linear decay to zero,
gradient-norm clipping at 1.0, seeds fixed for Python, numpy and torch. The model is scored on the validation
split after every epoch and the best epoch's weights (macro-F1, then lower loss) are kept in memory and
restored at the end, so one bad last epoch cannot make the exported model worse than an earlier one.

Training runs with PyTorch's fused scaled-dot-product attention (SDPA): measured on this CPU it made a MiniLM
training step about 25% faster than the "eager" matmul + softmax attention. For export the same weights are
switched to "eager" (:func:`use_eager_attention`), because that graph is what ONNX Runtime's transformer
optimizer recognizes and fuses into its Attention operator; the two agree to ~1e-8.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training.encoding import Encoded, length_sorted_batches
from training.errors import TrainingError
from training.metrics import classification_report, multilabel_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever a config file says


# A transformers BertForSequenceClassification: typed as Any because torch's nn.Module resolves unknown attributes
# (model.config, model.bert) to Tensor | Module, which would need a cast on every use without catching anything.
HFModel = Any


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_batch_size: int = 64
    freeze_layers: int = -1  # embeddings + this many bottom encoder layers stay frozen; -1 trains everything


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


@dataclass
class TrainResult:
    best_epoch: int
    history: list[EpochLog] = field(default_factory=list)
    train_seconds: float = 0.0
    steps: int = 0


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


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
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


def _optimizer(model: HFModel, config: TrainConfig) -> torch.optim.Optimizer:
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
def predict_logits(model: HFModel, encoded: Encoded, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits for every row of ``encoded`` in its original order (batches are length-sorted internally)."""
    model.eval()
    out = np.zeros((len(encoded), model.config.num_labels), dtype=np.float32)
    for indices in length_sorted_batches(encoded, batch_size):
        logits = model(**_to_device(encoded.batch(indices), device)).logits
        out[indices] = logits.float().cpu().numpy()
    return out


@dataclass(frozen=True)
class ValScore:
    """One validation pass: what the best epoch is chosen by (``key``, higher is better) and what is logged."""

    loss: float
    accuracy: float  # multi-label: subset accuracy at threshold 0.5
    macro_f1: float
    micro_f1: float | None  # multi-label only

    @property
    def key(self) -> tuple[float, float]:
        return (self.micro_f1 if self.micro_f1 is not None else self.macro_f1, -self.loss)


def evaluate_torch(
    model: HFModel, encoded: Encoded, targets: np.ndarray, labels: list[str], batch_size: int, device: torch.device
) -> ValScore:
    """Metrics and mean loss (cross-entropy, or binary cross-entropy for [n, labels] targets) on one split.

    Multi-label decisions here use 0.5: the per-label thresholds are chosen later, on the exported graph.
    """
    logits = torch.from_numpy(predict_logits(model, encoded, batch_size, device))
    if targets.ndim == 2:
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets)))
        ml = multilabel_report(targets, (logits >= 0).numpy(), labels)
        return ValScore(loss, ml.subset_accuracy, ml.macro_f1, ml.micro_f1)
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(targets)))
    report = classification_report(targets, logits.numpy().argmax(axis=1), labels)
    return ValScore(loss, report.accuracy, report.macro_f1, None)


def train(
    model: HFModel,
    train_enc: Encoded,
    train_targets: np.ndarray,
    val_enc: Encoded,
    val_targets: np.ndarray,
    labels: list[str],
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the weights of the best validation epoch.

    Targets are int64 class ids, or a float32 [n, labels] 0/1 matrix for a multi-label model.
    """
    seed_everything(config.seed)
    model.to(device)
    freeze_bottom(model, config.freeze_layers)
    steps_per_epoch = math.ceil(len(train_enc) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = _optimizer(model, config)
    scheduler = linear_warmup_decay(optimizer, round(total * config.warmup_ratio), total)
    generator = torch.Generator().manual_seed(config.seed)
    targets = torch.from_numpy(train_targets)
    result = TrainResult(best_epoch=0)
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train_enc), generator=generator).tolist()
        epoch_start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        for step in bar:
            indices = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = _to_device(train_enc.batch(indices), device)
            out = model(**batch, labels=targets[indices].to(device))
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach().item() * len(indices)
            seen += len(indices)
            result.steps += 1
            rate = seen / max(1e-9, time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", ex_s=f"{rate:.1f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        train_seconds = time.perf_counter() - epoch_start
        val = evaluate_torch(model, val_enc, val_targets, labels, config.eval_batch_size, device)
        val_loss = val.loss
        log = EpochLog(
            epoch=epoch,
            train_loss=loss_sum / max(1, seen),
            val_loss=val_loss,
            val_accuracy=val.accuracy,
            val_macro_f1=val.macro_f1,
            val_micro_f1=val.micro_f1,
            seconds=time.perf_counter() - epoch_start,
            examples_per_s=seen / max(1e-9, train_seconds),
        )
        result.history.append(log)
        key = val.key
        kept = best_key is None or key > best_key
        if kept:
            best_key, result.best_epoch = key, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if progress:
            print(
                f"epoch {epoch}: train loss {log.train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val acc {val.accuracy:.4f}, val macro-F1 {val.macro_f1:.4f}, "
                + (f"val micro-F1 {val.micro_f1:.4f}, " if val.micro_f1 is not None else "")
                + f"{log.examples_per_s:.1f} ex/s{' (best so far, kept)' if kept else ''}",
                flush=True,
            )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.train_seconds = time.perf_counter() - started
    return result


def history_dicts(result: TrainResult) -> list[dict[str, Any]]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(log).items()} for log in result.history]
