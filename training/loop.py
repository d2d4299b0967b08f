"""The training loop: the same optimizer steps on one process or many, checkpointed, resumable, stoppable.

One optimizer step consumes one global batch of ``--batch-size`` rows, whatever the world size: each epoch's row
order is one seeded permutation (replayed from the seed on resume, so the sampler's position is just the step
number), cut into global batches, and :func:`training.distributed.partition` hands each process its share as
``--grad-accum`` micro-batches. Each micro-batch's mean loss is weighted by its share of the global batch, so after
DDP averages the gradients the step is the gradient of the global batch's mean loss, however the rows were split
(an uneven last batch included). With one process and no accumulation the weights are exactly 1 and the loop is
the plain loop it always was: same batches, same arithmetic, same result for the same seed.

After every epoch the model is scored on the validation split (every process scores a share, the shares are
gathered), the best epoch (macro-F1 or micro-F1, then lower loss) is written to disk, and ``--patience`` epochs
without improvement end the run; ``--max-steps`` ends it after that many steps (the partial epoch is scored too).
At the end the best epoch's weights are loaded back, so one bad last epoch cannot make the exported model worse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training.checkpoint import Checkpoints, LoopState
from training.distributed import all_sum, broadcast_flag, partition
from training.encoding import TokenRows
from training.finetune import (
    EpochLog,
    HFModel,
    TrainConfig,
    TrainResult,
    autocast,
    evaluate_torch,
    freeze_bottom,
    linear_warmup_decay,
    optimizer_for,
    seed_everything,
    to_device,
)
from training.world import World


@dataclass
class Run:
    """How and where this run trains, beyond the recipe: processes, checkpoints, and who wants to hear about it."""

    world: World = field(default_factory=World)
    checkpoints: Checkpoints | None = None  # None: best weights in a temporary directory only
    checkpoint_every: int | None = None  # optimizer steps between checkpoints (and one after every epoch)
    resume: bool = False
    progress: bool = True
    on_step: Callable[[int, float, float], None] | None = None  # (step, loss, lr), rank 0 only
    on_epoch: Callable[[EpochLog, int], None] | None = None  # (log, global step), rank 0 only
    say: Callable[[str], None] = print


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s row order: the ``epoch``-th permutation drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    for _ in range(epoch - 1):
        order = torch.randperm(n, generator=generator)
    return order


def planned_steps(n_rows: int, config: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps): whole epochs, cut short by --max-steps."""
    per_epoch = math.ceil(n_rows / config.batch_size)
    total = per_epoch * config.epochs
    return per_epoch, min(total, config.max_steps) if config.max_steps else total


class _Stepper:
    """One optimizer step: forward + backward over this process's micro-batches, then clip, step, schedule."""

    def __init__(
        self,
        ddp: nn.Module,
        rows: TokenRows,
        targets: torch.Tensor,
        config: TrainConfig,
        world: World,
        device: torch.device,
    ) -> None:
        self.ddp, self.rows, self.targets, self.config, self.world, self.device = (
            ddp,
            rows,
            targets,
            config,
            world,
            device,
        )
        self.lengths = rows.lengths
        self.optimizer = optimizer_for(ddp.module if world.distributed else ddp, config)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None

    def __call__(self, batch: list[int], scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
        """Run one step on the global ``batch``; returns this process's summed loss (sum over its rows)."""
        micro = partition(batch, self.lengths, self.world, self.config.grad_accum)
        local = 0.0
        for k, rows in enumerate(micro):
            weight = len(rows) * self.world.size / len(batch)
            indices = rows or batch[:1]  # an empty slice at the very end still joins the gradient all-reduce
            last = k == len(micro) - 1
            sync = nullcontext() if last or not self.world.distributed else self.ddp.no_sync()  # type: ignore[operator]
            with sync:
                with autocast(self.device, self.config.precision):
                    out = self.ddp(
                        **to_device(self.rows.batch(indices), self.device), labels=self.targets[indices].to(self.device)
                    )
                loss = out.loss if weight == 1.0 else out.loss * weight
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            local += out.loss.detach().item() * len(rows)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.ddp.parameters(), self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return local


def train(
    model: HFModel,
    train_enc: TokenRows,
    train_targets: np.ndarray,
    val_enc: TokenRows,
    val_targets: np.ndarray,
    labels: list[str],
    config: TrainConfig,
    device: torch.device,
    run: Run | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the weights of the best validation epoch (rank 0).

    Targets are int64 class ids, or a float32 [n, labels] 0/1 matrix for a multi-label model.
    """
    run = run or Run()
    world = run.world
    seed_everything(config.seed + world.rank)  # rank 0 draws what a single process draws; other ranks differ
    model.to(device)
    freeze_bottom(model, config.freeze_layers)
    checkpoints = run.checkpoints or Checkpoints(None, world)
    per_epoch, total = planned_steps(len(train_enc), config)
    ddp: nn.Module = model
    if world.distributed:
        ids = [device.index] if device.type == "cuda" else None
        # BERT's buffers (position and token-type ids) are constants: synced once at start, never per forward
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    stepper = _Stepper(ddp, train_enc, torch.from_numpy(train_targets), config, world, device)
    scheduler = linear_warmup_decay(stepper.optimizer, round(total * config.warmup_ratio), total)
    result = TrainResult(best_epoch=0)
    state = LoopState()
    if run.resume and run.checkpoints is not None:
        resumed = run.checkpoints.resume(model, stepper.optimizer, scheduler, stepper.scaler, config.grad_accum)
        if resumed is None:
            run.say(f"--resume: no checkpoint in {run.checkpoints.directory} yet; starting at step 0")
        else:
            state = resumed.state
            result.resumed_from, result.resumed_exact = state.global_step, resumed.exact
            run.say(_resume_line(resumed.path.name, state, resumed.world_size, world, resumed.exact, config))
            if not resumed.exact:
                seed_everything(config.seed + 1000 * world.rank + state.global_step)
    result.history = [EpochLog(**entry) for entry in state.history]
    started = time.perf_counter() - state.train_seconds
    try:
        _epochs(
            ddp,
            model,
            stepper,
            scheduler,
            state,
            result,
            checkpoints,
            run,
            train_enc,
            val_enc,
            val_targets,
            labels,
            config,
            device,
            per_epoch,
            total,
            started,
        )
        if world.main:
            checkpoints.load_best(model, state)
    finally:
        if run.checkpoints is None:
            checkpoints.close()
    model.eval()
    result.best_epoch = state.best_epoch
    result.steps = state.global_step
    result.train_seconds = time.perf_counter() - started
    return result


def _epochs(
    ddp: nn.Module,
    model: HFModel,
    stepper: _Stepper,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    result: TrainResult,
    checkpoints: Checkpoints,
    run: Run,
    train_enc: TokenRows,
    val_enc: TokenRows,
    val_targets: np.ndarray,
    labels: list[str],
    config: TrainConfig,
    device: torch.device,
    per_epoch: int,
    total: int,
    started: float,
) -> None:
    world = run.world
    while state.epoch <= config.epochs and state.global_step < total:
        if config.patience is not None and state.bad_epochs >= config.patience:
            result.stopped = "patience"  # decided before a checkpoint this run resumed from
            return
        ddp.train()
        order = epoch_order(len(train_enc), config.seed, state.epoch)
        epoch_start = time.perf_counter()
        steps = min(per_epoch, state.step_in_epoch + total - state.global_step)
        first_step, seen_before = state.step_in_epoch, state.seen
        bar = tqdm(
            range(first_step, steps),
            desc=f"epoch {state.epoch}/{config.epochs}",
            unit="step",
            initial=first_step,
            total=steps,
            disable=not (run.progress and world.main),
            dynamic_ncols=True,
        )
        for step in bar:
            batch = order[step * config.batch_size : (step + 1) * config.batch_size].tolist()
            loss = all_sum(world, [stepper(batch, scheduler)], device)[0]
            state.loss_sum += loss
            state.seen += len(batch)
            state.step_in_epoch, state.global_step = step + 1, state.global_step + 1
            lr = scheduler.get_last_lr()[0]
            rate = (state.seen - seen_before) / max(1e-9, time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{state.loss_sum / state.seen:.4f}", ex_s=f"{rate:.1f}", lr=f"{lr:.2e}")
            if run.on_step is not None and world.main:
                run.on_step(state.global_step, loss / len(batch), float(lr))
            every = run.checkpoint_every
            if run.checkpoints is not None and every and state.global_step % every == 0 and step + 1 < steps:
                state.train_seconds = time.perf_counter() - started
                _save(run.checkpoints, model, stepper, scheduler, state, config)
        bar.close()
        train_seconds = time.perf_counter() - epoch_start
        rows = state.seen - seen_before
        _end_epoch(
            model, state, result, checkpoints, run, val_enc, val_targets, labels, config, device, train_seconds, rows
        )
        state.train_seconds = time.perf_counter() - started
        if run.checkpoints is not None:
            _save(run.checkpoints, model, stepper, scheduler, state, config)
    if state.global_step >= total and config.max_steps and total < per_epoch * config.epochs:
        result.stopped = "max_steps"


def _end_epoch(
    model: HFModel,
    state: LoopState,
    result: TrainResult,
    checkpoints: Checkpoints,
    run: Run,
    val_enc: TokenRows,
    val_targets: np.ndarray,
    labels: list[str],
    config: TrainConfig,
    device: torch.device,
    train_seconds: float,
    rows: int,
) -> None:
    """Score the epoch on validation, keep it if best (on disk), log it, and move the state to the next epoch."""
    world = run.world
    val_start = time.perf_counter()
    val = evaluate_torch(model, val_enc, val_targets, labels, config.eval_batch_size, device, config.precision, world)
    log = EpochLog(
        epoch=state.epoch,
        train_loss=state.loss_sum / max(1, state.seen),
        val_loss=val.loss,
        val_accuracy=val.accuracy,
        val_macro_f1=val.macro_f1,
        val_micro_f1=val.micro_f1,
        seconds=train_seconds + time.perf_counter() - val_start,
        examples_per_s=rows / max(1e-9, train_seconds),
        val_rows=val.rows,
        steps=state.step_in_epoch,
    )
    key = list(val.key)
    kept = broadcast_flag(world, state.best_key is None or key > state.best_key, device)
    if kept:
        state.best_key, state.best_epoch, state.bad_epochs = key, state.epoch, 0
        checkpoints.save_best(model, state)
    else:
        state.bad_epochs += 1
    result.history.append(log)
    state.history.append(asdict(log))
    if world.main:
        if run.on_epoch is not None:
            run.on_epoch(log, state.global_step)
        if run.progress:
            run.say(
                f"epoch {log.epoch}: train loss {log.train_loss:.4f}, val loss {val.loss:.4f}, "
                f"val acc {val.accuracy:.4f}, val macro-F1 {val.macro_f1:.4f}, "
                + (f"val micro-F1 {val.micro_f1:.4f}, " if val.micro_f1 is not None else "")
                + f"{log.examples_per_s:.1f} ex/s{' (best so far, kept)' if kept else ''}"
            )
    state.epoch, state.step_in_epoch, state.loss_sum, state.seen = state.epoch + 1, 0, 0.0, 0


def _save(
    checkpoints: Checkpoints,
    model: HFModel,
    stepper: _Stepper,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    config: TrainConfig,
) -> None:
    trainer = {
        "optimizer": stepper.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": stepper.scaler.state_dict() if stepper.scaler is not None else None,
    }
    checkpoints.save(model, trainer, state, config.grad_accum)


def _resume_line(name: str, state: LoopState, was: int, world: World, exact: bool, config: TrainConfig) -> str:
    where = f"resuming from {name}: epoch {state.epoch}, step {state.global_step}"
    if exact:
        return f"{where}; same world size ({world.size}): the run continues exactly as if uninterrupted"
    return (
        f"{where}; the checkpoint was written by {was} process(es), this run has {world.size} (grad accum "
        f"{config.grad_accum}): the global batches are the same (--batch-size {config.batch_size}) but the result "
        "cannot be bit-identical to an uninterrupted run (dropout random streams and the order of gradient sums "
        "depend on the number of processes)"
    )
