"""Experiment tracking: ``--report-to tensorboard mlflow`` (off by default), through the libraries' own APIs.

What every tracker receives: the run's parameters at the start, training loss and learning rate per logged step,
validation metrics per epoch, the bundle's test metrics (per graph) and the bundle's path at the end. Only rank 0
of a torchrun job reports. The run ids go into the bundle's manifest (``training_run.tracking``), so a bundle
leads back to its run.

- TensorBoard: ``torch.utils.tensorboard.SummaryWriter`` writes event files under ``--logging-dir/RUN_NAME``
  (default ``runs/``); the run id is that directory's name.
- MLflow: the ``mlflow`` client, honouring ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` (default
  experiment ``bertserve``). A local file store (``file:./mlruns``, the default) needs no server; MLflow 3 keeps
  it only behind ``MLFLOW_ALLOW_FILE_STORE``, which is set for file URIs unless the user set it.

Neither library is imported unless asked for: the service image and plain ``fit`` never need them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from training.errors import TrainingError

if TYPE_CHECKING:
    from training.finetune import EpochLog

REPORTERS = ("none", "tensorboard", "mlflow")


class Backend(Protocol):
    name: str
    run_id: str

    def params(self, values: Mapping[str, Any]) -> None: ...
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def text(self, key: str, value: str) -> None: ...
    def close(self, ok: bool) -> None: ...


class TensorBoard:
    name = "tensorboard"

    def __init__(self, logging_dir: Path, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise TrainingError(f"--report-to tensorboard: {exc}; install bertserve[train]") from None
        self.directory = Path(logging_dir) / run_name
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self.run_id = run_name

    def params(self, values: Mapping[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.writer.add_text("params", "| parameter | value |\n| --- | --- |\n" + table, 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, key: str, value: str) -> None:
        self.writer.add_text(key, value, 0)

    def close(self, ok: bool) -> None:
        self.writer.flush()
        self.writer.close()


class MLflow:
    name = "mlflow"

    def __init__(self, run_name: str) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri or uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
        try:
            import mlflow
        except ImportError as exc:
            raise TrainingError(f"--report-to mlflow: {exc}; install bertserve[train]") from None
        self.mlflow = mlflow
        if "MLFLOW_EXPERIMENT_NAME" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
            mlflow.set_experiment("bertserve")
        self.run = mlflow.start_run(run_name=run_name)
        self.run_id = str(self.run.info.run_id)

    def params(self, values: Mapping[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:6000] for k, v in values.items()})

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in values.items()}, step=step)

    def text(self, key: str, value: str) -> None:
        self.mlflow.set_tag(key, value)

    def close(self, ok: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


class Tracker:
    """The chosen backends behind one small interface; with none it does nothing (and costs nothing)."""

    def __init__(self, backends: list[Backend], every: int = 1) -> None:
        self.backends = backends
        self.every = max(1, every)

    @property
    def run_ids(self) -> dict[str, str]:
        return {b.name: b.run_id for b in self.backends}

    def params(self, values: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.params(values)

    def step(self, step: int, loss: float, lr: float) -> None:
        if step % self.every == 0:
            for backend in self.backends:
                backend.scalars({"train/loss": loss, "train/lr": lr}, step)

    def epoch(self, log: EpochLog, step: int) -> None:
        """One epoch's validation metrics, at the global step where the epoch ended (same axis as the loss)."""
        values = {
            "train/epoch": float(log.epoch),
            "val/loss": log.val_loss,
            "val/accuracy": log.val_accuracy,
            "val/macro_f1": log.val_macro_f1,
            "train/epoch_loss": log.train_loss,
            "train/examples_per_s": log.examples_per_s,
        }
        if log.val_micro_f1 is not None:
            values["val/micro_f1"] = log.val_micro_f1
        for backend in self.backends:
            backend.scalars(values, step)

    def final(self, metrics: Mapping[str, Mapping[str, float]], bundle: Path, step: int) -> None:
        """The bundle's test metrics per graph (``test/accuracy``, ``test/int8/accuracy``...) and its path."""
        for backend in self.backends:
            for variant, values in metrics.items():
                prefix = "test/" if variant == "fp32" else f"test/{variant}/"
                backend.scalars({prefix + k: v for k, v in values.items()}, step)
            backend.text("bundle", str(Path(bundle).resolve()))


def parse_report_to(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``--report-to`` values (several allowed, comma- or space-separated); 'none' alone turns tracking off."""
    chosen: list[str] = []
    for value in values or ():
        for name in value.replace(",", " ").split():
            if name not in REPORTERS:
                raise TrainingError(f"--report-to {name}: expected {', '.join(REPORTERS)}")
            if name not in chosen:
                chosen.append(name)
    if "none" in chosen and len(chosen) > 1:
        raise TrainingError("--report-to none cannot be combined with a tracker")
    return tuple(name for name in chosen if name != "none")


@contextmanager
def tracking(report_to: tuple[str, ...], logging_dir: Path, run_name: str, every: int, main: bool) -> Iterator[Tracker]:
    """A :class:`Tracker` for the body (rank 0 only; others get an empty one), closed as FAILED if it raises."""
    backends: list[Backend] = []
    ok = False
    try:
        if main:
            for name in report_to:
                backends.append(TensorBoard(logging_dir, run_name) if name == "tensorboard" else MLflow(run_name))
        yield Tracker(backends, every)
        ok = True
    finally:
        for backend in backends:
            backend.close(ok)
