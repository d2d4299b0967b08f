"""Temperature scaling, ECE, per-label thresholds and the drift reference: numpy only, hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from service.modelio import Head
from training.calibrate import (
    calibrate,
    choose_thresholds,
    ece,
    fit_temperature,
    nll,
    probabilities,
    reference,
    top_correct,
)


def sample_softmax(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = probabilities(logits, False)
    return np.array([rng.choice(p.shape[1], p=row / row.sum()) for row in p])


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels() -> None:
    """Labels drawn from softmax(z / 2): the fitted temperature for logits z is close to 2."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(4000, 4))
    y = sample_softmax(z / 2.0, rng)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.0, rel=0.08)
    # it is the minimum of the NLL
    assert nll(z, y, t) < min(nll(z, y, t * 0.9), nll(z, y, t * 1.1))


def test_fit_temperature_for_sigmoid_uses_binary_cross_entropy() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(3000, 3))
    y = (rng.random(z.shape) < probabilities(z / 0.5, True)).astype(np.float32)  # raw scores under-confident
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.08)


def test_calibration_lowers_ece_and_never_changes_the_argmax() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1, size=(6000, 5))
    y = sample_softmax(z * 3, rng)  # true temperature 1/3: the raw scores are under-confident
    val, test = slice(0, 3000), slice(3000, 6000)
    c = calibrate(z[val], y[val], z[test], y[test])
    assert c.temperature == pytest.approx(1 / 3, rel=0.1)
    assert c.ece_after < c.ece_before / 3 and c.ece_after < 0.03
    assert c.bins == 15 and c.split == "test" and "softmax" in c.method
    before, after = probabilities(z, False), probabilities(z, False, c.temperature)
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(before.argmax(axis=1), after.argmax(axis=1))


def test_a_perfectly_separable_validation_split_keeps_temperature_one() -> None:
    z = np.array([[5.0, -5.0], [-4.0, 4.0], [6.0, 0.0], [0.0, 3.0]])
    y = np.array([0, 1, 0, 1])
    c = calibrate(z, y, z, y)
    assert c.temperature == 1.0 and "kept T = 1" in c.method


def test_ece_by_hand() -> None:
    # bin [0.6, 0.667): two rows, confidence 0.6, one right -> |0.5 - 0.6| * 2/4; bin of 0.9: two right -> 0.1 * 2/4
    confidence = np.array([0.6, 0.6, 0.9, 0.9])
    correct = np.array([True, False, True, True])
    assert ece(confidence, correct, bins=15) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    assert ece(np.array([1.0]), np.array([True])) == 0.0  # a score of exactly 1 lands in the top bin
    assert ece(np.array([]), np.array([], dtype=bool)) == 0.0


def test_top_correct_for_multi_label_means_the_top_label_is_true() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])
    targets = np.array([[0, 1, 0], [0, 0, 1]], dtype=np.float32)
    confidence, correct = top_correct(scores, targets)
    assert confidence.tolist() == pytest.approx([0.9, 0.7]) and correct.tolist() == [False, True]


def test_thresholds_maximize_each_labels_f1_on_validation() -> None:
    scores = np.array([[0.9, 0.2], [0.7, 0.3], [0.4, 0.25], [0.2, 0.9], [0.1, 0.05]])
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0]], dtype=np.float32)
    thresholds = choose_thresholds(scores, targets)
    # label 0: anything in (0.4, 0.7] separates perfectly; the midpoint 0.55 is chosen
    assert thresholds[0] == pytest.approx(0.55)
    # label 1: positives at 0.3 and 0.25 with a negative at 0.9: best F1 (0.8) at 0.225 (everything >= 0.25)
    assert thresholds[1] == pytest.approx(0.225)
    assert choose_thresholds(np.array([[0.3], [0.6]]), np.zeros((2, 1))) == [0.5]  # no positives: default


def test_reference_distributions_sum_to_one_and_name_every_label() -> None:
    head = Head(labels=("a", "b", "c"))
    scores = np.array([[0.8, 0.1, 0.1], [0.15, 0.7, 0.15], [0.96, 0.02, 0.02], [0.5, 0.3, 0.2]])
    ref = reference(head, scores)
    assert ref.n == 4 and ref.labels == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert len(ref.confidence_edges) == 11 and ref.confidence_edges[0] == 0.0 and ref.confidence_edges[-1] == 1.0
    assert sum(ref.confidence) == pytest.approx(1.0)
    assert ref.confidence[5] == 0.25 and ref.confidence[7] == 0.25 and ref.confidence[8] == 0.25
    assert ref.confidence[9] == 0.25
    multi = Head(labels=("a", "b"), problem_type="multi_label", thresholds=(0.5, 0.5))
    ref = reference(multi, np.array([[0.9, 0.8], [0.9, 0.1], [0.1, 0.2]]))
    assert ref.labels == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    nothing = reference(multi, np.array([[0.1, 0.2]]))
    assert nothing.labels == {"a": 0.5, "b": 0.5}
