"""fit's new flags on one process: --precision bf16 on a CPU (and fp16 refused there), --max-steps, --patience,
--grad-accum, Parquet shards end to end, the progress lines, and the errors for flags that cannot work together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_support import probe_texts, served_logits, uneven_rows, write_tiny_work

from service.bundle import load_bundle
from training.__main__ import main
from training.errors import TrainingError
from training.pipeline import FitOptions, fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_work(tmp_path_factory.mktemp("options"))


def options(work: Path, output: str, **overrides: object) -> FitOptions:
    values: dict[str, object] = {
        "data": str(work / "data.csv"),
        "output": work / output,
        "base_model": work / "base",
        "cache_dir": work / "cache",
        "epochs": 2,
        "max_length": 64,
        "batch_size": 8,
        "lr": 3e-3,
        "threads": 1,
        "progress": False,
        "version": "1",
    }
    return FitOptions(**(values | overrides))  # type: ignore[arg-type]


def test_bf16_autocast_trains_on_a_cpu_and_exports_an_fp32_graph_that_passes_parity(work: Path) -> None:
    fit(options(work, "fp32"))
    fit(options(work, "bf16", precision="bf16"))
    manifest = load_bundle(work / "bf16").manifest
    assert manifest.training_run is not None and manifest.training_run.precision == "bf16"
    parity = manifest.variants["fp32"].parity
    assert parity is not None and parity.max_abs_diff <= 1e-4  # the exported graph is float32
    texts = probe_texts()
    # the same seed gives bit-identical fp32 runs; bfloat16 matmuls move the result: autocast really ran
    assert np.abs(served_logits(work / "bf16", texts) - served_logits(work / "fp32", texts)).max() > 1e-6


def test_fp16_is_refused_on_a_cpu(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TrainingError, match=r"--precision fp16 needs a CUDA device .* use --precision bf16 on a CPU"):
        fit(options(work, "fp16", precision="fp16"))
    assert not (work / "fp16").exists()


def test_max_steps_and_patience_end_a_run_and_say_why(work: Path) -> None:
    fit(options(work, "short", max_steps=5, epochs=3))
    manifest = load_bundle(work / "short").manifest
    assert manifest.training["steps"] == 5 and manifest.training["stopped"] == "max_steps"
    assert [h["steps"] for h in manifest.training["history"]] == [5]  # the partial epoch was scored
    # a learning rate too small to move the weights: no epoch beats the first, patience 1 stops after the second
    patient = options(work, "patient", epochs=5, patience=1, lr=1e-12, checkpoint_dir=work / "patient-ck")
    fit(patient)
    manifest = load_bundle(work / "patient").manifest
    assert len(manifest.training["history"]) == 2 and manifest.training["stopped"] == "patience"
    assert manifest.training["best_epoch"] == 1
    # resuming the finished run (a pod restarted during export) trains no further epoch
    fit(options(work, "patient-again", epochs=5, patience=1, lr=1e-12, checkpoint_dir=work / "patient-ck", resume=True))
    again = load_bundle(work / "patient-again").manifest
    assert again.training["steps"] == manifest.training["steps"] and again.training["stopped"] == "patience"
    assert again.training_run is not None and again.training_run.resumed_from_step == manifest.training["steps"]


def test_gradient_accumulation_on_one_process_keeps_the_global_batch(work: Path) -> None:
    """Global batch 8 as 2 micro-batches of 4: the same number of optimizer steps (the gradient of each step is the
    global batch's, see test_distributed's layout test; dropout masks differ, so the weights are not identical)."""
    fit(options(work, "accum", grad_accum=2))
    manifest = load_bundle(work / "accum").manifest
    assert manifest.training_run is not None and manifest.training_run.grad_accum == 2
    assert manifest.training["steps"] == load_bundle(work / "fp32").manifest.training["steps"] == 2 * 24


def test_parquet_shards_train_end_to_end_and_the_manifest_names_the_directory(work: Path) -> None:
    shards = work / "shards"
    shards.mkdir()
    rows = uneven_rows()
    for i in range(2):
        part = rows[i::2]
        pq.write_table(
            pa.table({"text": [t for t, _ in part], "label": [lab for _, lab in part]}), shards / f"{i}.parquet"
        )
    fit(options(work, "from-shards", data=str(shards), epochs=1))
    dataset = load_bundle(work / "from-shards").manifest.dataset
    assert (dataset["format"], dataset["path"], dataset["files"], dataset["n_examples"]) == (
        "parquet",
        "shards",
        2,
        231,
    )


def test_progress_lines_report_rows_per_second_and_a_summary(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit(options(work, "talkative", progress=True, epochs=1, cache_dir=work / "fresh-cache"))
    out = capsys.readouterr().out
    assert "data: 231 rows read in" in out and "rows/s" in out and "rows per CPU-second" in out
    assert "training: 24 steps, 1 epoch(s) in" in out and "examples/s (1 process(es)); best epoch 1" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "8", "--grad-accum", "3"], "--batch-size 8 is the global batch: it must be a multiple"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    ],
)
def test_flags_that_cannot_work_are_refused(
    work: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fit", "--data", str(work / "data.csv"), "--base-model", str(work / "base"), "--output", str(work / "x")]
    assert main([*argv, "--cache-dir", str(work / "cache"), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (work / "x").exists()
