"""Shared fixtures: a tiny but real model bundle, built once per test session through the training code.

``tiny_bundle`` is what service tests load: a 2-layer random-init BERT with the MiniLM tokenizer, fine-tuned for
a few seconds on generated 3-class sentences (negative / neutral / positive), exported to ONNX, parity-checked,
optimized and int8-quantized by ``training.pipeline.fit``. Tests that need more bundles (another version for a
hot reload) call ``training.tiny.build_tiny_bundle`` directly, or use ``tiny_bundle_factory``.

Tests must not modify the directory ``tiny_bundle`` returns (it is shared); copy it first (``shutil.copytree``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fit's prepared-data cache goes to the session's temporary directory, not the user's ~/.cache."""
    if "BERTSERVE_CACHE_DIR" not in os.environ:
        os.environ["BERTSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("bertserve-cache"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a verified bundle with variants fp32, opt and int8 (name "tiny", version "1")."""
    from training.tiny import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle") / "tiny", name="tiny", version="1")


@pytest.fixture(scope="session")
def tiny_bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make(version="2", seed=1, optimize=False, quantize=False) -> Path``: a fresh tiny bundle per call."""
    from training.tiny import build_tiny_bundle

    def make(version: str = "2", *, name: str = "tiny", seed: int = 0, **kwargs: object) -> Path:
        out = tmp_path_factory.mktemp(f"tiny-{name}-{version}") / name
        return build_tiny_bundle(out, name=name, version=version, seed=seed, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def tiny_pair_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-pair bundle (labels negative/positive) with an fp16 variant; shared, do not modify."""
    from training.tiny import build_tiny_pair_bundle

    return build_tiny_pair_bundle(tmp_path_factory.mktemp("pair") / "pair", fp16=True)


@pytest.fixture(scope="session")
def tiny_multi_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny multi-label bundle (food/price/service, thresholds) with an fp16 variant; shared, do not modify."""
    from training.tiny import build_tiny_multilabel_bundle

    return build_tiny_multilabel_bundle(tmp_path_factory.mktemp("multi") / "multi", fp16=True)
