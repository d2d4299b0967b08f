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
