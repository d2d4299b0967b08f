"""Token ids for a prepared data set: the service's tokenizer run once over the cached rows, memory-mapped back.

:func:`tokenize` runs the service's own :class:`~service.modelio.Encoder` over ``rows.arrow`` with Hugging Face
``datasets`` (``Dataset.from_file(...).map(batched=True, num_proc=N)``, the field's standard for cached, parallel
preprocessing) into ``tokens-<key>/`` next to the rows, keyed by the tokenizer, the max length and the pair flag,
built aside and renamed under the same kind of file lock as the rows. :class:`TokenTable` memory-maps the result;
:class:`TokenView` is one split's rows of it, batched with :func:`service.modelio.pad_feeds` exactly as the
service pads.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from service.modelio import FEED_NAMES, Encoder, TokenSeq, pad_feeds
from training.datastore import DONE, Prepared, PrepStats, building, locked, read_arrow

TOKENIZE_BATCH_ROWS = 1000


class _Tokenize:
    """The batched ``datasets.map`` function: texts -> token ids, segment start, length (service Encoder)."""

    def __init__(self, encoder: Encoder, pairs: bool) -> None:
        self.encoder = encoder
        self.pairs = pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        pairs = batch.column("text_pair").to_pylist() if self.pairs else None
        seqs = self.encoder.encode(texts, pairs)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate([s.ids for s in seqs]).astype(np.int32)
        return pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                "segment": pa.array([s.segment for s in seqs], pa.int32()),
                "length": pa.array(lengths),
            }
        )


def tokenize(
    prepared: Prepared, encoder: Encoder, num_proc: int, progress: bool = True
) -> tuple[TokenTable, PrepStats]:
    """Token ids of every row, cached per tokenizer and max length next to the rows; memory-mapped back."""
    import datasets

    identity = json.dumps([encoder.tokenizer.to_str(), encoder.max_length, prepared.pairs])
    key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    directory = prepared.directory / f"tokens-{key}"
    started, cpu = time.perf_counter(), _cpu_seconds()
    with locked(directory):
        cached = (directory / DONE).is_file()
        if not cached:
            with building(directory) as tmp:
                if not progress:
                    datasets.disable_progress_bars()
                rows = datasets.Dataset.from_file(str(prepared.directory / "rows.arrow")).with_format("arrow")
                rows.map(
                    _Tokenize(encoder, prepared.pairs),
                    batched=True,
                    batch_size=TOKENIZE_BATCH_ROWS,
                    num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=rows.column_names,
                    cache_file_name=str(tmp / "tokens.arrow"),
                    new_fingerprint=key,
                    desc="tokenize",
                )
                shards = sorted(p.name for p in tmp.glob("tokens*.arrow"))
                (tmp / DONE).write_text(json.dumps({"shards": shards, "n": len(prepared)}), encoding="utf-8")
    stats = PrepStats(
        rows=len(prepared),
        read_seconds=prepared.stats.read_seconds,
        tokenize_seconds=0.0 if cached else time.perf_counter() - started,
        tokenize_cpu_seconds=0.0 if cached else _cpu_seconds() - cpu,
        num_proc=num_proc,
        cached=prepared.stats.cached,
        tokens_cached=cached,
    )
    return TokenTable(directory, encoder.pad_id), stats


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the datasets.map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class TokenTable:
    """Every row's token ids, memory-mapped; :meth:`view` selects a split's rows for batching."""

    def __init__(self, directory: Path, pad_id: int) -> None:
        meta = json.loads((directory / DONE).read_text(encoding="utf-8"))
        table = pa.concat_tables([read_arrow(directory / name) for name in meta["shards"]])
        self.pad_id = pad_id
        self.lengths = table.column("length").to_numpy().astype(np.int32)
        self.segments = table.column("segment").to_numpy().astype(np.int32)
        chunks = table.column("input_ids").chunks
        self._values = [chunk.values.to_numpy(zero_copy_only=True) for chunk in chunks]
        self._offsets = [chunk.offsets.to_numpy(zero_copy_only=True) for chunk in chunks]
        self._starts = np.cumsum([0] + [len(chunk) for chunk in chunks])

    def __len__(self) -> int:
        return len(self.lengths)

    def seq(self, row: int) -> TokenSeq:
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - int(self._starts[chunk])
        offsets = self._offsets[chunk]
        ids = self._values[chunk][offsets[local] : offsets[local + 1]].astype(np.int64)
        return TokenSeq(ids, int(self.segments[row]))

    def view(self, rows: np.ndarray) -> TokenView:
        return TokenView(self, np.asarray(rows, dtype=np.int64))


class TokenView:
    """The rows of one split: ``len``, ``lengths`` and ``batch(indices)`` like :class:`training.encoding.Encoded`."""

    def __init__(self, table: TokenTable, rows: np.ndarray) -> None:
        self.table = table
        self.rows = rows
        self.lengths = table.lengths[rows].astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int], names: Sequence[str] = FEED_NAMES) -> dict[str, np.ndarray]:
        seqs = [self.table.seq(int(self.rows[i])) for i in indices]
        return pad_feeds(seqs, self.table.pad_id, names)
