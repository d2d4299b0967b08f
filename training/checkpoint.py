"""Training checkpoints: complete, written atomically, the last K kept, and resumed from the newest.

A checkpoint is a directory ``DIR/step-00000120/``::

    model.pt        the model's weights (a state dict)
    trainer.pt      optimizer, learning-rate schedule, fp16 loss scaler, and the loop's state: epoch, step within
                    the epoch (the sampler's position: every epoch's order is replayed from the seed), loss sums,
                    history, best validation score so far and its weights file, epochs without improvement
    rng-rank<R>.pt  each process's random generators (Python, numpy, torch CPU and CUDA)
    meta.json       step, epoch, world size, recipe; written last

It is assembled in ``DIR/.step-00000120.tmp``, every file fsync'ed, then renamed into place, so a directory named
``step-*`` is always complete: a process killed at any moment leaves either the previous checkpoints or the new
one, never half of one. The best validation epoch's weights live next to them (``best-epoch-003.pt``, written the
same way) rather than in memory; without ``--checkpoint-dir`` they go to a temporary directory. Under torchrun
every rank writes its own random state into the shared directory and rank 0 writes the rest, so DIR must be on
storage every node sees (a ReadWriteMany volume on Kubernetes).

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.distributed import barrier
from training.errors import TrainingError
from training.world import World

STEP_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"


@dataclass
class LoopState:
    """Where the training loop is; everything beyond the model, optimizer and schedule that a resume needs."""

    epoch: int = 1  # the epoch in progress, 1-based
    step_in_epoch: int = 0  # optimizer steps done in it (the sampler's position)
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch's summed training loss and rows, for its log line
    seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_key: list[float] | None = None
    best_epoch: int = 0
    best_file: str | None = None
    bad_epochs: int = 0  # epochs since the best one (early stopping)


@dataclass(frozen=True)
class Resumed:
    """What a resume loaded, for the log line and the manifest."""

    path: Path
    state: LoopState
    world_size: int  # of the run that wrote it
    exact: bool  # same world size and accumulation: the run continues bit for bit


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed aside first (atomic), so a kill never leaves half of one in place."""
    gone = path.with_name(f".{path.name}.gone")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise TrainingError(f"{path}: cannot read checkpoint file ({exc})") from exc


def rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoint directory of one run (or a temporary one that holds only the best weights)."""

    def __init__(self, directory: Path | None, world: World, keep: int = 2, recipe: dict[str, Any] | None = None):
        self.enabled = directory is not None
        self.world = world
        self.keep = keep
        self.recipe = recipe or {}
        self._temporary = directory is None
        if directory is None:
            # only rank 0 keeps best weights; a private temporary directory, removed by close()
            directory = Path(tempfile.mkdtemp(prefix="bertserve-best-"))
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- write ---------------------------------------------------------------------------------------------

    def save(self, model: torch.nn.Module, trainer: dict[str, Any], state: LoopState, grad_accum: int) -> Path:
        """Write the checkpoint of ``state.global_step`` (a collective under torchrun: every rank calls it)."""
        final = self.directory / f"step-{state.global_step:08d}"
        tmp = self.directory / f".{final.name}.tmp"
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(self.world)
        _save(rng_state(), tmp / f"rng-rank{self.world.rank}.pt")
        barrier(self.world)
        if self.world.main:
            _save(model.state_dict(), tmp / "model.pt")
            _save({**trainer, "state": asdict(state)}, tmp / "trainer.pt")
            meta = {
                "step": state.global_step,
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
                "world_size": self.world.size,
                "grad_accum": grad_accum,
                "recipe": self.recipe,
                "best_file": state.best_file,
            }
            (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            with (tmp / META).open("rb") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if final.exists():  # the same step written by an earlier attempt, before a resume
                _remove(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune(state)
        barrier(self.world)
        return final

    def save_best(self, model: torch.nn.Module, state: LoopState) -> None:
        """Rank 0 writes the weights of the new best epoch (``state.best_epoch``) aside, then renames them."""
        name = f"best-epoch-{state.best_epoch:03d}.pt"
        state.best_file = name
        if not self.world.main:
            return
        tmp = self.directory / f".{name}.tmp"
        _save(model.state_dict(), tmp)
        os.replace(tmp, self.directory / name)
        _fsync_dir(self.directory)
        if not self.enabled:  # no checkpoint refers to older ones
            self._prune_best({name})

    def load_best(self, model: torch.nn.Module, state: LoopState) -> None:
        if state.best_file is None:
            return
        model.load_state_dict(_load(self.directory / state.best_file))

    def _steps(self) -> list[Path]:
        found = [p for p in self.directory.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: p.name)

    def _prune(self, state: LoopState) -> None:
        steps = self._steps()
        for old in steps[: -self.keep]:
            _remove(old)
        referenced = {state.best_file} | {
            json.loads((p / META).read_text(encoding="utf-8")).get("best_file") for p in steps[-self.keep :]
        }
        self._prune_best({name for name in referenced if name})

    def _prune_best(self, keep: set[str]) -> None:
        for path in self.directory.glob("best-epoch-*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # --- read ----------------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        steps = self._steps() if self.enabled else []
        return steps[-1] if steps else None

    def resume(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        grad_accum: int,
    ) -> Resumed | None:
        """Load the newest complete checkpoint into the given objects; None when the directory has none yet."""
        path = self.latest()
        if path is None:
            return None
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        changed = sorted(
            k for k in set(meta["recipe"]) | set(self.recipe) if meta["recipe"].get(k) != self.recipe.get(k)
        )
        if changed:
            was = ", ".join(f"{k} {meta['recipe'].get(k)!r} -> {self.recipe.get(k)!r}" for k in changed)
            raise TrainingError(
                f"--resume: {path} belongs to another run ({was}); use another --checkpoint-dir or the same flags"
            )
        model.load_state_dict(_load(path / "model.pt"))
        trainer = _load(path / "trainer.pt")
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        if scaler is not None and trainer.get("scaler"):
            scaler.load_state_dict(trainer["scaler"])
        state = LoopState(**trainer["state"])
        exact = meta["world_size"] == self.world.size and meta.get("grad_accum", 1) == grad_accum
        rng = path / f"rng-rank{self.world.rank}.pt"
        if exact and rng.is_file():
            set_rng_state(_load(rng))
        else:
            exact = False
        self._clean_temporaries()
        return Resumed(path, state, int(meta["world_size"]), exact)

    def _clean_temporaries(self) -> None:
        """What a killed run left half-done (``.step-*.tmp``, ``.step-*.gone``); rank 0 removes it once resumed."""
        barrier(self.world)
        if self.world.main:
            for tmp in [*self.directory.glob(".step-*.tmp"), *self.directory.glob(".step-*.gone")]:
                shutil.rmtree(tmp, ignore_errors=True)
            for tmp in self.directory.glob(".best-epoch-*.tmp"):
                tmp.unlink(missing_ok=True)
        barrier(self.world)
