"""The multi-label defaults (epochs, lr, thresholds 0.5) and the validation-only sweep they were chosen with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.__main__ import MULTI_EPOCHS, MULTI_LR, build_parser, main, recipe, threshold_rule
from training.calibrate import thresholds_by_rule
from training.recipe_sweep import cross_fitted, global_rule, micro_f1, per_label_rule
from training.tiny import MULTI_LABELS, tiny_multilabel_dataset, write_rows, write_tiny_base_model

FIT = ["fit", "--data", "x.csv", "--output", "o"]


def parse(argv: list[str]) -> object:
    return build_parser().parse_args(argv)


def test_multilabel_defaults_apply_only_where_the_user_gave_no_value() -> None:
    multi = [*FIT, "--multi-label"]
    assert recipe(parse(multi)) == (MULTI_EPOCHS, MULTI_LR) == (2, 2e-4)
    assert threshold_rule(parse(multi)) == "0.5"
    assert recipe(parse([*multi, "--epochs", "1", "--lr", "1e-4"])) == (1, 1e-4)
    assert recipe(parse([*multi, "--epochs", "3"])) == (3, MULTI_LR)
    assert threshold_rule(parse([*multi, "--thresholds", "per-label"])) == "per-label"
    assert recipe(parse([*multi, "--text-pair-column", "b"])) == (3, 5e-5)  # a multi-label pair model: pair recipe
    assert recipe(parse(FIT)) == (1, 2e-4)  # single-label single texts keep theirs
    with pytest.raises(SystemExit):
        parse([*multi, "--thresholds", "0.7"])


def test_threshold_rules() -> None:
    scores = np.array([[0.9, 0.2], [0.4, 0.7], [0.45, 0.1], [0.3, 0.8]])
    targets = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=np.float32)
    assert thresholds_by_rule("0.5", scores, targets) == [0.5, 0.5]
    assert thresholds_by_rule("per-label", scores, targets) == [pytest.approx(0.35), pytest.approx(0.45)]
    with pytest.raises(ValueError, match="threshold rule 'mean'"):
        thresholds_by_rule("mean", scores, targets)


def test_cross_fitting_scores_thresholds_only_on_rows_they_were_not_fitted_on() -> None:
    """Labels that are pure noise: a threshold fitted and scored on the same rows looks better than chance;
    cross-fitted it does not, and on separable scores every rule is perfect."""
    rng = np.random.default_rng(0)
    scores, targets = rng.random((200, 3)), (rng.random((200, 3)) < 0.3).astype(np.float32)
    in_sample = micro_f1(scores, targets, per_label_rule(scores, targets))
    assert cross_fitted(scores, targets, per_label_rule, repeats=5) < in_sample - 0.02
    separable = np.where(targets > 0, 0.6 + 0.3 * scores, 0.4 * scores)
    for rule in (per_label_rule, global_rule):
        assert cross_fitted(separable, targets, rule, repeats=3) == 1.0
    assert micro_f1(separable, targets, np.full(3, 0.5)) == 1.0


@pytest.mark.slow
def test_fit_with_multilabel_defaults_decides_at_half(tmp_path: Path) -> None:
    """The CLI path a new user takes: --multi-label alone records thresholds 0.5 and the rule in the manifest."""
    data = write_rows(tmp_path / "tags.csv", ["text", "labels"], tiny_multilabel_dataset(n=120))
    base = write_tiny_base_model(tmp_path / "base", head=False)
    out = tmp_path / "bundle"
    tiny = ["--base-model", str(base), "--max-length", "64", "--batch-size", "8", "--device", "cpu", "--threads", "1"]
    argv = ["fit", "--data", str(data), "--label-column", "labels", "--multi-label", "--output", str(out), "--quiet"]
    assert main([*argv, *tiny, "--epochs", "2", "--lr", "3e-3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["thresholds"] == [0.5] * len(MULTI_LABELS)
    assert manifest["training"]["threshold_rule"] == "0.5"
