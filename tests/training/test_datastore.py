"""The Arrow data cache behind ``fit``: Parquet and shard directories, the same split and tokens as the in-memory
path, reuse and invalidation, one builder under concurrency, and located errors. Fast: no model is trained."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data import load_data, stratified_split
from training.datastore import prepare
from training.encoding import checkpoint_encoder, encode
from training.errors import DataError
from training.readers import Columns
from training.tiny import tiny_dataset, tiny_multilabel_dataset, write_rows, write_tiny_base_model
from training.tokens import tokenize


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return checkpoint_encoder(write_tiny_base_model(tmp_path_factory.mktemp("base") / "base"), 64)


def same_as_in_memory(spec: str, columns: Columns, cache: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    """The cache gives the list-based loader's label map, split, targets, fingerprint and token ids."""
    old = load_data(spec, columns.text, columns.label, pair_column=columns.pair, multi_label=columns.multi_label)
    new = prepare(spec, columns, cache, progress=False)
    assert new.label_names == old.label_names and len(new) == len(old)
    tokens, _ = tokenize(new, encoder, 1, progress=False)
    for seed in (0, 42):
        old_split, new_split = stratified_split(old, seed), new.split(seed)
        for old_part, rows in zip(old_split.parts(), new_split.parts(), strict=True):
            assert old_part.fingerprint() == new.fingerprint(rows)
            assert np.array_equal(old_part.targets(), new.targets(rows))
        view = tokens.view(new_split.test)
        expected = encode(encoder, old_split.test.texts, old_split.test.pairs)
        indices = list(range(len(view)))
        assert all(np.array_equal(view.batch(indices)[k], expected.batch(indices)[k]) for k in expected.batch([0]))


def test_parquet_file_and_a_directory_of_shards_read_like_the_csv(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    rows = tiny_dataset()
    csv_path = write_rows(tmp_path / "d.csv", ["text", "label"], rows)
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}), tmp_path / "d.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # uneven shards, plus the marker files Spark leaves next to them
        part = rows[i * 100 : (i + 1) * 100]
        pq.write_table(
            pa.table({"label": [lab for _, lab in part], "text": [t for t, _ in part]}), shards / f"p{i}.parquet"
        )
    (shards / "_SUCCESS").write_text("", encoding="utf-8")
    cache = tmp_path / "cache"
    for spec in (csv_path, tmp_path / "d.parquet", shards):
        same_as_in_memory(str(spec), Columns(), cache, encoder)
    fingerprints = {
        prepare(str(s), Columns(), cache, progress=False).fingerprint(np.arange(240)) for s in (csv_path, shards)
    }
    assert len(fingerprints) == 1
    info = prepare(str(shards), Columns(), cache, progress=False).info
    assert info["format"] == "parquet" and info["path"] == "shards" and info["files"] == 3


def test_multi_label_parquet_takes_lists_or_separated_strings(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    rows = tiny_multilabel_dataset()
    columns = Columns(label="labels", multi_label=True)
    csv_path = write_rows(tmp_path / "m.csv", ["text", "labels"], rows)
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in rows], "labels": [lab.split(";") for _, lab in rows]}), lists)
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in rows], "labels": [lab for _, lab in rows]}), strings)
    same_as_in_memory(str(csv_path), columns, tmp_path / "cache", encoder)
    expected = prepare(str(csv_path), columns, tmp_path / "cache", progress=False)
    for spec in (lists, strings):
        got = prepare(str(spec), columns, tmp_path / "cache", progress=False)
        split = got.split(0)
        assert got.fingerprint(split.test) == expected.fingerprint(expected.split(0).test)
        assert np.array_equal(got.targets(split.train), expected.targets(expected.split(0).train))


def test_the_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    path = write_rows(tmp_path / "d.csv", ["text", "label"], tiny_dataset())
    cache = tmp_path / "cache"
    first = prepare(str(path), Columns(), cache, progress=False)
    assert not first.stats.cached and tokenize(first, encoder, 1, progress=False)[1].tokens_cached is False
    again = prepare(str(path), Columns(), cache, progress=False)
    assert again.stats.cached and again.directory == first.directory
    assert tokenize(again, encoder, 1, progress=False)[1].tokens_cached
    write_rows(path, ["text", "label"], tiny_dataset(seed=1))  # same name, new content
    os.utime(path, ns=(1, 1))
    changed = prepare(str(path), Columns(), cache, progress=False)
    assert not changed.stats.cached and changed.directory != first.directory
    assert prepare(str(path), Columns(text="label"), cache, progress=False).directory != changed.directory


def test_concurrent_preparers_build_once_and_share(tmp_path: Path) -> None:
    """The torchrun case: several processes (here threads, each with its own lock handle) ask at once."""
    path = write_rows(tmp_path / "d.csv", ["text", "label"], tiny_dataset(n_per_class=2000))
    results = []

    def work() -> None:
        results.append(prepare(str(path), Columns(), tmp_path / "cache", progress=False))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.stats.cached for r in results) == [False, True, True]
    assert len({r.directory for r in results}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_a_bad_row_names_file_row_and_column_and_leaves_no_cache(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"], "label": ["a", "b", "a"]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: column 'text' is null"):
        prepare(str(path), Columns(), tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("text,label\n" + "a,x\n" * 5 + "b,y\n" * 5 + ",x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv: row 11 \(line 12\): column 'text' is empty"):
        prepare(str(csv_path), Columns(), tmp_path / "cache", progress=False)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"body": ["a"], "label": ["x"]},
            r"column 'text' not found; the file has \['body', 'label'\] \(choose with --text-column\)",
        ),
        ({"text": ["a", "  "], "label": ["x", "y"]}, r"row 2: column 'text' is empty"),
        ({"text": ["a", "b"], "label": ["x", None]}, r"row 2: column 'label' is null"),
        ({"text": [["a"], ["b"]], "label": ["x", "y"]}, r"row 1: column 'text' must be a string, got list"),
    ],
)
def test_parquet_errors(tmp_path: Path, table: dict[str, list[object]], message: str) -> None:
    pq.write_table(pa.table(table), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=message):
        load_data(str(tmp_path / "d.parquet"), for_training=False)


def test_directory_and_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no \.parquet, \.csv or \.jsonl files"):
        prepare(str(empty), Columns(), tmp_path / "cache", progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_rows(mixed / "a.csv", ["text", "label"], [("a", "x")])
    (mixed / "b.jsonl").write_text(json.dumps({"text": "b", "label": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mixes formats \['csv', 'jsonl'\]"):
        prepare(str(mixed), Columns(), tmp_path / "cache", progress=False)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_data(str(tmp_path / "broken.parquet"))


def test_undecodable_bytes_far_into_a_large_file_are_located_exactly(tmp_path: Path) -> None:
    """The streaming UTF-8 check finds line, column and byte offset past the first megabyte block."""
    head = "text,label\n" + "".join(f"row {i} is fine é,{'ab'[i % 2]}\n" for i in range(60000))
    raw = head.encode("utf-8")
    assert len(raw) > 1 << 20
    path = tmp_path / "big.csv"
    path.write_bytes(raw + b"bad \xa3 pound,a\n")
    with pytest.raises(DataError, match=rf"big\.csv: line 60002, column 5 \(byte offset {len(raw) + 4}\): bytes a3"):
        prepare(str(path), Columns(), tmp_path / "cache", progress=False)
