"""Compare multi-label recipes on the validation split only: the table the multi-label defaults are chosen from.

Each recipe is a bundle ``python -m training fit`` wrote (one per epochs / lr point). For every bundle this
re-splits the data with the manifest's seed, runs the bundle's fp32 graph on the validation split and reports
validation micro-F1 under three ways of turning scores into labels:

- ``0.5``: every label whose (calibrated) score reaches 0.5, i.e. whose logit is >= 0 (no fitting at all);
- ``per-label``: one threshold per label maximizing that label's F1 (:func:`training.calibrate.choose_thresholds`,
  what ``fit`` does);
- ``global``: one threshold shared by all labels, maximizing micro-F1.

Thresholds fitted on the validation split and scored on it would flatter themselves, so the two fitted rules are
cross-fitted: the validation rows are halved at random, thresholds fitted on one half score the other and vice
versa, repeated over ``--repeats`` random halvings; the number reported is the mean micro-F1 of the pooled
out-of-half decisions. The test split is never read here: a recipe's test score is measured once, for the recipe
chosen (``python -m training evaluate``).

Usage::

    python -m training.recipe_sweep --data FILE.csv --label-column labels BUNDLE [BUNDLE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.bundle import load_bundle
from service.modelio import Encoder, sigmoid
from training.calibrate import choose_thresholds
from training.data import load_data, stratified_split
from training.evaluate import encode_part, graph_logits
from training.metrics import multilabel_report

Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (fit scores, fit targets) -> thresholds [labels]


@dataclass(frozen=True)
class RecipeRow:
    bundle: str
    epochs: int
    lr: float
    max_length: int
    best_epoch: int
    train_seconds: float
    val_micro_f1_05: float
    val_micro_f1_per_label: float
    val_micro_f1_global: float


def micro_f1(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> float:
    labels = [str(i) for i in range(targets.shape[1])]
    return multilabel_report(targets, scores >= thresholds, labels).micro_f1


def per_label_rule(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.asarray(choose_thresholds(scores, targets))


def global_rule(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The one threshold (a midpoint between neighbouring distinct scores) with the best micro-F1; ties: nearest 0.5."""
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2])
    f1 = np.array([micro_f1(scores, targets, np.full(scores.shape[1], c)) for c in candidates])
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return np.full(scores.shape[1], candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def cross_fitted(scores: np.ndarray, targets: np.ndarray, rule: Rule, repeats: int, seed: int = 0) -> float:
    """Mean micro-F1 of out-of-half decisions: thresholds fitted on one random half, applied to the other."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(repeats):
        order = rng.permutation(len(scores))
        halves = (order[: len(order) // 2], order[len(order) // 2 :])
        decided = np.zeros(scores.shape, dtype=bool)
        for fit_rows, score_rows in (halves, halves[::-1]):
            decided[score_rows] = scores[score_rows] >= rule(scores[fit_rows], targets[fit_rows])
        results.append(multilabel_report(targets, decided, [str(i) for i in range(targets.shape[1])]).micro_f1)
    return float(np.mean(results))


def recipe_row(bundle_dir: Path, data: str, label_column: str, text_column: str, repeats: int) -> RecipeRow:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if m.problem_type != "multi_label":
        raise SystemExit(f"{bundle_dir}: not a multi-label bundle")
    separator = m.dataset.get("label_separator") or ";"
    loaded = load_data(data, text_column, label_column, multi_label=True, label_separator=separator)
    val = stratified_split(loaded, int(m.dataset["seed"])).val
    encoder = Encoder.from_file(bundle.tokenizer_path, m.max_length)
    logits = graph_logits(bundle.model_path("fp32"), encode_part(encoder, val))
    temperature = m.calibration.temperature if m.calibration else 1.0
    scores, targets = sigmoid(logits / temperature), val.targets()
    training = m.training
    return RecipeRow(
        bundle=bundle_dir.name,
        epochs=int(training["epochs"]),
        lr=float(training["lr"]),
        max_length=m.max_length,
        best_epoch=int(training["best_epoch"]),
        train_seconds=float(training["train_seconds"]),
        val_micro_f1_05=micro_f1(scores, targets, np.full(scores.shape[1], 0.5)),
        val_micro_f1_per_label=cross_fitted(scores, targets, per_label_rule, repeats),
        val_micro_f1_global=cross_fitted(scores, targets, global_rule, repeats),
    )


def format_table(rows: list[RecipeRow]) -> str:
    lines = [
        "| bundle | epochs | lr | best epoch | train s | val micro-F1 @0.5 | per-label (c.-f.) | global (c.-f.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.bundle} | {r.epochs} | {r.lr:g} | {r.best_epoch} | {r.train_seconds:.0f} | {r.val_micro_f1_05:.4f} "
            f"| {r.val_micro_f1_per_label:.4f} | {r.val_micro_f1_global:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.recipe_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--label-column", default="labels")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--repeats", type=int, default=20, help="random halvings of the validation split")
    parser.add_argument("--json", action="store_true", help="one JSON object per bundle instead of a table")
    args = parser.parse_args(argv)
    rows = [recipe_row(b, args.data, args.label_column, args.text_column, args.repeats) for b in args.bundles]
    print("\n".join(json.dumps(asdict(r)) for r in rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
