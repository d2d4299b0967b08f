"""The bundle's Hugging Face config.json, read by this venv's transformers; old bundles without one still serve.

The Optimum round trip itself (Optimum's pinned, older transformers in a venv of its own) is
tests/integration/test_hf_compat.py; these are the fast checks that need no second environment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from service.bundle import load_bundle, read_manifest, sha256_file, write_manifest
from service.config import RuntimeOptions
from service.modelio import Encoder
from service.runtime import ModelRuntime
from training.errors import TrainingError
from training.hfconfig import HF_CONFIG_NAME, hf_config, main, read_base_config
from training.pipeline import default_base_model
from training.tiny import write_tiny_base_model

BASE = {
    "_name_or_path": "/home/someone/checkpoints/minilm",
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 384,
    "num_labels": 2,
    "vocab_size": 30522,
}


def test_the_bundle_has_a_config_json_in_its_manifest(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    assert manifest.files[HF_CONFIG_NAME] == sha256_file(tiny_bundle / HF_CONFIG_NAME)


def test_transformers_reads_the_classifier_from_config_json(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle).manifest
    config = AutoConfig.from_pretrained(str(tiny_bundle), local_files_only=True)
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.model_type == "bert"
    assert [config.id2label[i] for i in range(config.num_labels)] == manifest.labels
    assert config.label2id == {label: i for i, label in enumerate(manifest.labels)}
    assert config.problem_type == "single_label_classification"
    assert config.hidden_size == 32 and config.num_hidden_layers == 2  # the base checkpoint's own fields


@pytest.mark.parametrize("pairs", [None, ["and the reply was terrible", "fine " * 80]])
def test_transformers_tokenizer_encodes_as_bertserve(tiny_bundle: Path, pairs: list[str] | None) -> None:
    """AutoTokenizer on the bundle (truncation=True) gives the ids bertserve feeds, long inputs cut alike."""
    manifest = load_bundle(tiny_bundle).manifest
    texts = ["a great film, I loved it", "okay " * 100]
    ours = Encoder.from_file(tiny_bundle / "tokenizer.json", manifest.max_length).encode(texts, pairs)
    theirs = AutoTokenizer.from_pretrained(str(tiny_bundle), local_files_only=True)(texts, pairs, truncation=True)
    assert [list(s.ids) for s in ours] == theirs["input_ids"]
    assert max(len(ids) for ids in theirs["input_ids"]) == manifest.max_length


def test_hf_config_overlays_the_classifier_on_the_base_config() -> None:
    config = hf_config(BASE, ["food", "price", "service"], multi_label=True)
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "food", "1": "price", "2": "service"}
    assert config["label2id"] == {"food": 0, "price": 1, "service": 2}
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["hidden_size"] == 384
    assert "_name_or_path" not in config and "num_labels" not in config  # no paths of the training machine
    assert hf_config(BASE, ["a", "b"], multi_label=False)["problem_type"] == "single_label_classification"


def test_a_base_model_that_is_not_bert_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE | {"model_type": "roberta"}), encoding="utf-8")
    with pytest.raises(TrainingError, match=r"config.json: model_type 'roberta'.*BERT checkpoint"):
        read_base_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TrainingError, match=r"config.json: not valid JSON"):
        read_base_config(tmp_path)


def test_a_bundle_without_config_json_still_loads_and_serves_and_can_get_one(tiny_bundle: Path, tmp_path: Path) -> None:
    """Bundles written before config.json existed: bertserve never needed it; hfconfig's CLI adds one."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / HF_CONFIG_NAME).unlink()
    write_manifest(old, read_manifest(old))  # the checksums as an older fit recorded them: no config.json
    bundle = load_bundle(old)
    assert HF_CONFIG_NAME not in bundle.manifest.files
    runtime = ModelRuntime(bundle, RuntimeOptions(provider="cpu", variant="fp32"))
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    logits = runtime.run(encoder.encode(["a great film, I loved it"]))
    assert logits.shape == (1, len(bundle.manifest.labels)) and np.isfinite(logits).all()

    assert main(["--base-model", str(default_base_model()), str(old)]) == 2  # MiniLM's 384 wide, not this encoder
    assert not (old / HF_CONFIG_NAME).exists()
    base = write_tiny_base_model(tmp_path / "base", head=False)  # the architecture the tiny bundle was trained from
    assert main(["--base-model", str(base), str(old)]) == 0
    assert load_bundle(old).manifest.files[HF_CONFIG_NAME] == sha256_file(old / HF_CONFIG_NAME)
    assert json.loads((old / HF_CONFIG_NAME).read_text(encoding="utf-8")) == json.loads(
        (tiny_bundle / HF_CONFIG_NAME).read_text(encoding="utf-8")
    )
