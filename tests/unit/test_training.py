"""The training pipeline end to end on a tiny BERT: fit -> export -> parity -> bundle -> evaluate, and the CLI.

Real torch training, real ONNX export and real ONNX Runtime sessions; nothing is mocked. The tiny model is a
random-init 2-layer BERT with the MiniLM tokenizer (see training/tiny.py), so each fit takes a few seconds.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from service.bundle import INPUT_NAMES, OUTPUT_NAMES, BundleError, load_bundle
from service.modelio import Encoder, pad_feeds
from training.__main__ import main
from training.encoding import checkpoint_encoder, encode
from training.errors import ParityError, TrainingError
from training.export import check_parity, enforce_parity, export_onnx, parity_texts
from training.finetune import load_model, use_eager_attention
from training.pipeline import FitOptions, evaluate_bundle, fit
from training.tiny import TINY_LABELS, tiny_dataset, write_tiny_base_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same generated data the tiny_bundle fixture was trained on (seed 0), so splits line up."""
    path = tmp_path_factory.mktemp("tiny-data") / "tiny.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(tiny_dataset(seed=0))
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_base_model(tmp_path_factory.mktemp("tiny-base") / "base", seed=0)


def quick_options(data: Path, base: Path, output: Path, **overrides: object) -> FitOptions:
    """One short epoch, no extra variants: the cheapest real fit."""
    values: dict[str, object] = {
        "data": str(data),
        "output": output,
        "base_model": base,
        "epochs": 1,
        "max_length": 32,
        "batch_size": 16,
        "lr": 3e-3,
        "threads": 1,
        "progress": False,
        "name": "quick",
        "version": "1",
    }
    values.update(overrides)
    return FitOptions(**values)  # type: ignore[arg-type]


def served_logits(bundle_dir: Path, texts: list[str], variant: str = "fp32") -> np.ndarray:
    """Tokenize and run exactly as the service does: bundle tokenizer, truncation, no tokenizer padding."""
    bundle = load_bundle(bundle_dir)
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    feeds = pad_feeds(encoder.encode(texts), encoder.pad_id, bundle.manifest.inputs)
    session = ort.InferenceSession(str(bundle.model_path(variant)), providers=["CPUExecutionProvider"])
    (logits,) = session.run(list(OUTPUT_NAMES), feeds)
    return logits


# --- the tiny bundle: what the service tests rely on -----------------------------------------------------------


def test_tiny_bundle_manifest_records_everything_and_verifies(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)  # checks every sha256
    m = bundle.manifest
    assert (m.name, m.version, m.labels, m.max_length, m.opset) == ("tiny", "1", list(TINY_LABELS), 64, 17)
    assert (m.inputs, m.outputs) == (list(INPUT_NAMES), list(OUTPUT_NAMES))
    assert set(m.variants) == {"fp32", "opt", "int8"}
    assert {"tokenizer.json", "vocab.txt", "model.onnx", "model.opt.onnx", "model.int8.onnx"} <= set(m.files)
    for name in ("fp32", "opt"):
        parity = m.variants[name].parity
        assert parity is not None and parity.max_abs_diff <= 1e-4 and parity.argmax_agreement == 1.0
        assert parity.n_texts >= 64 and parity.batch_sizes == [1, 8, 32]
    assert m.variants["int8"].parity is not None
    for name in ("opt", "int8"):
        assert {"accuracy", "macro_f1", "accuracy_delta"} <= set(m.variants[name].metrics)
    assert m.variants["fp32"].metrics["accuracy"] >= 0.9  # the keywords are learnable in a few epochs
    assert m.dataset["split_counts"]["test"] == {"negative": 8, "neutral": 8, "positive": 8}
    assert m.training["export"]["parity_padded_fraction"] > 0.2  # parity batches really contain padding
    fused = m.training["export"]["optimize"]["fused_operators"]
    assert fused.get("Attention") == 2, fused  # eager-attention export lets ORT fuse one Attention per layer
    assert m.training["best_epoch"] >= 1 and len(m.training["history"]) == m.training["epochs"]


def test_tiny_bundle_tokenizer_json_truncates_at_max_length_and_does_not_pad(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / "tokenizer.json").read_text(encoding="utf-8"))
    assert raw["padding"] is None
    assert raw["truncation"]["max_length"] == 64
    tokenizer = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    assert len(tokenizer.encode("great " * 500).ids) == 64
    assert len(tokenizer.encode("great").ids) == 3  # [CLS] great [SEP], no padding


@pytest.mark.parametrize("variant", ["fp32", "opt", "int8"])
def test_served_graphs_have_dynamic_axes_and_padding_does_not_change_logits(tiny_bundle: Path, variant: str) -> None:
    short = ["a great film, I loved it", "the hotel was terrible", "it was okay I guess"]
    long_text = "after waiting for two hours in the rain with the kids, the concert was fine " * 3
    alone = np.vstack([served_logits(tiny_bundle, [t], variant) for t in short])
    padded = served_logits(tiny_bundle, [*short, long_text], variant)[:3]
    assert padded.shape == (3, 3)
    np.testing.assert_allclose(padded, alone, atol=1e-4 if variant != "int8" else 5e-2)
    predicted = [TINY_LABELS[i] for i in alone.argmax(axis=1)]
    assert predicted == ["positive", "negative", "neutral"]


def test_evaluate_rebuilds_the_training_test_split_and_reproduces_manifest_metrics(
    tiny_bundle: Path, tiny_csv: Path
) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    for variant in ("fp32", "opt", "int8"):
        result = evaluate_bundle(tiny_bundle, str(tiny_csv), variant=variant)
        assert result.split_matches_training is True
        assert result.n == 24
        assert result.report.accuracy == pytest.approx(manifest.variants[variant].metrics["accuracy"], abs=1e-6)
        assert result.report.confusion.sum() == 24
    everything = evaluate_bundle(tiny_bundle, str(tiny_csv), split="all")
    assert everything.n == 240 and everything.split_matches_training is None


def test_evaluate_rejects_labels_the_bundle_does_not_know(tiny_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("text,label\nhello,positive\nbye,angry\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"labels \['angry'\] are not among the bundle's labels"):
        evaluate_bundle(tiny_bundle, str(path), split="all")


def test_tiny_bundle_factory_builds_distinct_versions(tiny_bundle_factory, tiny_bundle: Path) -> None:  # type: ignore[no-untyped-def]
    other = tiny_bundle_factory("2", seed=1, optimize=False, quantize=False)
    m = load_bundle(other).manifest
    assert m.version == "2" and set(m.variants) == {"fp32"}
    assert m.files["model.onnx"] != load_bundle(tiny_bundle).manifest.files["model.onnx"]


# --- parity: the check must be able to fail ------------------------------------------------------------------


def test_parity_check_passes_for_the_exported_model_and_catches_a_different_one(
    tiny_base: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    model = use_eager_attention(load_model(tiny_base, list(TINY_LABELS)).eval())
    texts = parity_texts([t for t, _ in tiny_dataset(n_per_class=10)], [], 64)
    enc = encode(checkpoint_encoder(tiny_base, 64), texts)
    assert len(set(enc.lengths.tolist())) > 5  # mixed lengths: batches of 8 and 32 are padded
    path = tmp_path / "model.onnx"
    export_onnx(model, enc.batch([0, 1, 2]), path)
    good = check_parity(model, path, enc, threads=1)
    assert good.parity.max_abs_diff < 1e-5 and good.parity.argmax_agreement == 1.0
    assert good.padded_fraction > 0.2
    enforce_parity("fp32", good, 1e-4)

    with torch.no_grad():
        model.classifier.bias += torch.tensor([0.0, 0.0, 1e-3])  # the graph no longer matches the model
    bad = check_parity(model, path, enc, threads=1)
    assert bad.parity.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ParityError, match=r"parity check failed for variant 'fp32': max \|logit diff\| 0.001"):
        enforce_parity("fp32", bad, 1e-4)


def test_failed_parity_leaves_no_bundle_behind(tiny_csv: Path, tiny_base: Path, tmp_path: Path) -> None:
    output = tmp_path / "models" / "strict"
    with pytest.raises(ParityError):
        fit(quick_options(tiny_csv, tiny_base, output, parity_tolerance=0.0))
    assert not output.exists()
    assert list(output.parent.iterdir()) == []  # the staging directory is removed as well


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_fit_then_evaluate_then_refit_replaces_the_bundle(
    tiny_csv: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "cli"
    common = [
        "fit",
        "--data",
        str(tiny_csv),
        "--base-model",
        str(tiny_base),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--max-length",
        "32",
        "--lr",
        "3e-3",
        "--threads",
        "1",
        "--quiet",
        "--quantize",
        "int8",
    ]
    assert main([*common, "--version", "1"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "confusion matrix" in printed and "wall time" in printed
    first = load_bundle(out).manifest
    assert first.name == "cli" and set(first.variants) == {"fp32", "int8"} and first.max_length == 32

    assert main(["evaluate", "--bundle", str(out), "--data", str(tiny_csv), "--variant", "all"]) == 0
    printed = capsys.readouterr().out
    assert "variant fp32" in printed and "variant int8" in printed and "precision" in printed
    assert "warning" not in printed  # same data and seed: the recorded test split
    assert main(["evaluate", "--bundle", str(out), "--data", str(tiny_csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(first.variants["fp32"].metrics["accuracy"], abs=1e-6)
    assert report["n"] == 24 and len(report["confusion"]) == 3

    assert main([*common, "--version", "2"]) == 0
    capsys.readouterr()
    assert load_bundle(out).manifest.version == "2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cli"]  # no staging or old copies left


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_data_exits_2_with_one_line_error_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,pos\n,neg\n", encoding="utf-8")
    result = run_cli("fit", "--data", str(bad), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {bad}: row 2 (line 3): column 'text' is empty")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data", "{missing}", "--output", "{out}"], "file not found"),
        (["fit", "--data", "{csv}", "--text-column", "body", "--output", "{out}"], "column 'body' not found"),
        (["fit", "--data", "{csv}", "--output", "{out}", "--base-model", "{missing}"], "directory not found"),
        (["fit", "--data", "{csv}", "--output", "{out}", "--version", "no spaces"], "invalid --name/--version"),
        (["fit", "--data", "{csv}", "--output", "{out}", "--freeze-layers", "7"], "only 6 encoder layers"),
        (["fit", "--data", "{csv}", "--output", "{notbundle}"], "is not a model bundle; refusing to replace it"),
        (["evaluate", "--bundle", "{missing}", "--data", "{csv}"], "model bundle directory does not exist"),
    ],
)
def test_cli_errors_are_reported_not_raised(
    args: list[str], message: str, tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notbundle = tmp_path / "precious"
    notbundle.mkdir()
    (notbundle / "thesis.txt").write_text("do not delete", encoding="utf-8")
    values = {
        "missing": str(tmp_path / "missing.csv"),
        "out": str(tmp_path / "out"),
        "csv": str(tiny_csv),
        "notbundle": str(notbundle),
    }
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert (notbundle / "thesis.txt").is_file()


def test_evaluate_refuses_a_tampered_bundle(tiny_bundle: Path, tiny_csv: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "model.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="checksum mismatch"):
        evaluate_bundle(copy, str(tiny_csv), variant="int8")


def test_a_seed_fixes_the_whole_run_including_the_new_classification_head(tiny_csv: Path, tmp_path: Path) -> None:
    """A bare encoder (like the packaged MiniLM) gets a freshly initialized head: the seed must cover it too."""
    base = write_tiny_base_model(tmp_path / "bare", seed=0, head=False)
    texts = [text for text, _ in tiny_dataset(seed=3)[:16]]
    logits = {}
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        fit(quick_options(tiny_csv, base, tmp_path / run, seed=seed))
        logits[run] = served_logits(tmp_path / run, texts)
    np.testing.assert_array_equal(logits["a"], logits["b"])
    assert not np.allclose(logits["a"], logits["c"])


def test_freeze_layers_keeps_the_embeddings_and_bottom_layers_unchanged(tiny_csv: Path, tmp_path: Path) -> None:
    from training.finetune import freeze_bottom

    model = load_model(write_tiny_base_model(tmp_path / "base", seed=0), list(TINY_LABELS))
    total = sum(p.numel() for p in model.parameters())
    assert freeze_bottom(model, -1) == total
    trainable = freeze_bottom(model, 1)
    frozen = [*model.bert.embeddings.parameters(), *model.bert.encoder.layer[0].parameters()]
    assert trainable == total - sum(p.numel() for p in frozen)
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    with pytest.raises(TrainingError, match="only 2 encoder layers"):
        freeze_bottom(load_model(tmp_path / "base", list(TINY_LABELS)), 3)


def test_cli_rejects_a_negative_freeze_count_other_than_minus_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data", "bbc", "--output", "unused", "--freeze-layers", "-2"])
    assert exit_info.value.code == 2
    assert "--freeze-layers: must be >= 0, or -1 to train everything, got -2" in capsys.readouterr().err


def test_a_bundle_from_before_calibration_still_evaluates(tiny_bundle: Path, tiny_csv: Path, tmp_path: Path) -> None:
    """Old manifests (no problem_type, text_pair, calibration, reference) load and score at temperature 1."""
    import shutil

    from training.evaluate import format_calibration

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    raw = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    for key in ("problem_type", "text_pair", "thresholds", "calibration", "reference"):
        raw.pop(key)
    for key in ("text_pair_column", "multi_label", "label_separator"):
        raw["dataset"].pop(key)
    (old / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    result = evaluate_bundle(old, str(tiny_csv))
    assert result.split_matches_training is True and result.calibration is None
    assert result.ece == result.ece_uncalibrated
    assert "calibration: none recorded (temperature 1)" in format_calibration(result)


def test_the_tiny_bundle_records_calibration_and_a_drift_reference(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    assert m.problem_type == "single_label" and m.text_pair is False and m.thresholds is None
    assert m.calibration is not None and m.calibration.bins == 15 and m.calibration.split == "test"
    assert m.reference is not None and m.reference.n == 24 and set(m.reference.labels) == set(TINY_LABELS)
    assert sum(m.reference.labels.values()) == pytest.approx(1.0) and sum(m.reference.confidence) == pytest.approx(1.0)
    assert m.base_model.startswith("tiny random-init BERT") and m.dataset["path"] == "tiny.csv"


def test_a_decision_flip_within_tolerance_is_reported_as_a_near_tie() -> None:
    from service.bundle import Parity
    from training.export import ParityResult

    parity = Parity(max_abs_diff=2e-3, argmax_agreement=63 / 64, n_texts=64, batch_sizes=[1, 8, 32])
    result = ParityResult(parity=parity, padded_fraction=0.3, seconds=0.1, flip_margins=(1.5e-3,))
    enforce_parity("fp16", result, 5e-2, min_agreement=0.98)  # 0.984 passes a 0.98 rule
    with pytest.raises(ParityError, match=r"agreement 0.9844 \(at least 0.999\).*near-ties in PyTorch too.*0.0015"):
        enforce_parity("fp16", result, 5e-2, min_agreement=0.999)


def test_fit_warns_when_the_model_collapsed_to_one_class() -> None:
    """The BBC-derived pair task once collapsed silently (50%, every row 'same'); fit now says so."""
    from training.__main__ import collapse_warning
    from training.metrics import classification_report

    labels = ["different", "same"]
    truth = np.array([0, 0, 1, 1])
    collapsed = collapse_warning(classification_report(truth, np.array([1, 1, 1, 1]), labels))
    assert collapsed is not None and "'same' for every test row" in collapsed
    assert collapse_warning(classification_report(truth, np.array([0, 1, 1, 1]), labels)) is None
    assert collapse_warning(classification_report(np.array([1, 1]), np.array([1, 1]), labels)) is None  # one class


def test_pairs_get_their_own_default_recipe() -> None:
    """--text-pair-column without --epochs/--lr trains 3 epochs at 5e-5; explicit values win."""
    from training.__main__ import build_parser, recipe

    fit = ["fit", "--data", "x.csv", "--output", "o"]
    parse = build_parser().parse_args
    assert recipe(parse(fit)) == (1, 2e-4)
    assert recipe(parse([*fit, "--text-pair-column", "b"])) == (3, 5e-5)
    assert recipe(parse([*fit, "--text-pair-column", "b", "--epochs", "2", "--lr", "1e-4"])) == (2, 1e-4)
