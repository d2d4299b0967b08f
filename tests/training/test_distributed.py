"""torchrun with 2 CPU processes (gloo), two "nodes" joined through c10d rendezvous, kill -9 then --resume, and the
arithmetic that makes a global batch mean the same at any world size. Real processes on the tiny BERT."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.multiprocessing as mp
from train_support import (
    REPO,
    env,
    fit_args,
    fit_argv,
    free_port,
    gradient_after_one_step,
    probe_texts,
    run,
    served_logits,
    torchrun_argv,
    write_tiny_work,
)

from service.bundle import load_bundle
from training.data import load_data, stratified_split
from training.encoding import encode
from training.evaluate import evaluate_bundle, graph_logits
from training.tiny import write_tiny_base_model

pytestmark = pytest.mark.slow
STEPS = 4 * 24  # 4 epochs of ceil(185 training rows / global batch 8)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_work(tmp_path_factory.mktemp("ddp"))


def args(work: Path, output: str, *extra: str) -> list[str]:
    return fit_args(work / "data.csv", work / "base", work / output, work / "cache", *extra)


@pytest.fixture(scope="module")
def reference(work: Path) -> tuple[Path, str]:
    """An uninterrupted run on 2 processes: the bundle the other runs are compared with, and its output."""
    result = run(torchrun_argv(2, args(work, "reference")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "reference", result.stdout


def test_two_processes_train_and_rank_0_alone_writes_the_bundle(reference: tuple[Path, str]) -> None:
    bundle, stdout = reference
    manifest = load_bundle(bundle).manifest
    run_info = manifest.training_run
    assert run_info is not None
    assert (run_info.world_size, run_info.nodes, run_info.device_type) == (2, 1, "cpu")
    assert (run_info.global_batch, run_info.grad_accum, run_info.precision) == (8, 1, "fp32")
    assert manifest.training["steps"] == STEPS and len(manifest.training["history"]) == 4
    assert stdout.count("\nbundle ") == 1 and stdout.count("wall time") == 1  # one report, from rank 0
    assert manifest.variants["fp32"].metrics["accuracy"] > 0.5  # it learned (chance: 1/3)


def test_validation_under_ddp_scores_each_row_once_like_a_single_process(
    reference: tuple[Path, str], work: Path
) -> None:
    """23 validation rows over 2 processes: every epoch scored exactly 23, and the kept epoch's metrics are what one
    process computes on the exported graph (same weights) for the same rows."""
    bundle, _ = reference
    manifest = load_bundle(bundle).manifest
    history = manifest.training["history"]
    assert [epoch["val_rows"] for epoch in history] == [23] * 4
    best = history[manifest.training["best_epoch"] - 1]
    single = evaluate_bundle(bundle, str(work / "data.csv"), split="val")
    assert single.n == 23
    assert best["val_accuracy"] == pytest.approx(single.report.accuracy, abs=1e-6)
    assert best["val_macro_f1"] == pytest.approx(single.report.macro_f1, abs=1e-6)
    val = stratified_split(load_data(str(work / "data.csv")), manifest.dataset["seed"]).val
    from service.modelio import Encoder

    encoder = Encoder.from_file(bundle / "tokenizer.json", manifest.max_length)
    logits = torch.from_numpy(graph_logits(bundle / "model.onnx", encode(encoder, val.texts)))
    loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(val.targets())))
    assert best["val_loss"] == pytest.approx(loss, abs=1e-4)
    assert len(stratified_split(load_data(str(work / "data.csv")), 42).train) * 4 == 185 * 4  # STEPS' premise


@pytest.fixture(scope="module")
def killed(work: Path) -> tuple[Path, int]:
    """A 2-process run with checkpoints every 5 steps, SIGKILLed (launcher and workers at once, as when a machine
    dies) after step 30: its checkpoint directory and newest step."""
    checkpoints = work / "killed-ck"
    argv = torchrun_argv(2, args(work, "killed", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "5"))
    with (work / "killed.log").open("w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not any(int(p.name[5:]) >= 30 for p in checkpoints.glob("step-*")):
            assert proc.poll() is None and time.monotonic() < deadline, (work / "killed.log").read_text()[-3000:]
            time.sleep(0.01)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            member.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    steps = sorted(int(p.name[5:]) for p in checkpoints.glob("step-*"))
    assert steps and steps[-1] < STEPS, f"not killed mid-run: checkpoints {steps}"
    assert not (work / "killed").exists()
    return checkpoints, steps[-1]


def test_kill_9_then_resume_at_the_same_world_size_gives_the_uninterrupted_weights(
    reference: tuple[Path, str], killed: tuple[Path, int], work: Path
) -> None:
    checkpoints = work / "resume-same"
    shutil.copytree(killed[0], checkpoints)
    result = run(torchrun_argv(2, args(work, "resumed", "--checkpoint-dir", str(checkpoints), "--resume")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from step-{killed[1]:08d}" in result.stdout
    assert "the run continues exactly as if uninterrupted" in result.stdout
    texts = probe_texts()
    diff = np.abs(served_logits(reference[0], texts) - served_logits(work / "resumed", texts)).max()
    assert diff <= 1e-4, diff
    run_info = load_bundle(work / "resumed").manifest.training_run
    assert run_info is not None and run_info.resumed_from_step == killed[1]
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert len(kept) == 2 and kept[-1] == f"step-{STEPS:08d}"  # the last two kept, the final one included


def test_resume_at_another_world_size_works_and_says_it_cannot_be_identical(
    killed: tuple[Path, int], work: Path
) -> None:
    checkpoints = work / "resume-other"
    shutil.copytree(killed[0], checkpoints)
    result = run(fit_argv(args(work, "resumed-1", "--checkpoint-dir", str(checkpoints), "--resume")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in result.stdout
    assert "cannot be bit-identical to an uninterrupted run" in result.stdout
    manifest = load_bundle(work / "resumed-1").manifest
    assert manifest.training_run is not None and manifest.training_run.world_size == 1
    assert manifest.training["steps"] == STEPS and len(manifest.training["history"]) == 4


def test_two_nodes_through_c10d_rendezvous_train_like_two_local_processes(
    reference: tuple[Path, str], work: Path
) -> None:
    """Two torchrun launchers, one process each, meet at a c10d rendezvous endpoint: a 2-node job on localhost."""
    launcher = [
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "t",
    ]
    argv = torchrun_argv(1, args(work, "two-nodes"), *launcher)
    nodes = [
        subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    run_info = load_bundle(work / "two-nodes").manifest.training_run
    assert run_info is not None and (run_info.world_size, run_info.nodes) == (2, 2)
    texts = probe_texts()
    assert np.abs(served_logits(reference[0], texts) - served_logits(work / "two-nodes", texts)).max() <= 1e-4


def test_one_global_batch_gives_one_gradient_whatever_the_layout(tmp_path: Path) -> None:
    """7 rows as 1 process x 1 micro-batch, 1 x 3 (3+2+2 rows) and 2 processes x 2 micro-batches (2+2+2+1) give
    the same gradient: each micro-batch's mean loss is weighted by its share of the global batch."""
    base = write_tiny_base_model(tmp_path / "base", seed=0)
    moments = {}
    for world_size, accum in ((1, 1), (1, 3), (2, 2)):
        out = tmp_path / f"m-{world_size}-{accum}.pt"
        init = tmp_path / f"init-{world_size}-{accum}"
        job = (world_size, accum, str(base), str(init), str(out))
        if world_size == 1:
            gradient_after_one_step(0, *job)
        else:
            mp.start_processes(gradient_after_one_step, args=job, nprocs=world_size, start_method="spawn")
        moments[(world_size, accum)] = torch.load(out, weights_only=True)
    reference = moments[(1, 1)]
    assert max(float(v.abs().max()) for v in reference.values()) > 1e-4  # a real gradient, not zeros
    for layout in ((1, 3), (2, 2)):
        for name, value in reference.items():
            torch.testing.assert_close(moments[layout][name], value, rtol=1e-4, atol=1e-7, msg=f"{layout} {name}")
