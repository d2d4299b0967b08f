"""Scores that mean probabilities: temperature scaling, expected calibration error, thresholds, drift reference.

All of it works on the exported graph's logits (what is served), in numpy:

- :func:`fit_temperature`: one temperature T, scores = softmax|sigmoid(logits / T), fitted on the validation
  split by minimizing the negative log-likelihood (Guo et al. 2017). The NLL is convex in 1/T, so a
  golden-section search over log(1/T) finds the optimum without a solver dependency. Dividing every logit of a
  row by the same positive T keeps the argmax, and for sigmoid keeps each label's ranking, so accuracy and
  ROC curves do not change; only how confident the scores are.
- For sigmoid (multi-label) one temperature is shared by all labels, not one per label: a per-label fit rests
  on that label's few validation positives (a rare label has a handful) and overfits, while the shared one uses
  every (example, label) decision; the per-label thresholds chosen afterwards (on calibrated scores) already
  absorb each label's own bias where it matters, in the decision.
- :func:`ece`: expected calibration error over 15 equal-width bins of the top score; "correct" is the top label
  being right (multi-label: the top-scored label is one of the true labels).
- :func:`thresholds_by_rule`: the multi-label decision thresholds, 0.5 for every label (the default: measured
  better on held-out rows, docs/TRAINING_NOTES.md) or :func:`choose_thresholds`, per label the score threshold
  that maximizes that label's F1 on validation.
- :func:`reference`: the test split's distribution of predicted labels and top scores, for drift monitoring.
"""

from __future__ import annotations

import math

import numpy as np

from service.bundle import Calibration, Reference
from service.modelio import Head, sigmoid, softmax

ECE_BINS = 15
# The search range for T. On a validation split the model separates perfectly, the likelihood keeps rising as
# T -> 0 (every score -> 0 or 1): there is nothing to calibrate against, so an optimum at a bound keeps T = 1.
T_MIN, T_MAX = 0.05, 20.0
REFERENCE_BINS = 10
DEFAULT_THRESHOLD = 0.5
_GOLDEN = (math.sqrt(5) - 1) / 2


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood: softmax cross-entropy on class ids, or binary cross-entropy on 0/1 [n, k]."""
    z = logits.astype(np.float64) / temperature
    if targets.ndim == 2:  # log(1 + e^-z) for positives, log(1 + e^z) for negatives, computed stably
        return float(np.mean(np.logaddexp(0.0, -z) * targets + np.logaddexp(0.0, z) * (1 - targets)))
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(z)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, lo: float = T_MIN, hi: float = T_MAX) -> float:
    """The temperature in [lo, hi] minimizing :func:`nll` on (``logits``, ``targets``), to about 1e-6 relative."""
    a, b = math.log(1 / hi), math.log(1 / lo)  # search over log(1/T): NLL is convex, hence unimodal, in 1/T

    def loss(log_beta: float) -> float:
        return nll(logits, targets, math.exp(-log_beta))

    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > 1e-6:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = loss(d)
    return float(math.exp(-(a + b) / 2))


def top_correct(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top score, whether the top label is right) per row; multi-label: right = among the true labels."""
    top = scores.argmax(axis=1)
    rows = np.arange(len(scores))
    correct = targets[rows, top] > 0 if targets.ndim == 2 else top == targets
    return scores[rows, top], correct


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of (share of rows) x |accuracy - mean confidence|."""
    if len(confidence) == 0:
        return 0.0
    index = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)  # a score of exactly 1.0 is in the top bin
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(float(correct[mask].mean()) - float(confidence[mask].mean()))
    return float(total)


def probabilities(logits: np.ndarray, multi_label: bool, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float32) / np.float32(temperature)
    return sigmoid(z) if multi_label else softmax(z)


def calibrate(
    val_logits: np.ndarray, val_targets: np.ndarray, test_logits: np.ndarray, test_targets: np.ndarray
) -> Calibration:
    """Fit the temperature on validation; report the test split's ECE before (T = 1) and after."""
    multi = val_targets.ndim == 2
    temperature = fit_temperature(val_logits, val_targets)
    at_bound = not (T_MIN * 1.01 < temperature < T_MAX / 1.01)
    method = (
        "temperature scaling, one temperature shared by all labels, sigmoid BCE minimized on the validation split"
        if multi
        else "temperature scaling, softmax NLL minimized on the validation split"
    )
    if at_bound:
        method += f"; the optimum ran to the search bound ({temperature:.3g}, separable split): kept T = 1"
        temperature = 1.0
    before = ece(*top_correct(probabilities(test_logits, multi), test_targets))
    after = ece(*top_correct(probabilities(test_logits, multi, temperature), test_targets))
    return Calibration(
        temperature=round(temperature, 6),
        ece_before=round(before, 6),
        ece_after=round(after, 6),
        bins=ECE_BINS,
        split="test",
        method=method,
    )


THRESHOLD_RULES = ("0.5", "per-label")


def thresholds_by_rule(rule: str, scores: np.ndarray, targets: np.ndarray) -> list[float]:
    """Multi-label thresholds by ``rule``: "0.5" for every label, or "per-label" fitted on these (validation) rows.

    A fitted threshold sits between two validation scores, wherever the few rows near the boundary put it, so on
    a validation split of a few hundred rows it follows those rows more than the model; 0.5 on the calibrated
    score (logit >= 0) fits nothing.
    """
    if rule == "0.5":
        return [DEFAULT_THRESHOLD] * scores.shape[1]
    if rule == "per-label":
        return choose_thresholds(scores, targets)
    raise ValueError(f"threshold rule {rule!r}: expected one of {THRESHOLD_RULES}")


def choose_thresholds(scores: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label, the threshold on ``scores`` that maximizes that label's F1 on these (validation) rows.

    Candidates are the midpoints between neighbouring distinct scores (and one below the lowest), so a
    threshold never sits exactly on a validation score; ties go to the candidate nearest 0.5. A label without
    positives here keeps 0.5: there is nothing to fit it on.
    """
    thresholds = []
    for k in range(scores.shape[1]):
        s, y = scores[:, k].astype(np.float64), targets[:, k] > 0
        if not y.any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(s, kind="stable")
        distinct, first = np.unique(s[order], return_index=True)
        # candidate j sits just below distinct[j]: it predicts every row from sorted position first[j] on
        candidates = np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2])
        true_from = np.cumsum(y[order][::-1])[::-1]  # positives at or after each sorted position
        tp = true_from[first]
        f1 = 2 * tp / ((len(s) - first) + y.sum())
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        chosen = candidates[best[np.argmin(np.abs(candidates[best] - DEFAULT_THRESHOLD))]]
        thresholds.append(round(float(chosen), 6))
    return thresholds


def reference(head: Head, scores: np.ndarray, bins: int = REFERENCE_BINS) -> Reference:
    """The predicted-label and top-score distributions of ``scores`` (calibrated, test split) for drift checks.

    Multi-label: each label's share among all predicted labels (a row may predict several or none); uniform if
    nothing at all was predicted, so the distribution always sums to 1.
    """
    counts = np.zeros(len(head.labels))
    for predicted in head.predict(scores):
        counts[predicted] += 1
    shares = counts / counts.sum() if counts.sum() else np.full(len(head.labels), 1 / len(head.labels))
    edges = np.linspace(0.0, 1.0, bins + 1)
    top = scores.max(axis=1)
    index = np.clip((top * bins).astype(np.int64), 0, bins - 1)
    hist = np.bincount(index, minlength=bins) / len(top)
    return Reference(
        n=len(scores),
        labels={label: float(v) for label, v in zip(head.labels, shares, strict=True)},  # unrounded: sums to 1
        confidence_edges=[round(float(e), 6) for e in edges],
        confidence=[float(v) for v in hist],
    )
