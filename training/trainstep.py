"""``fit``'s first two steps: the data (cache, split, tokens) and the fine-tune, on one process or many.

:func:`prepare_data` needs no torch: bad data fails in a second, and under torchrun every process opens the
prepared cache before joining the process group (one process per machine builds it while the others wait on its
file lock), so no collective operation ever waits on data preparation. :func:`train_step` then joins the group
and trains each process's share of every global batch. Only rank 0 comes back with a :class:`Trained` (the model
for export, and what the manifest records); other ranks get None and leave ``fit``: export, parity, scoring and
the bundle are rank 0's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.modelio import Encoder
from training.data import SPLIT_NAMES
from training.datastore import Prepared, PrepStats, SplitIndex, prepare
from training.encoding import Encoded, TokenRows, checkpoint_encoder, encode
from training.errors import TrainingError
from training.options import FitOptions, Request, default_cache_dir
from training.readers import Columns
from training.tokens import tokenize
from training.world import World

if TYPE_CHECKING:
    from training.finetune import HFModel, TrainConfig, TrainResult
    from training.tracking import Tracker


@dataclass
class DataStep:
    """The prepared data: the cache, the split, every split's tokens (memory-mapped) and targets."""

    data: Prepared
    split: SplitIndex
    prep: PrepStats
    encoder: Encoder
    encoded: dict[str, TokenRows]
    targets: dict[str, np.ndarray]


@dataclass
class Trained:
    """The train step's result: the fine-tuned model (eager attention, CPU) and everything encoded for it."""

    model: HFModel
    encoder: Encoder
    encoded: dict[str, TokenRows]  # per split name, and "parity"
    targets: dict[str, np.ndarray]  # per split name: class ids, or a 0/1 [n, labels] matrix
    labels: list[str]
    multi_label: bool
    config: TrainConfig
    result: TrainResult
    device: str
    truncated: float  # share of training inputs cut at max_length
    data: Prepared
    split: SplitIndex
    world: World
    prep: PrepStats
    tracking: dict[str, str]  # tracker -> run id


def prepare_data(options: FitOptions, request: Request, world: World) -> DataStep:
    """The cached rows, the split, and every split's tokens and targets (no torch involved)."""
    columns = Columns(
        options.text_column,
        options.label_column,
        options.text_pair_column,
        options.multi_label,
        options.label_separator,
    )
    cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    # whichever process takes the cache's lock first builds it and shows the progress; the rest wait
    data = prepare(options.data, columns, cache / "data", progress=options.progress)
    split = data.split(options.seed)
    kind = f"{len(data.label_names)} {'labels (multi-label)' if data.multi_label else 'classes'}"
    pairs = ", sentence pairs" if data.pairs else ""
    say = _say(options, world)
    say(
        f"data: {data.source}: {len(data)} examples{pairs}, {kind}, split 80/10/10 (seed {options.seed})\n"
        f"{data.format_counts(split)}"
    )
    encoder = checkpoint_encoder(request.base_dir, options.max_length)
    tokens, prep = tokenize(data, encoder, options.num_proc, progress=options.progress)
    if options.progress and (world.main or not prep.tokens_cached):
        print(prep.summary() if world.main else f"rank {world.rank}: {prep.summary()}", flush=True)
    parts = zip(SPLIT_NAMES, split.parts(), strict=True)
    encoded: dict[str, TokenRows] = {name: tokens.view(part) for name, part in parts}
    targets = {name: data.targets(part) for name, part in zip(SPLIT_NAMES, split.parts(), strict=True)}
    return DataStep(data, split, prep, encoder, encoded, targets)


def train_step(options: FitOptions, request: Request, world: World, step: DataStep, tracker: Tracker) -> Trained | None:
    """Fine-tune on the prepared data; the best validation epoch is kept. None on ranks other than 0."""
    from training.distributed import device_for, process_group
    from training.finetune import check_precision, pick_device, use_eager_attention

    device = device_for(world, pick_device(options.device))
    check_precision(options.precision, device)
    config = train_config(options, world)
    encoded = dict(step.encoded)
    truncated = float(np.mean(encoded["train"].lengths >= options.max_length))
    with process_group(world, device):
        model, result = _fit_model(options, request, world, device, config, step, truncated, tracker)
    if not world.main:
        return None
    encoded["parity"] = _parity_inputs(options, step.encoder, step.data, step.split)
    model = use_eager_attention(model.to("cpu").eval())
    return Trained(
        model,
        step.encoder,
        encoded,
        step.targets,
        step.data.label_names,
        step.data.multi_label,
        config,
        result,
        str(device),
        truncated,
        step.data,
        step.split,
        world,
        step.prep,
        tracker.run_ids,
    )


def check_layout(options: FitOptions, world: World) -> None:
    """Flags that depend on the process layout, checked before any work: batch split, resume source."""
    slots = world.size * options.grad_accum
    if options.batch_size % slots:
        raise TrainingError(
            f"--batch-size {options.batch_size} is the global batch: it must be a multiple of the world size times "
            f"--grad-accum ({world.size} x {options.grad_accum} = {slots})"
        )
    if options.resume and options.checkpoint_dir is None:
        raise TrainingError("--resume needs --checkpoint-dir (the directory the checkpoints were written to)")


def train_config(options: FitOptions, world: World) -> TrainConfig:
    """The recipe from the options (the global batch, whatever the number of processes)."""
    from training.finetune import TrainConfig

    check_layout(options, world)
    return TrainConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        warmup_ratio=options.warmup_ratio,
        seed=options.seed,
        freeze_layers=options.freeze_layers,
        grad_accum=options.grad_accum,
        max_steps=options.max_steps,
        patience=options.patience,
        precision=options.precision,  # type: ignore[arg-type]  # checked by check_precision
    )


def _say(options: FitOptions, world: World) -> Callable[[str], None]:
    def say(message: str) -> None:
        if options.progress and world.main:
            print(message, flush=True)

    return say


def _fit_model(
    options: FitOptions,
    request: Request,
    world: World,
    device: Any,
    config: TrainConfig,
    step: DataStep,
    truncated: float,
    tracker: Tracker,
) -> tuple[HFModel, TrainResult]:
    from training.checkpoint import Checkpoints
    from training.finetune import load_model, seed_everything
    from training.loop import Run, planned_steps, train

    data, encoded, targets = step.data, step.encoded, step.targets
    seed_everything(options.seed)  # before the classification head is initialized, so a seed fixes the run
    model = load_model(request.base_dir, data.label_names, multi_label=data.multi_label)
    if options.max_length > model.config.max_position_embeddings:
        raise TrainingError(
            f"--max-length {options.max_length}: {request.base_dir} has only {model.config.max_position_embeddings} "
            "position embeddings"
        )
    say = _say(options, world)
    per_epoch, total = planned_steps(len(encoded["train"]), config)
    per_device = config.batch_size // (world.size * config.grad_accum)
    scale = f"{world.size} process(es) on {world.nodes} node(s)" if world.distributed else "1 process"
    say(
        f"model: {request.base_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
        f"{device}, {scale}, {config.precision}; max_length {options.max_length} ({truncated:.0%} of training "
        f"inputs truncated), {config.epochs} epoch(s) of {per_epoch} steps ({total} in all), global batch "
        f"{config.batch_size} ({per_device} per device x {config.grad_accum} accumulation x {world.size}), "
        f"lr {config.lr:g}, "
        f"frozen: {'nothing' if config.freeze_layers < 0 else f'embeddings + {config.freeze_layers} layer(s)'}"
    )
    recipe = {**vars(config), "data": data.key, "max_length": options.max_length, "labels": data.label_names}
    checkpoints = (
        Checkpoints(Path(options.checkpoint_dir), world, options.keep_checkpoints, recipe)
        if options.checkpoint_dir is not None
        else None
    )
    run = Run(
        world=world,
        checkpoints=checkpoints,
        checkpoint_every=options.checkpoint_every,
        resume=options.resume,
        progress=options.progress,
        on_step=tracker.step,
        on_epoch=tracker.epoch,
        say=say,
    )
    result = train(
        model, encoded["train"], targets["train"], encoded["val"], targets["val"], data.label_names, config, device, run
    )
    say(_summary(result, config, world))
    return model, result


def _summary(result: TrainResult, config: TrainConfig, world: World) -> str:
    """One line at the end of training: steps, epochs, time, throughput, the kept epoch and why the run ended."""
    steps = sum(log.steps for log in result.history)
    rate = sum(log.examples_per_s * log.steps for log in result.history) / steps if steps else 0.0
    best = next((log for log in result.history if log.epoch == result.best_epoch), None)
    score = ""
    if best is not None:
        metric, value = (
            ("micro-F1", best.val_micro_f1) if best.val_micro_f1 is not None else ("macro-F1", best.val_macro_f1)
        )
        score = f" (val {metric} {value:.4f})"
    why = {"max_steps": ", stopped by --max-steps", "patience": ", stopped early by --patience"}
    return (
        f"training: {result.steps} steps, {len(result.history)} epoch(s) in {result.train_seconds:.1f} s, "
        f"{rate:,.1f} examples/s ({world.size} process(es)); best epoch {result.best_epoch}{score}"
        f"{why.get(result.stopped or '', '')}"
    )


def _parity_inputs(options: FitOptions, encoder: Encoder, data: Prepared, split: SplitIndex) -> Encoded:
    """Held-out inputs of mixed lengths for the parity check (test, then validation, then training rows)."""
    from training.export import parity_texts

    n = options.parity_texts
    rows = np.concatenate([split.test, split.val, split.train])[:n]
    texts, pairs = data.texts(rows)
    chosen = parity_texts(texts, [], n)
    if pairs is None:
        return encode(encoder, chosen)
    return encode(encoder, chosen, [pairs[i % len(pairs)] for i in range(len(chosen))])
