"""Bundles open in Optimum and a transformers pipeline unchanged, and compute what bertserve computes.

The round trip a user of the Hugging Face tools makes: ``ORTModelForSequenceClassification.from_pretrained(bundle)``
and ``pipeline("text-classification", model=that, tokenizer=AutoTokenizer.from_pretrained(bundle))``, in the
Optimum virtualenv (scripts/optimum-env.sh: Optimum pins an older transformers than bertserve's, so it has a venv
of its own, built once and cached under build/). The bundle directories are passed as they are: nothing is copied,
added or renamed. bertserve's side is the service's own runtime in-process: the bundle's Encoder, the
ModelRuntime's ONNX Runtime session and the manifest's Head.

Single-text (with opt and int8 graphs beside model.onnx), sentence-pair (with an fp16 graph) and multi-label
bundles; texts longer than the bundles' max_length check that both sides truncate the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import load_bundle
from service.config import RuntimeOptions
from service.modelio import Encoder, sigmoid, softmax
from service.runtime import ModelRuntime
from training.hfconfig import PROBLEM_TYPES

REPO = Path(__file__).resolve().parents[2]
LONG = " ".join(["the service was slow but the food was great and the prices were fair"] * 12)  # > 64 tokens
CASES: dict[str, tuple[list[str], list[str] | None]] = {
    "single": (["a great film, I loved it", "terrible", "the hotel was okay I guess", LONG], None),
    "pair": (
        ["the film was great", "awful", LONG, "fine"],
        ["the update turned out terrible", "the book was wonderful", "honestly it was the best", LONG],
    ),
    "multi": (["the pasta was great and the bill was awful", "the waiter was rude", "dessert", LONG], None),
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def optimum_python() -> str:
    """The Optimum venv's python: built by scripts/optimum-env.sh on first use (about 1.5 minutes), then cached."""
    proc = subprocess.run(
        ["scripts/optimum-env.sh"],
        cwd=REPO,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=800,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/optimum-env.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, tiny_pair_bundle: Path, tiny_multi_bundle: Path) -> dict[str, Path]:
    return {"single": tiny_bundle, "pair": tiny_pair_bundle, "multi": tiny_multi_bundle}


@pytest.fixture(scope="module")
def opened(optimum_python: str, bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What Optimum and the pipeline computed for each bundle (scripts/hf_roundtrip.py, one run for all three)."""
    request = [{"bundle": str(bundles[k]), "texts": texts, "pairs": pairs} for k, (texts, pairs) in CASES.items()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [optimum_python, str(REPO / "scripts" / "hf_roundtrip.py")],
        input=json.dumps(request),
        cwd=tmp_path_factory.mktemp("hf-cwd"),  # not the repo: bertserve is not importable there
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(zip(CASES, json.loads(proc.stdout), strict=True))


def bertserve_logits(bundle_dir: Path, texts: list[str], pairs: list[str] | None) -> np.ndarray:
    """The service's path: the bundle's tokenizer (truncating at max_length) and the runtime's session."""
    bundle = load_bundle(bundle_dir)
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    return ModelRuntime(bundle, RuntimeOptions(provider="cpu", variant="fp32")).run(encoder.encode(texts, pairs))


def by_label(rows: list[list[dict[str, Any]]], labels: list[str]) -> np.ndarray:
    """The pipeline's [{label, score}...] per input (sorted by score) as a matrix in the bundle's label order."""
    return np.array([[{r["label"]: r["score"] for r in row}[label] for label in labels] for row in rows])


@pytest.mark.parametrize("kind", list(CASES))
def test_optimum_loads_the_bundle_unchanged_with_its_labels(
    kind: str, opened: dict[str, Any], bundles: dict[str, Path]
) -> None:
    got, manifest = opened[kind], load_bundle(bundles[kind]).manifest
    assert got["onnx_file"] == "model.onnx"  # the fp32 graph, though other .onnx variants lie beside it
    assert got["input_names"] == sorted(manifest.inputs)
    assert [got["id2label"][str(i)] for i in range(len(got["id2label"]))] == manifest.labels
    assert got["problem_type"] == PROBLEM_TYPES[manifest.problem_type == "multi_label"]
    assert got["versions"]["transformers"].startswith("4.")  # Optimum's own transformers, not .venv's


@pytest.mark.parametrize("kind", list(CASES))
def test_optimum_and_the_pipeline_give_bertserves_logits(
    kind: str, opened: dict[str, Any], bundles: dict[str, Path]
) -> None:
    texts, pairs = CASES[kind]
    manifest = load_bundle(bundles[kind]).manifest
    ours = bertserve_logits(bundles[kind], texts, pairs)
    got = opened[kind]
    np.testing.assert_allclose(np.array(got["optimum_logits"]), ours, rtol=0, atol=1e-5)
    # the pipeline runs one input at a time (no padding) and names every logit by its label
    np.testing.assert_allclose(by_label(got["pipeline_raw"], manifest.labels), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", list(CASES))
def test_the_pipelines_scores_are_bertserves_at_temperature_one(
    kind: str, opened: dict[str, Any], bundles: dict[str, Path]
) -> None:
    """The pipeline applies softmax or sigmoid as the config's problem_type says, to uncalibrated logits.

    bertserve divides the logits by the manifest's temperature first (and applies per-label thresholds), so its
    scores differ by design; the single-label decision (argmax) is the same either way.
    """
    texts, pairs = CASES[kind]
    bundle = load_bundle(bundles[kind])
    ours = bertserve_logits(bundles[kind], texts, pairs)
    multi = bundle.manifest.problem_type == "multi_label"
    scores = by_label(opened[kind]["pipeline_scores"], bundle.manifest.labels)
    np.testing.assert_allclose(scores, sigmoid(ours) if multi else softmax(ours), rtol=0, atol=1e-5)
    if not multi:
        head = bundle.manifest.head()
        served = [bundle.manifest.labels[row[0]] for row in head.predict(head.scores(ours))]
        assert [row[0]["label"] for row in opened[kind]["pipeline_scores"]] == served


def test_the_readme_snippet_runs_as_printed(optimum_python: str, tiny_bundle: Path, tmp_path: Path) -> None:
    """README's Optimum snippet, verbatim, in a directory where models/bbc is a bundle; it prints every label."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "ORTModelForSequenceClassification" in snippet and 'pipeline("text-classification"' in snippet
    lines = snippet.rstrip("\n").splitlines()
    (tmp_path / "snippet.py").write_text("\n".join([*lines[:-1], f"print({lines[-1]})"]) + "\n", encoding="utf-8")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bbc").symlink_to(tiny_bundle)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [optimum_python, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(f"'label': '{label}'" in proc.stdout for label in load_bundle(tiny_bundle).manifest.labels)
