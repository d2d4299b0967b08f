"""A tiny but real bundle for tests and demos, built in seconds through the same code path as ``fit``.

A randomly initialized 2-layer BERT (hidden 32, 2 heads) with the real MiniLM vocabulary and tokenizer is saved
as a local checkpoint, fine-tuned on a generated 3-class sentiment-like CSV, exported, parity-checked, optimized
and quantized by :func:`training.pipeline.fit`. Nothing is mocked: the service tests that load it exercise the
real tokenizer, the real ONNX graphs (fp32, opt, int8) and a manifest written by ``service.bundle``.

The sentences carry one keyword per class ("great", "terrible", "okay"...), so a few epochs are enough for the
model to learn them: predictions on texts such as "a great film, I loved it" are meaningful, not noise.

Usage: ``build_tiny_bundle(out_dir, name="tiny", version="1")``, or ``python -m training.tiny OUT_DIR``.
"""

from __future__ import annotations

import csv
import random
import shutil
import sys
import tempfile
from pathlib import Path

from training.encoding import TOKENIZER_FILES
from training.pipeline import FitOptions, FitResult, default_base_model, fit

TINY_LABELS = ("negative", "neutral", "positive")
TINY_MAX_LENGTH = 64
_KEYWORDS = {
    "negative": ["terrible", "awful", "horrible", "bad", "boring", "disappointing", "hated", "worst"],
    "neutral": ["okay", "average", "fine", "ordinary", "acceptable", "mediocre", "standard", "so-so"],
    "positive": ["great", "excellent", "wonderful", "good", "amazing", "fantastic", "loved", "best"],
}
_SUBJECTS = [
    "the film",
    "this phone",
    "the service",
    "our dinner",
    "the hotel",
    "that book",
    "the concert",
    "the update",
    "my order",
    "the game",
    "the lecture",
    "this laptop",
]
_TEMPLATES = [
    "{s} was {k}.",
    "honestly, {s} was {k} and I would say so again",
    "{k}",
    "I thought {s} was {k}, really {k}.",
    "we went last week and {s} turned out {k}",
    "{k} {k} {k}",
    "after waiting for two hours in the rain with the kids, {s} was {k}, to be honest about it all",
]


def tiny_dataset(n_per_class: int = 80, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs with mixed lengths (1 to ~25 words) so batches need real padding."""
    rng = random.Random(seed)
    rows = []
    for label in TINY_LABELS:
        for _ in range(n_per_class):
            template = rng.choice(_TEMPLATES)
            rows.append((template.format(s=rng.choice(_SUBJECTS), k=rng.choice(_KEYWORDS[label])), label))
    rng.shuffle(rows)
    return rows


def write_tiny_base_model(directory: Path, seed: int = 0, head: bool = True) -> Path:
    """Save a random-init tiny BertForSequenceClassification checkpoint plus the MiniLM tokenizer files.

    ``head=False`` saves a bare BertModel, like the packaged MiniLM: fit then initializes the head itself.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    source = default_base_model()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        type_vocab_size=2,
        num_labels=len(TINY_LABELS),
    )
    (BertForSequenceClassification(config) if head else BertModel(config)).save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    return directory


def build_tiny_bundle(
    out_dir: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    seed: int = 0,
    optimize: bool = True,
    quantize: bool = True,
    epochs: int = 6,
) -> Path:
    """Build a tiny bundle (fp32 + opt + int8 by default) at ``out_dir`` and return ``out_dir``.

    Different ``version`` values give bundles that differ in their manifest (and ``seed`` in their weights), which
    is what a hot-reload test needs. Takes a few seconds on a 2-core CPU.
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bertserve-tiny-") as tmp:
        work = Path(tmp)
        data = work / "tiny.csv"
        with data.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(tiny_dataset(seed=seed))
        result = build_tiny_fit(
            work / "base",
            data,
            out_dir,
            name=name,
            version=version,
            seed=seed,
            optimize=optimize,
            quantize=quantize,
            epochs=epochs,
        )
    return result.bundle.path


def build_tiny_fit(
    base_dir: Path,
    data: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    seed: int = 0,
    optimize: bool = True,
    quantize: bool = True,
    epochs: int = 6,
    progress: bool = False,
) -> FitResult:
    """Like :func:`build_tiny_bundle` but on a given data file, returning the full :class:`FitResult`."""
    if not (base_dir / "config.json").is_file():
        write_tiny_base_model(base_dir, seed=seed)
    options = FitOptions(
        data=str(data),
        output=out_dir,
        base_model=base_dir,
        base_model_name="tiny random-init BERT (2 layers, hidden 32, MiniLM vocabulary)",
        epochs=epochs,
        max_length=TINY_MAX_LENGTH,
        batch_size=8,
        lr=3e-3,  # with batch 8 and 6 epochs: validation accuracy 1.0 from epoch 4-5 on (seeds 0 and 1)
        warmup_ratio=0.1,
        seed=seed,
        optimize=optimize,
        quantize="int8" if quantize else None,
        name=name,
        version=version,
        device="cpu",
        threads=1,  # a 1M-parameter model gains nothing from threads and loses a lot on a busy CPU
        progress=progress,
        extra_dataset_info={"generated_by": "training.tiny.tiny_dataset"},
    )
    return fit(options)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2, 3):
        print("usage: python -m training.tiny OUT_DIR [NAME [VERSION]]", file=sys.stderr)
        return 2
    path = build_tiny_bundle(
        Path(args[0]), name=args[1] if len(args) > 1 else "tiny", version=args[2] if len(args) > 2 else "1"
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
