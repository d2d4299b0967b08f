"""Open bertserve bundles with Optimum and a transformers pipeline, as their users would; print what they compute.

Runs inside the Optimum virtualenv (scripts/optimum-env.sh), which has Optimum, the transformers version it pins
and ONNX Runtime, and no bertserve: the bundle directory is the only thing shared with bertserve, and nothing is
changed or added to it. Reads a JSON request on stdin::

    [{"bundle": DIR, "texts": [...], "pairs": [...] or null}, ...]

and writes one JSON result per request on stdout: Optimum's logits (ORTModelForSequenceClassification on the
tokenizer's padded batch), the text-classification pipeline's raw logits per label name
(``function_to_apply="none"``) and its default scores (softmax or sigmoid, chosen by the config's
problem_type), and the versions that computed them. The caller compares these with bertserve's own.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def open_bundle(bundle: str, texts: list[str], pairs: list[str] | None) -> dict[str, Any]:
    import transformers
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(bundle)
    model = ORTModelForSequenceClassification.from_pretrained(bundle)
    batch = tokenizer(texts, pairs, padding=True, truncation=True, return_tensors="pt")
    logits = model(**batch).logits.numpy().tolist()

    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    inputs: list[Any] = list(texts)
    if pairs is not None:  # the pipeline's form of a sentence pair
        inputs = [{"text": a, "text_pair": b} for a, b in zip(texts, pairs, strict=True)]
    raw = classifier(inputs, top_k=None, function_to_apply="none", truncation=True)
    scores = classifier(inputs, top_k=None, truncation=True)
    return {
        "bundle": bundle,
        "onnx_file": model.path.name,
        "input_names": sorted(model.input_names),
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "problem_type": model.config.problem_type,
        "optimum_logits": logits,
        "pipeline_raw": raw,
        "pipeline_scores": scores,
        "versions": {
            "transformers": transformers.__version__,
            "optimum-onnx": _version("optimum-onnx"),
            "optimum": _version("optimum"),
            "onnxruntime": _version("onnxruntime"),
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> int:
    requests = json.load(sys.stdin)
    results = [open_bundle(r["bundle"], r["texts"], r.get("pairs")) for r in requests]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
