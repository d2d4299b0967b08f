"""Sentence pairs, multi-label, calibration and fp16 end to end on tiny generated data: fit -> bundle -> scores.

Real tokenizer, real torch training, real ONNX Runtime; nothing mocked. Each bundle takes a few seconds
(training.tiny's builders). "Served" here means what the service does with a bundle: the bundle's tokenizer
through service.modelio's Encoder and pad_feeds, an ONNX Runtime session, and the manifest's Head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.bundle import load_bundle
from service.modelio import Encoder, pad_feeds
from training.__main__ import main
from training.errors import DataError, TrainingError
from training.evaluate import evaluate_bundle
from training.metrics import MultiLabelReport
from training.tiny import (
    MULTI_LABELS,
    PAIR_LABELS,
    tiny_multilabel_dataset,
    tiny_pair_dataset,
    write_rows,
)


@pytest.fixture(scope="module")
def pair_bundle(tiny_pair_bundle: Path) -> Path:
    return tiny_pair_bundle


@pytest.fixture(scope="module")
def multi_bundle(tiny_multi_bundle: Path) -> Path:
    return tiny_multi_bundle


@pytest.fixture(scope="module")
def pair_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pair-data") / "tiny-pair.csv"
    return write_rows(path, ["text", "text_pair", "label"], tiny_pair_dataset(seed=0))


@pytest.fixture(scope="module")
def multi_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multi-data") / "tiny-multi.csv"
    return write_rows(path, ["text", "labels"], tiny_multilabel_dataset(seed=0))


def served(
    bundle_dir: Path, texts: list[str], pairs: list[str] | None = None, variant: str = "fp32"
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """(logits, calibrated scores, predicted labels) as the service computes them."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    encoder = Encoder.from_file(bundle.tokenizer_path, m.max_length)
    feeds = pad_feeds(encoder.encode(texts, pairs), encoder.pad_id, m.inputs)
    session = ort.InferenceSession(str(bundle.model_path(variant)), providers=["CPUExecutionProvider"])
    (logits,) = session.run(m.outputs, feeds)
    head = m.head()
    scores = head.scores(logits)
    return logits, scores, [[m.labels[i] for i in row] for row in head.predict(scores)]


def no_absolute_paths(bundle_dir: Path) -> None:
    raw = (bundle_dir / "manifest.json").read_text(encoding="utf-8")
    assert str(Path.home()) not in raw and "/tmp" not in raw and "site-packages" not in raw, raw


# --- sentence pairs ----------------------------------------------------------------------------------------------


def test_pair_bundle_manifest(pair_bundle: Path) -> None:
    m = load_bundle(pair_bundle).manifest
    assert m.text_pair is True and m.problem_type == "single_label" and m.thresholds is None
    assert m.labels == list(PAIR_LABELS) and m.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert m.dataset["text_pair_column"] == "text_pair" and m.dataset["path"] == "tiny-pair.csv"
    assert m.variants["fp32"].metrics["accuracy"] >= 0.9
    assert m.reference is not None and sum(m.reference.labels.values()) == pytest.approx(1.0)
    assert sum(m.reference.confidence) == pytest.approx(1.0)
    no_absolute_paths(pair_bundle)


def test_a_pair_model_reads_which_text_is_the_reply(pair_bundle: Path) -> None:
    """The label is the reply's polarity: the same two sentences swapped flip the prediction."""
    a, b = "we went last week and the hotel turned out great", "the service was terrible."
    _, scores, labels = served(pair_bundle, [a, b], [b, a])
    assert labels == [["negative"], ["positive"]]
    assert scores.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_evaluate_scores_pairs_on_the_recorded_test_split(pair_bundle: Path, pair_csv: Path) -> None:
    m = load_bundle(pair_bundle).manifest
    result = evaluate_bundle(pair_bundle, str(pair_csv))
    assert result.split_matches_training is True and result.n == 24
    assert result.report.accuracy == pytest.approx(m.variants["fp32"].metrics["accuracy"], abs=1e-6)  # type: ignore[union-attr]
    with pytest.raises(TrainingError, match="a single-text model"):
        evaluate_bundle(load_bundle_dir_of_single_text(pair_bundle), str(pair_csv), pair_column="text_pair")


def load_bundle_dir_of_single_text(pair_bundle: Path) -> Path:
    """Rewrite a copy of the pair bundle's manifest as a single-text one (checksums are not on the manifest)."""
    import shutil

    copy = pair_bundle.parent / "as-single"
    if not copy.exists():
        shutil.copytree(pair_bundle, copy)
        raw = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
        raw["text_pair"] = False
        (copy / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    return copy


# --- multi-label -------------------------------------------------------------------------------------------------


def test_multilabel_bundle_has_thresholds_calibration_and_metrics(multi_bundle: Path) -> None:
    m = load_bundle(multi_bundle).manifest
    assert m.problem_type == "multi_label" and m.labels == list(MULTI_LABELS) and not m.text_pair
    assert m.thresholds is not None and len(m.thresholds) == 3 and all(0 < t < 1 for t in m.thresholds)
    assert m.thresholds != [0.5, 0.5, 0.5]  # chosen on validation, not the default
    assert {"micro_f1", "macro_f1", "subset_accuracy"} <= set(m.variants["fp32"].metrics)
    assert m.variants["fp32"].metrics["micro_f1"] >= 0.9
    assert m.dataset["multi_label"] is True and m.dataset["label_separator"] == ";"
    c = m.calibration
    assert c is not None and c.temperature != 1.0 and "shared by all labels" in c.method
    assert c.ece_after < c.ece_before
    no_absolute_paths(multi_bundle)


def test_served_multilabel_predictions_apply_the_thresholds(multi_bundle: Path) -> None:
    texts = ["the soup was great and the waiter was terrible", "the bill was awful", "the staff was fine"]
    logits, scores, labels = served(multi_bundle, texts)
    assert labels == [["food", "service"], ["price"], ["service"]]
    m = load_bundle(multi_bundle).manifest
    assert m.thresholds is not None and m.calibration is not None
    expected = scores >= np.asarray(m.thresholds, dtype=np.float32)
    assert [[m.labels[i] for i in np.flatnonzero(row)] for row in expected] == labels
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits / m.calibration.temperature)), rtol=1e-5)


def test_calibration_changes_scores_but_not_the_argmax(multi_bundle: Path, pair_bundle: Path) -> None:
    texts = [t for t, _ in tiny_multilabel_dataset(n=40, seed=5)]
    logits, scores, _ = served(multi_bundle, texts)
    uncalibrated = 1 / (1 + np.exp(-logits))
    assert np.abs(scores - uncalibrated).max() > 0.05
    np.testing.assert_array_equal(scores.argmax(axis=1), uncalibrated.argmax(axis=1))
    order = np.argsort(logits, axis=0)  # per label, calibrated scores still rank inputs as the logits do
    assert (np.diff(np.take_along_axis(scores, order, axis=0), axis=0) >= 0).all()


def test_evaluate_reports_multilabel_metrics_and_calibration(
    multi_bundle: Path, multi_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = load_bundle(multi_bundle).manifest
    result = evaluate_bundle(multi_bundle, str(multi_csv))
    assert isinstance(result.report, MultiLabelReport) and result.split_matches_training is True
    assert result.report.micro_f1 == pytest.approx(m.variants["fp32"].metrics["micro_f1"], abs=1e-6)
    assert result.report.thresholds == pytest.approx(m.thresholds)
    assert m.calibration is not None and result.ece == pytest.approx(m.calibration.ece_after, abs=1e-5)
    assert main(["evaluate", "--bundle", str(multi_bundle), "--data", str(multi_csv)]) == 0
    out = capsys.readouterr().out
    assert "micro-F1" in out and "subset accuracy" in out and "threshold" in out and "calibration: temperature" in out
    assert main(["evaluate", "--bundle", str(multi_bundle), "--data", str(multi_csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"micro_f1", "macro_f1", "subset_accuracy", "thresholds", "ece", "calibration"}
    unknown = multi_csv.parent / "unknown.csv"
    unknown.write_text("text,labels\nthe soup,food;drinks\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels \['drinks'\] are not among the bundle's labels"):
        evaluate_bundle(multi_bundle, str(unknown), split="all")


# --- fp16 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["pair", "multi"])
def test_fp16_graph_keeps_fp32_io_and_passes_half_precision_parity(
    which: str, pair_bundle: Path, multi_bundle: Path
) -> None:
    bundle_dir = pair_bundle if which == "pair" else multi_bundle
    m = load_bundle(bundle_dir).manifest
    fp16 = m.variants["fp16"]
    assert fp16.file == "model.fp16.onnx" and fp16.parity is not None
    assert fp16.parity.tolerance == 5e-2 and fp16.parity.max_abs_diff <= 5e-2
    assert fp16.parity.argmax_agreement >= 0.999 and fp16.parity.max_score_diff is not None
    assert any(k.endswith("_delta") for k in fp16.metrics)
    graph = onnx.load(str(bundle_dir / "model.fp16.onnx"))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    log = m.training["export"]["fp16"]
    assert log["keep_io_types"] is True and "LayerNormalization" in log["kept_fp32_ops"]
    texts = [t for t, *_ in (tiny_pair_dataset(10, seed=3) if which == "pair" else tiny_multilabel_dataset(20, 3))]
    pairs = [row[1] for row in tiny_pair_dataset(10, seed=3)] if which == "pair" else None
    full, _, labels32 = served(bundle_dir, texts, pairs)
    half, _, labels16 = served(bundle_dir, texts, pairs, variant="fp16")
    assert np.abs(full - half).max() <= 5e-2 and labels16 == labels32


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_fit_multilabel_with_fp16(multi_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.tiny import write_tiny_base_model

    base = write_tiny_base_model(tmp_path / "base", head=False)
    out = tmp_path / "cli-multi"
    args = ["fit", "--data", str(multi_csv), "--label-column", "labels", "--multi-label", "--fp16"]
    args += ["--base-model", str(base), "--output", str(out), "--epochs", "2", "--max-length", "32"]
    assert main([*args, "--lr", "3e-3", "--threads", "1", "--quiet", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "micro_f1" in printed and "fp16" in printed and "calibration: temperature" in printed
    m = load_bundle(out).manifest
    assert set(m.variants) == {"fp32", "fp16"} and m.problem_type == "multi_label"
    assert m.base_model == "base" and str(tmp_path) not in json.dumps(m.training)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "bbc", "--multi-label"], "no pairs, no multi-label"),
        (["--data", "{csv}", "--text-pair-column", "reply"], "column 'reply' not found"),
        (["--data", "{csv}", "--label-column", "labels"], "label separator"),
    ],
)
def test_cli_task_errors(
    extra: list[str], message: str, multi_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(csv=multi_csv) for a in extra]
    if "--label-column" in args:  # a single-label file read as multi-label: ';' never occurs
        single = tmp_path / "single.csv"
        single.write_text("text,labels\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10)), encoding="utf-8")
        args = ["--data", str(single), "--label-column", "labels", "--multi-label"]
    assert main(["fit", *args, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


# --- the BBC-derived tasks and the plain reference fine-tune (the tools behind issue 14's targets) ---------------


def test_bbc_derived_tasks_are_balanced_and_load_as_pairs_and_multilabel(tmp_path: Path) -> None:
    from training.bbc_tasks import write_tasks
    from training.data import load_data

    pairs_csv, multi_csv = write_tasks(tmp_path)
    pairs = load_data(str(pairs_csv), pair_column="text_pair")
    assert len(pairs) == 2225 and pairs.info["class_counts"] == {"different": 1112, "same": 1113}
    multi = load_data(str(multi_csv), label_column="labels", multi_label=True)
    assert multi.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert multi.label_sets is not None and {len(s) for s in multi.label_sets} == {1, 2}


def test_reference_fit_runs_the_plain_recipe_on_the_same_split(multi_csv: Path, tmp_path: Path) -> None:
    from training.bbc_tasks import reference_fit
    from training.tiny import write_tiny_base_model

    base = write_tiny_base_model(tmp_path / "base", head=False)
    result = reference_fit(
        str(multi_csv), label_column="labels", multi_label=True, base_model=base, epochs=1, max_length=32, lr=3e-3
    )
    assert result["n_test"] == 30 and 0 <= result["micro_f1"] <= 1 and "subset_accuracy" in result
