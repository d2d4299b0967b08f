"""A tiny but real bundle for tests and demos, built in seconds through the same code path as ``fit``.

A randomly initialized 2-layer BERT (hidden 32, 2 heads) with the real MiniLM vocabulary and tokenizer is saved
as a local checkpoint, fine-tuned on a generated 3-class sentiment-like CSV, exported, parity-checked, optimized
and quantized by :func:`training.pipeline.fit`. Nothing is mocked: the service tests that load it exercise the
real tokenizer, the real ONNX graphs (fp32, opt, int8) and a manifest written by ``service.bundle``.

The sentences carry one keyword per class ("great", "terrible", "okay"...), so a few epochs are enough for the
model to learn them: predictions on texts such as "a great film, I loved it" are meaningful, not noise.

Usage: ``build_tiny_bundle(out_dir, name="tiny", version="1")``, or ``python -m training.tiny OUT_DIR``
(``--task pair`` or ``--task multi-label`` first for the other two).

Two more tasks for the service's tests, on generated data too:

- :func:`build_tiny_pair_bundle`: sentence pairs (columns ``text``, ``text_pair``), labels ``negative`` /
  ``positive``: the polarity of the *reply* (the second text), while the first text carries a polarity word of
  its own, chosen at random. Both segments hold a keyword, so only a model that knows which segment is which
  (token_type_ids, position after [SEP]) can learn it. (Whether the two agree, an XOR, is not learnable by a
  2-layer random-init model in seconds: tried, it stayed at chance.)
- :func:`build_tiny_multilabel_bundle`: labels ``food``, ``price``, ``service``: a text names one or two of
  the topics by keyword, and its labels are the topics it names (CSV, separated by ``;``).
"""

from __future__ import annotations

import csv
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.encoding import TOKENIZER_FILES
from training.errors import TrainingError
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
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
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
    config = BertConfig(  # type: ignore[call-arg]  # num_labels reaches PretrainedConfig via **kwargs
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
    return _build_from_rows(
        out_dir,
        ["text", "label"],
        tiny_dataset(seed=seed),
        name=name,
        version=version,
        seed=seed,
        optimize=optimize,
        quantize=quantize,
        epochs=epochs,
    )


PAIR_LABELS = ("negative", "positive")


def tiny_pair_dataset(n_per_class: int = 120, seed: int = 0) -> list[tuple[str, str, str]]:
    """(text, text_pair, label): the label is the polarity of ``text_pair``; ``text`` has a random one."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
    rows = []
    for label in PAIR_LABELS:
        for _ in range(n_per_class):
            first = rng.choice(PAIR_LABELS)
            a = rng.choice(_TEMPLATES).format(s=rng.choice(_SUBJECTS), k=rng.choice(_KEYWORDS[first]))
            b = rng.choice(_TEMPLATES[:5]).format(s=rng.choice(_SUBJECTS), k=rng.choice(_KEYWORDS[label]))
            rows.append((a, b, label))
    rng.shuffle(rows)
    return rows


def build_tiny_pair_bundle(
    out_dir: Path,
    *,
    name: str = "tiny-pair",
    version: str = "1",
    seed: int = 0,
    fp16: bool = False,
    epochs: int = 10,
) -> Path:
    """A tiny sentence-pair bundle (``text_pair`` true; labels negative/positive) at ``out_dir``; returns it."""
    return _build_from_rows(
        out_dir,
        ["text", "text_pair", "label"],
        tiny_pair_dataset(seed=seed),
        name=name,
        version=version,
        seed=seed,
        optimize=False,
        quantize=False,
        epochs=epochs,
        text_pair_column="text_pair",
        fp16=fp16,
    )


MULTI_LABELS = ("food", "price", "service")
_TOPIC_WORDS = {
    "food": ["the pasta", "the soup", "dessert", "the steak", "the bread", "the salad"],
    "price": ["the bill", "the prices", "the cost", "the price", "value for money", "the check"],
    "service": ["the waiter", "the staff", "the service", "our server", "the host", "the waitress"],
}
_MULTI_TEMPLATES = ["{a} was {k}", "{a} was {k} and {b} was {k2}", "I thought {a} was {k}, {b} too", "{a}, {b}"]


def tiny_multilabel_dataset(n: int = 300, seed: int = 0, noise: float = 0.05) -> list[tuple[str, str]]:
    """(text, "label;label") rows: each text names one or two topics by keyword; its labels are those topics.

    A share ``noise`` of the rows carries one more label at random, as real tagging does: without it the
    validation split is separable and there is no temperature to fit.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
    words = [w for ws in _KEYWORDS.values() for w in ws]
    rows = []
    for i in range(n):
        topics = rng.sample(MULTI_LABELS, 1 if i % 2 == 0 else 2)
        template = rng.choice(_MULTI_TEMPLATES[:1] if len(topics) == 1 else _MULTI_TEMPLATES[1:])
        text = template.format(
            a=rng.choice(_TOPIC_WORDS[topics[0]]),
            b=rng.choice(_TOPIC_WORDS[topics[-1]]),
            k=rng.choice(words),
            k2=rng.choice(words),
        )
        labels = set(topics)
        if rng.random() < noise:  # a label the text does not name: the scores cannot all be 0 or 1
            labels.add(rng.choice(MULTI_LABELS))
        rows.append((text, ";".join(sorted(labels))))
    return rows


def build_tiny_multilabel_bundle(
    out_dir: Path,
    *,
    name: str = "tiny-multi",
    version: str = "1",
    seed: int = 0,
    fp16: bool = False,
    epochs: int = 12,
) -> Path:
    """A tiny multi-label bundle (labels food/price/service, thresholds per label) at ``out_dir``; returns it."""
    return _build_from_rows(
        out_dir,
        ["text", "labels"],
        tiny_multilabel_dataset(seed=seed),
        name=name,
        version=version,
        seed=seed,
        optimize=False,
        quantize=False,
        epochs=epochs,
        label_column="labels",
        multi_label=True,
        fp16=fp16,
    )


def write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _build_from_rows(
    out_dir: Path,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    name: str,
    version: str,
    seed: int,
    optimize: bool,
    quantize: bool,
    epochs: int,
    **overrides: Any,
) -> Path:
    with tempfile.TemporaryDirectory(prefix="bertserve-tiny-") as tmp:
        work = Path(tmp)
        data = write_rows(work / f"{name}.csv", header, rows)
        if list(header) != ["text", "label"]:  # another label set: a bare encoder, fit adds a head of its size
            write_tiny_base_model(work / "base", seed=seed, head=False)
        result = build_tiny_fit(
            work / "base",
            data,
            Path(out_dir),
            name=name,
            version=version,
            seed=seed,
            optimize=optimize,
            quantize=quantize,
            epochs=epochs,
            **overrides,
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
    **overrides: Any,
) -> FitResult:
    """Like :func:`build_tiny_bundle` but on a given data file, returning the full :class:`FitResult`.

    ``overrides`` are further :class:`FitOptions` fields (``text_pair_column``, ``multi_label``, ``fp16``...).
    """
    if not (base_dir / "config.json").is_file():
        write_tiny_base_model(base_dir, seed=seed)
    values: dict[str, Any] = {
        "data": str(data),
        "output": out_dir,
        "base_model": base_dir,
        "base_model_name": "tiny random-init BERT (2 layers, hidden 32, MiniLM vocabulary)",
        "epochs": epochs,
        "max_length": TINY_MAX_LENGTH,
        "batch_size": 8,
        "lr": 3e-3,  # with batch 8 and 6 epochs: validation accuracy 1.0 from epoch 4-5 on (seeds 0 and 1)
        "warmup_ratio": 0.1,
        "seed": seed,
        "optimize": optimize,
        "quantize": "int8" if quantize else None,
        "name": name,
        "version": version,
        "device": "cpu",
        "threads": 1,  # a 1M-parameter model gains nothing from threads and loses a lot on a busy CPU
        "progress": progress,
        "extra_dataset_info": {"generated_by": "training.tiny"},
        "cache_dir": base_dir.parent / "cache",  # next to the base checkpoint: gone with the temporary directory
    }
    result = fit(FitOptions(**(values | overrides)))
    if result is None:  # only under torchrun, on a rank other than 0
        raise TrainingError("build_tiny_fit: this process is not rank 0 and wrote no bundle")
    return result


_BUILDERS: dict[str, Callable[..., Path]] = {
    "text": build_tiny_bundle,
    "pair": build_tiny_pair_bundle,
    "multi-label": build_tiny_multilabel_bundle,
}
_DEFAULT_NAMES = {"text": "tiny", "pair": "tiny-pair", "multi-label": "tiny-multi"}


def main(argv: list[str] | None = None) -> int:
    """``python -m training.tiny [--task text|pair|multi-label] OUT_DIR [NAME [VERSION]]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    task = "text"
    if args[:1] == ["--task"] and len(args) > 1:
        task, args = args[1], args[2:]
    if task not in _BUILDERS or len(args) not in (1, 2, 3):
        print("usage: python -m training.tiny [--task text|pair|multi-label] OUT_DIR [NAME [VERSION]]", file=sys.stderr)
        return 2
    name = args[1] if len(args) > 1 else _DEFAULT_NAMES[task]
    path = _BUILDERS[task](Path(args[0]), name=name, version=args[2] if len(args) > 2 else "1")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
