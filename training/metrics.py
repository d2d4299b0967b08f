"""Classification metrics (accuracy, macro-F1, per-class table, confusion matrix) in plain numpy.

One implementation serves the PyTorch validation loop, the ONNX test scores written into the manifest and the
``evaluate`` command, so the numbers in the bundle and the numbers a user re-measures cannot disagree by
definition. numpy only: scikit-learn is not a dependency of the training extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Report:
    """Scores of one set of predictions; ``confusion[i, j]`` counts true class i predicted as j."""

    labels: list[str]
    accuracy: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: np.ndarray

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}

    def format(self) -> str:
        """Human-readable per-class table and confusion matrix, as printed by ``evaluate``."""
        width = max(9, *(len(label) for label in self.labels))
        lines = [
            f"accuracy {self.accuracy:.4f}   macro-F1 {self.macro_f1:.4f}   n={self.n}",
            "",
            f"{'class':<{width}}  {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}",
        ]
        for i, label in enumerate(self.labels):
            lines.append(
                f"{label:<{width}}  {self.precision[i]:>9.4f} {self.recall[i]:>7.4f} "
                f"{self.f1[i]:>7.4f} {self.support[i]:>8d}"
            )
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        cell = max(6, *(len(label[:12]) for label in self.labels), len(str(int(self.confusion.max()))))
        lines.append(" " * width + "  " + " ".join(f"{label[:12]:>{cell}}" for label in self.labels))
        for i, label in enumerate(self.labels):
            lines.append(f"{label:<{width}}  " + " ".join(f"{int(v):>{cell}d}" for v in self.confusion[i]))
        return "\n".join(lines)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> Report:
    """Score predicted class ids against true ids; classes never predicted or absent get precision/F1 0."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-d shapes")
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (actual > 0) | (predicted > 0)  # macro over classes seen in y_true or y_pred, like sklearn
    accuracy = float(tp.sum() / max(1, len(y_true)))
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    return Report(
        labels=list(labels),
        accuracy=accuracy,
        macro_f1=macro_f1,
        precision=[float(v) for v in precision],
        recall=[float(v) for v in recall],
        f1=[float(v) for v in f1],
        support=[int(v) for v in actual],
        confusion=confusion,
    )


@dataclass(frozen=True)
class MultiLabelReport:
    """Scores of multi-label decisions: micro- and macro-F1, subset accuracy, per label P/R/F1 and threshold.

    micro-F1 pools every (example, label) decision, so frequent labels weigh more; macro-F1 averages the labels'
    F1 (each label counts once); subset accuracy is the share of examples whose predicted set is exactly right.
    """

    labels: list[str]
    micro_f1: float
    macro_f1: float
    subset_accuracy: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    thresholds: list[float]
    n_examples: int

    @property
    def n(self) -> int:
        return self.n_examples

    def summary(self) -> dict[str, float]:
        return {"micro_f1": self.micro_f1, "macro_f1": self.macro_f1, "subset_accuracy": self.subset_accuracy}

    def format(self) -> str:
        width = max(9, *(len(label) for label in self.labels))
        lines = [
            f"micro-F1 {self.micro_f1:.4f}   macro-F1 {self.macro_f1:.4f}   subset accuracy "
            f"{self.subset_accuracy:.4f}   n={self.n}",
            "",
            f"{'label':<{width}}  {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8} {'threshold':>9}",
        ]
        for i, label in enumerate(self.labels):
            lines.append(
                f"{label:<{width}}  {self.precision[i]:>9.4f} {self.recall[i]:>7.4f} {self.f1[i]:>7.4f} "
                f"{self.support[i]:>8d} {self.thresholds[i]:>9.4f}"
            )
        return "\n".join(lines)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)


def multilabel_report(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], thresholds: list[float] | None = None
) -> MultiLabelReport:
    """Score 0/1 decision matrices [n, labels]; a label never true nor predicted gets F1 0 and no macro vote."""
    truth = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_pred).astype(bool)
    if truth.shape != pred.shape or truth.ndim != 2 or truth.shape[1] != len(labels):
        raise ValueError(f"y_true {truth.shape} and y_pred {pred.shape} must both be [n, {len(labels)}]")
    tp = (truth & pred).sum(axis=0).astype(np.float64)
    fp = (~truth & pred).sum(axis=0).astype(np.float64)
    fn = (truth & ~pred).sum(axis=0).astype(np.float64)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = _f1(tp, fp, fn)
    present = (tp + fp + fn) > 0
    micro = float(_f1(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))[0])
    return MultiLabelReport(
        labels=list(labels),
        micro_f1=micro,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        subset_accuracy=float((truth == pred).all(axis=1).mean()) if len(truth) else 0.0,
        precision=[float(v) for v in precision],
        recall=[float(v) for v in recall],
        f1=[float(v) for v in f1],
        support=[int(v) for v in truth.sum(axis=0)],
        thresholds=[float(t) for t in thresholds] if thresholds is not None else [0.5] * len(labels),
        n_examples=len(truth),
    )
