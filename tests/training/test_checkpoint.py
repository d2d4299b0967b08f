"""The checkpoint directory on its own (one process, a small real model and optimizer): the last K kept, what a kill
leaves behind cleaned up on resume, everything restored, another recipe refused. Fast: no training run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import Checkpoints, LoopState
from training.errors import TrainingError
from training.world import World


def parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def save(checkpoints: Checkpoints, model, optimizer, scheduler, state: LoopState) -> None:  # type: ignore[no-untyped-def]
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None}
    checkpoints.save(model, trainer, state, grad_accum=1)


def test_the_last_k_are_kept_and_a_resume_restores_everything_and_cleans_up(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path, World(), keep=2, recipe={"lr": 1e-2})
    model, optimizer, scheduler = parts()
    state = LoopState()
    for global_step in (1, 2, 3):
        step(model, optimizer, scheduler)
        state.global_step, state.step_in_epoch, state.loss_sum = global_step, global_step, 0.5 * global_step
        if global_step == 2:
            state.best_epoch = 1
            checkpoints.save_best(model, state)
        save(checkpoints, model, optimizer, scheduler, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch-001.pt", "step-00000002", "step-00000003"]
    expected_rng = (torch.get_rng_state(), random.random(), np.random.rand())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # what a kill in the middle of writing or of pruning leaves: a temporary and a renamed-aside directory
    (tmp_path / ".step-00000004.tmp").mkdir()
    (tmp_path / ".step-00000001.gone").mkdir()
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)

    fresh = Checkpoints(tmp_path, World(), keep=2, recipe={"lr": 1e-2})
    model2, optimizer2, scheduler2 = parts()
    resumed = fresh.resume(model2, optimizer2, scheduler2, None, grad_accum=1)
    assert resumed is not None and resumed.exact and resumed.path.name == "step-00000003"
    assert (resumed.state.global_step, resumed.state.loss_sum, resumed.state.best_file) == (3, 1.5, "best-epoch-001.pt")
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
    assert scheduler2.last_epoch == 3 and optimizer2.state_dict()["state"][0]["step"] == 3
    assert torch.equal(torch.get_rng_state(), expected_rng[0])  # the random streams continue where they were
    assert (random.random(), np.random.rand()) == expected_rng[1:]
    assert not list(tmp_path.glob(".*"))  # the leftovers are gone


def test_a_checkpoint_of_another_recipe_is_refused_with_the_differences(tmp_path: Path) -> None:
    model, optimizer, scheduler = parts()
    save(
        Checkpoints(tmp_path, World(), recipe={"lr": 1e-2, "batch_size": 16}), model, optimizer, scheduler, LoopState()
    )
    other = Checkpoints(tmp_path, World(), recipe={"lr": 2e-2, "batch_size": 16})
    with pytest.raises(TrainingError, match=r"belongs to another run \(lr 0\.01 -> 0\.02\)"):
        other.resume(*parts(), None, grad_accum=1)
    assert Checkpoints(tmp_path / "empty", World(), recipe={}).resume(*parts(), None, grad_accum=1) is None


def test_best_weights_without_a_checkpoint_directory_live_in_a_private_temporary_one() -> None:
    checkpoints = Checkpoints(None, World())
    model, _, _ = parts()
    state = LoopState(best_epoch=2)
    checkpoints.save_best(model, state)
    assert [p.name for p in checkpoints.directory.iterdir()] == ["best-epoch-002.pt"]
    state.best_epoch = 3
    checkpoints.save_best(model, state)  # the older one is no longer needed
    assert [p.name for p in checkpoints.directory.iterdir()] == ["best-epoch-003.pt"]
    checkpoints.close()
    assert not checkpoints.directory.exists()
