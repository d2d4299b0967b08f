"""--report-to tensorboard mlflow: a real fit, read back with TensorBoard's event reader and MLflow's client from a
local file store (no server). And the run ids in the manifest lead back to those runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_support import fit_args, write_tiny_work

from service.bundle import load_bundle
from training.__main__ import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One fit reported to both trackers: (bundle, TensorBoard logging dir, MLflow store)."""
    work = write_tiny_work(tmp_path_factory.mktemp("tracked"))
    store = work / "mlruns"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-tests")
        extra = ["--report-to", "tensorboard", "mlflow", "--logging-dir", str(work / "tb"), "--log-every", "1"]
        argv = fit_args(work / "data.csv", work / "base", work / "bundle", work / "cache", *extra, "--quiet", epochs=2)
        assert main(argv) == 0
    return work / "bundle", work / "tb", store


def test_tensorboard_event_file_holds_params_steps_epochs_test_metrics_and_the_bundle(
    tracked: tuple[Path, Path, Path],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle, logging_dir, _ = tracked
    manifest = load_bundle(bundle).manifest
    assert manifest.training_run is not None
    run_dir = logging_dir / manifest.training_run.tracking["tensorboard"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    steps = manifest.training["steps"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))  # every step (--log-every 1)
    assert len(events.Scalars("train/lr")) == steps
    history = manifest.training["history"]
    val = events.Scalars("val/macro_f1")
    assert [round(e.value, 5) for e in val] == [round(h["val_macro_f1"], 5) for h in history]
    assert val[-1].step == steps  # epochs are on the same step axis as the loss
    test = events.Scalars("test/accuracy")
    assert len(test) == 1 and test[0].value == pytest.approx(manifest.variants["fp32"].metrics["accuracy"])
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "| lr | 0.003 |" in texts["params/text_summary"] and str(bundle) in texts["bundle/text_summary"]


def test_mlflow_file_store_run_holds_the_same_and_its_id_is_in_the_manifest(tracked: tuple[Path, Path, Path]) -> None:
    from mlflow.tracking import MlflowClient

    bundle, _, store = tracked
    manifest = load_bundle(bundle).manifest
    assert manifest.training_run is not None
    run_id = manifest.training_run.tracking["mlflow"]
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-tests"
    assert run.data.params["lr"] == "0.003" and run.data.params["batch_size"] == "8"
    assert run.data.params["world_size"] == "1" and run.data.params["precision"] == "fp32"
    losses = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, manifest.training["steps"] + 1))
    history = manifest.training["history"]
    assert [round(m.value, 5) for m in client.get_metric_history(run_id, "val_loss")] == [
        round(h["val_loss"], 5) for h in history
    ]
    for key, value in manifest.variants["fp32"].metrics.items():
        assert run.data.metrics[f"test_{key}"] == pytest.approx(value)
    assert run.data.tags["bundle"] == str(bundle)


def test_no_tracking_by_default_and_bad_tracker_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data", "bbc", "--output", str(tmp_path / "out")]
    assert main([*args, "--report-to", "wandb"]) == 2
    assert "--report-to wandb: expected none, tensorboard, mlflow" in capsys.readouterr().err
    assert main([*args, "--report-to", "none", "mlflow"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written (no runs/, no mlruns/)
