"""BBC-derived sentence-pair and multi-label tasks, and a plain reference fine-tune to compare bundles with.

Issue 14's targets ask for accuracy (pairs) and micro-F1 (multi-label) of bertserve's ONNX bundle beside a
plain fine-tune of the same base model in the same run. BBC News has one text and one topic per article, so
both tasks are derived from it, deterministically (seeded):

- **pairs** ("same topic?"): every article's lead (its first 40 words) paired with another article's lead,
  from the same topic for half of the rows; label ``same`` or ``different``. Only the two texts together
  decide the label.
- **multi-label** ("topics of a digest"): two article leads (30 words each) joined into one text; the labels
  are their topics, one when both leads share a topic (40% of rows), two otherwise.

:func:`reference_fit` is the plain reference: transformers' tokenizer (padding to the batch's longest),
``BertForSequenceClassification`` with AdamW and transformers' linear warm-up schedule, scored in PyTorch on
the same stratified test split (argmax, or 0.5 per label): no ONNX, no calibration, no tuned thresholds.

Usage::

    python -m training.bbc_tasks write DIR          # DIR/bbc_pairs.csv, DIR/bbc_multilabel.csv
    python -m training.bbc_tasks reference DIR/bbc_pairs.csv --text-pair-column text_pair
    python -m training.bbc_tasks reference DIR/bbc_multilabel.csv --label-column labels --multi-label
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.data import load_bbc, load_data, stratified_split
from training.metrics import classification_report, multilabel_report

PAIR_WORDS = 40
DIGEST_WORDS = 30


def _lead(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def bbc_pairs(seed: int = 0) -> list[tuple[str, str, str]]:
    """(text, text_pair, label) rows, one per BBC article, half of them with a partner of the same topic."""
    bbc = load_bbc()
    rng = random.Random(seed)  # noqa: S311 - a reproducible data set, not a secret
    by_topic: dict[str, list[int]] = {}
    for i, label in enumerate(bbc.labels):
        by_topic.setdefault(label, []).append(i)
    rows = []
    for i, topic in enumerate(bbc.labels):
        same = i % 2 == 0
        pool = by_topic[topic] if same else [j for t, js in by_topic.items() if t != topic for j in js]
        j = rng.choice([j for j in pool if j != i])
        rows.append((_lead(bbc.texts[i], PAIR_WORDS), _lead(bbc.texts[j], PAIR_WORDS), "same" if same else "different"))
    rng.shuffle(rows)
    return rows


def bbc_multilabel(seed: int = 0) -> list[tuple[str, str]]:
    """(text, "topic;topic") rows: two article leads joined, labelled with their topics."""
    bbc = load_bbc()
    rng = random.Random(seed)  # noqa: S311 - a reproducible data set, not a secret
    by_topic: dict[str, list[int]] = {}
    for i, label in enumerate(bbc.labels):
        by_topic.setdefault(label, []).append(i)
    rows = []
    for i, topic in enumerate(bbc.labels):
        other = topic if rng.random() < 0.4 else rng.choice([t for t in by_topic if t != topic])
        j = rng.choice([j for j in by_topic[other] if j != i])
        text = f"{_lead(bbc.texts[i], DIGEST_WORDS)} ... {_lead(bbc.texts[j], DIGEST_WORDS)}"
        rows.append((text, ";".join(sorted({topic, other}))))
    rng.shuffle(rows)
    return rows


def write_tasks(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pairs, multi = directory / "bbc_pairs.csv", directory / "bbc_multilabel.csv"
    for path, header, rows in (
        (pairs, ["text", "text_pair", "label"], bbc_pairs(seed)),
        (multi, ["text", "labels"], bbc_multilabel(seed)),
    ):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return pairs, multi


def reference_fit(
    data: str,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    multi_label: bool = False,
    base_model: Path | None = None,
    epochs: int = 1,
    max_length: int = 128,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = 42,
) -> dict[str, Any]:
    """Fine-tune the plain way and score the test split in PyTorch; returns the metrics and the time taken."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    from training.pipeline import default_base_model

    started = time.perf_counter()
    base = base_model or default_base_model()
    loaded = load_data(data, text_column, label_column, pair_column=text_pair_column, multi_label=multi_label)
    splits = stratified_split(loaded, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(loaded.label_names),
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
        local_files_only=True,
    )

    def batch(part: Any, indices: list[int]) -> dict[str, Any]:
        texts = [part.texts[i] for i in indices]
        pairs = [part.pairs[i] for i in indices] if part.pairs is not None else None
        return dict(tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))

    train_targets = torch.from_numpy(splits.train.targets())
    steps = (len(splits.train) + batch_size - 1) // batch_size * epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(splits.train), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            loss = model(**batch(splits.train, indices), labels=train_targets[indices]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    test = splits.test
    logits = []
    with torch.no_grad():
        for start in range(0, len(test), 32):
            logits.append(model(**batch(test, list(range(start, min(start + 32, len(test)))))).logits.numpy())
    z = np.concatenate(logits)
    result: dict[str, Any] = {
        "data": Path(data).name,
        "n_test": len(test),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if multi_label:
        result |= multilabel_report(test.targets(), z >= 0, loaded.label_names).summary()
    else:
        result |= classification_report(test.targets(), z.argmax(axis=1), loaded.label_names).summary()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bbc_tasks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write bbc_pairs.csv and bbc_multilabel.csv into DIR")
    write.add_argument("directory", type=Path)
    ref = commands.add_parser("reference", help="plain fine-tune + PyTorch test score, printed as JSON")
    ref.add_argument("data")
    ref.add_argument("--text-pair-column")
    ref.add_argument("--label-column", default="label")
    ref.add_argument("--multi-label", action="store_true")
    ref.add_argument("--epochs", type=int, default=1)
    ref.add_argument("--max-length", type=int, default=128)
    ref.add_argument("--lr", type=float, default=2e-4)
    ref.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.command == "write":
        for path in write_tasks(args.directory):
            print(path)
        return 0
    print(
        json.dumps(
            reference_fit(
                args.data,
                text_pair_column=args.text_pair_column,
                label_column=args.label_column,
                multi_label=args.multi_label,
                epochs=args.epochs,
                max_length=args.max_length,
                lr=args.lr,
                seed=args.seed,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
