"""Reading labelled rows from CSV, JSON Lines and Parquet files, or a directory of such shards, one row at a time.

Every reader is a generator of :class:`Row`: the text, the optional second text of a pair, the labels, and where
the row came from (file, row number, and for text formats the file line), so that a bad cell is reported as
``data.csv: row 3 (line 4): column 'text' is empty`` however large the file. Rows stream: memory does not grow with
the file, which is what lets :mod:`training.datastore` write a data set of any size into its Arrow cache, while
:func:`training.data.load_data` collects the same rows into lists for small data and scoring.

Why not ``datasets.load_dataset("csv")``: it parses through pandas, which neither reports the row and line of a bad
cell nor refuses undecodable bytes; the strict, located validation here is the project's contract for bad input.
Parquet is read with pyarrow's own reader (record batch by record batch). CSV lines are read by Python's C ``csv``
module; strict UTF-8 is checked as the file streams, and the exact line, column and byte offset of the first bad
byte is found by a second, block-wise scan only when decoding fails.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from training.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 8192


@dataclass(frozen=True)
class Columns:
    """Where a file keeps its fields, and how its labels are written."""

    text: str = "text"
    label: str = "label"
    pair: str | None = None  # the second text of a pair (``--text-pair-column``)
    multi_label: bool = False
    separator: str = ";"  # between labels in a CSV cell (multi-label); JSONL and Parquet may use a list

    def required(self) -> list[tuple[str, str]]:
        """(column, flag that chooses it), in the order errors should mention them."""
        columns = [(self.text, "--text-column")]
        if self.pair is not None:
            columns.append((self.pair, "--text-pair-column"))
        return [*columns, (self.label, "--label-column")]


@dataclass(frozen=True, slots=True)
class Row:
    text: str
    pair: str | None
    labels: tuple[str, ...]
    file: str  # the path as the user gave it (error messages point at the real file)
    number: int  # 1-based row within its file; 0 for one-row-per-file sources (BBC articles)
    line: int = 0  # the file line the row ends on (CSV, JSONL); 0 when the format has none

    @property
    def where(self) -> str:
        return where(self.file, self.number, self.line)


def where(file: str, number: int, line: int) -> str:
    """``data.csv: row 3 (line 4)``, ``shard.parquet: row 3``, or just the file for one-row-per-file sources."""
    if number == 0:
        return file
    return f"{file}: row {number}" + (f" (line {line})" if line else "")


def data_files(path: Path) -> tuple[str, list[Path]]:
    """The format and the files of ``--data PATH``: one file, or every .parquet/.csv/.jsonl file of a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        kinds = {FORMATS[p.suffix.lower()] for p in files if p.suffix.lower() in FORMATS}
        if not kinds:
            raise DataError(f"{path}: directory holds no .parquet, .csv or .jsonl files")
        if len(kinds) > 1:
            raise DataError(f"{path}: directory mixes formats {sorted(kinds)}; one format per directory")
        kind = kinds.pop()
        return kind, [p for p in files if FORMATS.get(p.suffix.lower()) == kind]
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: unsupported data file type {suffix or '(none)'!r}; use 'bbc', .csv, .jsonl, .parquet or a "
            "directory of .parquet shards"
        )
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    return FORMATS[suffix], [path]


class CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read through it: progress and ETA by bytes for the text formats."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.bytes_read += n or 0
        return n or 0


def read_rows(kind: str, path: Path, columns: Columns, on_bytes: Callable[[int], None] | None = None) -> Iterator[Row]:
    """The rows of one file; ``on_bytes`` is told how many bytes were consumed so far (text formats)."""
    if kind == "parquet":
        yield from _parquet_rows(path, columns)
        return
    with path.open("rb") as raw:
        counting = CountingReader(raw)
        text = io.TextIOWrapper(
            io.BufferedReader(counting), encoding="utf-8-sig", newline="" if kind == "csv" else None
        )
        rows = _csv_rows(path, text, columns) if kind == "csv" else _jsonl_rows(path, text, columns)
        try:
            for i, row in enumerate(rows):
                if on_bytes is not None and i % 4096 == 0:
                    on_bytes(counting.bytes_read)
                yield row
        except UnicodeDecodeError:
            raise _utf8_error(path) from None
        if on_bytes is not None:
            on_bytes(counting.bytes_read)


def _utf8_error(path: Path, block: int = 1 << 20) -> DataError:
    """Find the first byte of ``path`` that is not UTF-8, block by block, and name its line, column and offset."""
    offset = line_start = 0
    lines = 1
    pending = b""
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            data = pending + chunk
            base = offset - len(pending)
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                if exc.end == len(data) and exc.reason == "unexpected end of data":
                    good = exc.start  # a character split across blocks: finish it with the next block
                else:
                    start = base + exc.start
                    before = data[: exc.start]
                    newline = before.rfind(b"\n")
                    lines += before.count(b"\n")
                    column = start - (base + newline + 1 if newline >= 0 else line_start) + 1
                    bad = data[exc.start : exc.end].hex(" ")
                    return DataError(
                        f"{path}: line {lines}, column {column} (byte offset {start}): bytes {bad} are not valid "
                        "UTF-8; re-save the file as UTF-8"
                    )
            done = data[:good]
            lines += done.count(b"\n")
            if (newline := done.rfind(b"\n")) >= 0:
                line_start = base + newline + 1
            pending = data[good:]
            offset += len(chunk)
    return DataError(f"{path}: the file is not valid UTF-8; re-save the file as UTF-8")


def _csv_rows(path: Path, text: IO[str], columns: Columns) -> Iterator[Row]:
    """Rows of a CSV file with a header row, as ``csv.DictReader`` reads them (blank lines skipped)."""
    reader = csv.reader(text)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            names = ", ".join(repr(c) for c, _ in columns.required())
            raise DataError(f"{path}: empty file (expected a header row with columns {names})")
        for column, flag in columns.required():
            if column not in header:
                raise DataError(f"{path}: column {column!r} not found; the header has {header} (choose with {flag})")
        index = {name: i for i, name in enumerate(header)}  # a repeated name: the last one wins, as in DictReader
        text_at, label_at = index[columns.text], index[columns.label]
        pair_at = index[columns.pair] if columns.pair is not None else -1
        number = 0
        for record in reader:
            if not record:
                continue
            number += 1
            row_where = where(str(path), number, reader.line_num)
            raw_label = _cell(row_where, _field(record, label_at), columns.label)
            labels = split_labels(row_where, raw_label, columns) if columns.multi_label else (raw_label.strip(),)
            pair = _field(record, pair_at) if pair_at >= 0 else None
            text_value, pair_value = _texts(row_where, _field(record, text_at), pair, columns)
            yield Row(text_value, pair_value, labels, str(path), number, reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None


def _field(record: list[str], at: int) -> str | None:
    return record[at] if at < len(record) else None


def _texts(row_where: str, text: object, pair: object, columns: Columns) -> tuple[str, str | None]:
    second = None
    if columns.pair is not None:
        second = _cell(row_where, pair, columns.pair, " (the second text of the pair)")
    return _cell(row_where, text, columns.text), second


def split_labels(row_where: str, raw: str, columns: Columns) -> tuple[str, ...]:
    parts = [part.strip() for part in raw.split(columns.separator)]
    for i, part in enumerate(parts, start=1):
        if not part:
            raise DataError(
                f"{row_where}: column {columns.label!r}: label {i} of {raw!r} is empty "
                f"(labels separated by {columns.separator!r})"
            )
    return tuple(dict.fromkeys(parts))  # a label named twice counts once


def _jsonl_rows(path: Path, text: IO[str], columns: Columns) -> Iterator[Row]:
    number = 0
    for line_no, line in enumerate(text, start=1):
        if not line.strip():
            continue
        number += 1
        row_where = where(str(path), number, line_no)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{row_where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{row_where}: expected a JSON object, got {type(record).__name__}")
        for column, flag in columns.required():
            if column not in record:
                raise DataError(
                    f"{row_where}: column {column!r} missing; the row has {sorted(record)} (choose with {flag})"
                )
        labels = _labels(row_where, record[columns.label], columns, strings=False)
        pair = record.get(columns.pair) if columns.pair else None
        text_value, pair_value = _texts(row_where, record[columns.text], pair, columns)
        yield Row(text_value, pair_value, labels, str(path), number, line_no)


def _labels(row_where: str, value: object, columns: Columns, strings: bool) -> tuple[str, ...]:
    """One row's labels from a JSON or Parquet value: a list with --multi-label (Parquet: or a separated string)."""
    if not columns.multi_label:
        hint = " (several labels per row need --multi-label)" if isinstance(value, list) else ""
        return (_cell(row_where, value, columns.label, hint).strip(),)
    if strings and isinstance(value, str):
        return split_labels(row_where, _cell(row_where, value, columns.label), columns)
    return json_labels(row_where, value, columns.label)


def json_labels(row_where: str, value: object, column: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise DataError(
            f"{row_where}: column {column!r} must be a JSON list of labels with --multi-label, "
            f"got {type(value).__name__}"
        )
    if not value:
        raise DataError(f"{row_where}: column {column!r} is an empty list; every row needs at least one label")
    labels = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, bool) or not isinstance(item, str | int | float) or not str(item).strip():
            raise DataError(f"{row_where}: column {column!r}: label {i} ({item!r}) is empty or not a string")
        labels.append(str(item).strip())
    return tuple(dict.fromkeys(labels))


def _cell(row_where: str, value: object, column: str, note: str = "") -> str:
    """One text or label value as a non-empty string; numbers (JSON labels) become their string form."""
    if value is None:
        raise DataError(f"{row_where}: column {column!r} is missing (row has too few fields){note}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{row_where}: column {column!r} must be a string, got {type(value).__name__}{note}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise DataError(f"{row_where}: column {column!r} is empty{note}")
    return text


def _parquet_rows(path: Path, columns: Columns) -> Iterator[Row]:
    """Rows of a Parquet file, record batch by record batch (pyarrow's reader; nulls are reported as empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    header = handle.schema_arrow.names
    for column, flag in columns.required():
        if column not in header:
            raise DataError(f"{path}: column {column!r} not found; the file has {header} (choose with {flag})")
    wanted = list(dict.fromkeys(c for c, _ in columns.required()))
    number = 0
    try:
        for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            values = {name: batch.column(name).to_pylist() for name in wanted}
            pairs = values[columns.pair] if columns.pair is not None else None
            for i, (text, label) in enumerate(zip(values[columns.text], values[columns.label], strict=True)):
                number += 1
                row_where = where(str(path), number, 0)
                if label is None:
                    raise DataError(f"{row_where}: column {columns.label!r} is null")
                labels = _labels(row_where, label, columns, strings=True)
                if text is None or (pairs is not None and pairs[i] is None):
                    column = columns.text if text is None else str(columns.pair)
                    raise DataError(f"{row_where}: column {column!r} is null")
                text_value, pair_value = _texts(row_where, text, pairs[i] if pairs is not None else None, columns)
                yield Row(text_value, pair_value, labels, str(path), number)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: after row {number}: cannot read the Parquet data ({exc})") from None
