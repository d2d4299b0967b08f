"""Scoring ONNX graphs the way they are served: the bundle's tokenizer, ONNX Runtime on CPU, the manifest's head.

``fit`` scores every exported variant on the test split through :func:`score`, and ``python -m training
evaluate`` re-scores a bundle through :func:`evaluate_bundle`: both build their feeds with service.modelio's
Encoder and pad_feeds and turn logits into decisions with the manifest's :class:`~service.modelio.Head`
(calibrated softmax + argmax, or calibrated sigmoid + per-label thresholds), so the numbers in the manifest, the
numbers a user re-measures and the answers the service gives cannot disagree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.bundle import Calibration, load_bundle
from service.modelio import Encoder, Head
from training.calibrate import ECE_BINS, ece, top_correct
from training.data import LabeledData, load_data, stratified_split
from training.encoding import Encoded, TokenRows, encode
from training.errors import DataError, TrainingError
from training.metrics import MultiLabelReport, Report, classification_report, multilabel_report

AnyReport = Report | MultiLabelReport


def graph_logits(path: Path, encoded: TokenRows, threads: int | None = None) -> np.ndarray:
    """Logits of the ONNX graph at ``path`` for every row of ``encoded``, on the CPU provider."""
    from training.export import cpu_session, onnx_logits

    return onnx_logits(cpu_session(path, threads), encoded)


def decision_matrix(head: Head, scores: np.ndarray) -> np.ndarray:
    """The head's predicted labels as a 0/1 [n, labels] matrix."""
    matrix = np.zeros(scores.shape, dtype=bool)
    for row, predicted in enumerate(head.predict(scores)):
        matrix[row, predicted] = True
    return matrix


def score(head: Head, logits: np.ndarray, targets: np.ndarray) -> AnyReport:
    """Score ``logits`` against ``targets`` (class ids, or a 0/1 matrix) with the head's own decisions."""
    scores = head.scores(logits)
    if head.multi_label:
        return multilabel_report(targets, decision_matrix(head, scores), list(head.labels), list(head.thresholds or ()))
    return classification_report(targets, scores.argmax(axis=1), list(head.labels))


def encode_part(encoder: Encoder, part: LabeledData) -> Encoded:
    return encode(encoder, part.texts, part.pairs)


@dataclass(frozen=True)
class EvaluateResult:
    report: AnyReport
    variant: str
    split: str
    n: int
    split_matches_training: bool | None  # None when not applicable (split "all" or no fingerprint)
    seconds: float
    calibration: Calibration | None  # as recorded in the manifest
    ece: float  # measured now, on this split, with the served (calibrated) scores
    ece_uncalibrated: float  # the same at temperature 1


def evaluate_bundle(
    bundle_dir: Path,
    data_spec: str,
    variant: str = "fp32",
    split: str = "test",
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int | None = None,
    pair_column: str | None = None,
    label_separator: str | None = None,
) -> EvaluateResult:
    """Score one ONNX graph of a bundle exactly as served: bundle tokenizer, ONNX Runtime CPU, manifest head.

    With ``split`` test/val/train the data is re-split with the seed recorded in the manifest (or ``seed``), so
    ``--data bbc`` scores the same held-out articles that ``fit`` reported; ``all`` scores every example. Columns
    default to the ones recorded at training time; a pair model needs its second text column.
    """
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    dataset = manifest.dataset
    multi = manifest.problem_type == "multi_label"
    pair_column = pair_column or dataset.get("text_pair_column")
    if manifest.text_pair and not pair_column:
        raise TrainingError(f"{bundle_dir}: a sentence-pair model; name the second text column (--text-pair-column)")
    if not manifest.text_pair and pair_column:
        raise TrainingError(f"{bundle_dir}: a single-text model; it takes no --text-pair-column")
    data = load_data(
        data_spec,
        text_column or dataset.get("text_column") or "text",
        label_column or dataset.get("label_column") or "label",
        for_training=split != "all",
        pair_column=pair_column,
        multi_label=multi,
        label_separator=label_separator or dataset.get("label_separator") or ";",
    )
    seen = {label for labels in (data.label_sets or [(x,) for x in data.labels]) for label in labels}
    unknown = sorted(seen - set(manifest.labels))
    if unknown:
        raise DataError(f"{data.source}: labels {unknown} are not among the bundle's labels {manifest.labels}")
    matches: bool | None = None
    if split == "all":
        part = data
    elif split in ("train", "val", "test"):
        part = getattr(stratified_split(data, seed if seed is not None else int(dataset.get("seed", 42))), split)
        if split == "test" and dataset.get("test_fingerprint"):
            matches = part.fingerprint() == dataset["test_fingerprint"]
    else:
        raise TrainingError(f"--split {split}: expected train, val, test or all")
    part = dataclasses.replace(part, label_names=list(manifest.labels))
    encoder = Encoder.from_file(bundle.tokenizer_path, manifest.max_length)  # what the service loads
    head = manifest.head()
    logits = graph_logits(bundle.model_path(variant), encode_part(encoder, part))
    targets = part.targets()
    return EvaluateResult(
        report=score(head, logits, targets),
        variant=variant,
        split=split,
        n=len(part),
        split_matches_training=matches,
        seconds=time.perf_counter() - started,
        calibration=manifest.calibration,
        ece=ece(*top_correct(head.scores(logits), targets), bins=ECE_BINS),
        ece_uncalibrated=ece(*top_correct(dataclasses.replace(head, temperature=1.0).scores(logits), targets)),
    )


def format_calibration(result: EvaluateResult) -> str:
    """Two lines: what the manifest recorded, and the ECE measured now on this split."""
    now = f"ECE ({ECE_BINS} bins, top score) on this split: {result.ece_uncalibrated:.4f} uncalibrated"
    c = result.calibration
    if c is None:
        return f"calibration: none recorded (temperature 1)\n{now}"
    return (
        f"calibration: temperature {c.temperature:.4f} ({c.method}); recorded on the {c.split} split: ECE "
        f"{c.ece_before:.4f} before, {c.ece_after:.4f} after\n{now}, {result.ece:.4f} calibrated (as served)"
    )


def report_json(result: EvaluateResult) -> str:
    r = result.report
    common = {"variant": result.variant, "split": result.split, "n": result.n, "labels": r.labels}
    per_label = {"precision": r.precision, "recall": r.recall, "f1": r.f1, "support": r.support}
    if isinstance(r, MultiLabelReport):
        body: dict[str, object] = {**r.summary(), **per_label, "thresholds": r.thresholds}
    else:
        body = {"accuracy": r.accuracy, "macro_f1": r.macro_f1, **per_label, "confusion": r.confusion.tolist()}
    calibration = {
        "ece": result.ece,
        "ece_uncalibrated": result.ece_uncalibrated,
        "calibration": result.calibration.model_dump() if result.calibration else None,
    }
    return json.dumps(
        {**common, **body, **calibration, "split_matches_training": result.split_matches_training}, indent=2
    )
