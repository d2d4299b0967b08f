"""Data loading, validation errors, the stratified split and the metrics: fast, no model involved."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data import load_bbc, load_data, sort_labels, stratified_split
from training.errors import DataError
from training.metrics import classification_report


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def good_rows(n_per_class: int = 10, labels: tuple[str, ...] = ("pos", "neg", "meh")) -> list[tuple[str, str]]:
    return [(f"text number {i} about {label}", label) for label in labels for i in range(n_per_class)]


def csv_of(rows: list[tuple[str, str]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows)


# --- loading ------------------------------------------------------------------------------------------------


def test_csv_loads_with_sorted_label_map_and_row_provenance(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", csv_of(good_rows()))
    data = load_data(str(path))
    assert len(data) == 30
    assert data.label_names == ["meh", "neg", "pos"]
    assert data.label_ids[0] == 2 and data.labels[0] == "pos"
    assert data.source_of[0] == f"{path}: row 1 (line 2)"
    assert data.info["class_counts"] == {"meh": 10, "neg": 10, "pos": 10}


def test_jsonl_loads_custom_columns_and_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": f"t{i}", "y": y}) for y in (10, 2, 1) for i in range(3)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    data = load_data(str(path), text_column="body", label_column="y")
    assert data.label_names == ["1", "2", "10"]
    assert sort_labels({"b", "a", "10"}) == ["10", "a", "b"]


def test_csv_with_bom_and_quoted_multiline_text(tmp_path: Path) -> None:
    rows = good_rows(3)
    content = csv_of(rows).replace('"text number 0 about pos"', '"line one\nline two"')
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    data = load_data(str(path))
    assert data.texts[0] == "line one\nline two"
    assert data.source_of[1].endswith("row 2 (line 4)")  # row 1 spans lines 2-3


# --- every bad-data error names file, row/line and column ----------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_data(str(tmp_path / "nope.csv"))


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        load_data(str(tmp_path / "data.txt"))


def test_missing_column_csv_names_column_header_and_flag(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", csv_of(good_rows(), header="sentence,label"))
    with pytest.raises(DataError) as info:
        load_data(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "column 'text' not found" in message
    assert "['sentence', 'label']" in message and "--text-column" in message


def test_missing_label_column_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", csv_of(good_rows(), header="text,category"))
    with pytest.raises(DataError, match=r"column 'label' not found.*--label-column"):
        load_data(str(path))


def test_missing_column_jsonl_names_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl: row 2 \(line 3\): column 'label' missing"):
        load_data(str(path))


def test_short_csv_row_is_reported(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "text,label\nhello,pos\nlonely text\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): column 'label' is missing"):
        load_data(str(path))


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        load_data(str(empty))
    header_only = write_csv(tmp_path / "header.csv", "text,label\n")
    with pytest.raises(DataError, match=r"header\.csv: no data rows"):
        load_data(str(header_only))
    blank_jsonl = tmp_path / "blank.jsonl"
    blank_jsonl.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl: no data rows"):
        load_data(str(blank_jsonl))


def test_one_class_only(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", csv_of(good_rows(labels=("pos",))))
    with pytest.raises(DataError, match=r"only one class \('pos', 10 rows\) in column 'label'"):
        load_data(str(path))


def test_too_few_examples_of_a_class_names_the_rows(tmp_path: Path) -> None:
    rows = [*good_rows(5, ("pos", "neg")), ("rare one", "rare"), ("rare two", "rare")]
    path = write_csv(tmp_path / "d.csv", csv_of(rows))
    with pytest.raises(DataError, match=r"class 'rare' .* only 2 example\(s\) \(row 11 \(line 12\); row 12"):
        load_data(str(path))


def test_empty_text_names_row_line_and_column(tmp_path: Path) -> None:
    rows = good_rows()
    content = csv_of(rows).replace('"text number 2 about pos"', '"   "')
    path = write_csv(tmp_path / "d.csv", content)
    with pytest.raises(DataError, match=r"d\.csv: row 3 \(line 4\): column 'text' is empty"):
        load_data(str(path))


def test_empty_label_and_non_string_jsonl_value(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "text,label\nhello,\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): column 'label' is empty"):
        load_data(str(path))
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": ["a list"], "label": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 1\): column 'text' must be a string, got list"):
        load_data(str(jl))


def test_undecodable_bytes_name_line_column_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nfine,pos\nfee \xa315m,neg\n")
    with pytest.raises(DataError, match=r"d\.csv: line 3, column 5 \(byte offset 24\): bytes a3 are not valid UTF-8"):
        load_data(str(path))


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 \(line 2\): not valid JSON"):
        load_data(str(path))
    path.write_text('["text", "label"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 1\): expected a JSON object, got list"):
        load_data(str(path))


def test_evaluation_data_needs_no_second_class(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", csv_of(good_rows(2, ("pos",))))
    assert len(load_data(str(path), for_training=False)) == 2


# --- split --------------------------------------------------------------------------------------------------


def test_stratified_split_is_80_10_10_per_class_disjoint_and_seeded(tmp_path: Path) -> None:
    rows = good_rows(50, ("a", "b")) + good_rows(20, ("c",))
    data = load_data(str(write_csv(tmp_path / "d.csv", csv_of(rows))))
    splits = stratified_split(data, seed=7)
    counts = splits.counts()
    assert counts["train"] == {"a": 40, "b": 40, "c": 16}
    assert counts["val"] == {"a": 5, "b": 5, "c": 2}
    assert counts["test"] == {"a": 5, "b": 5, "c": 2}
    parts = [set(zip(p.texts, p.labels, strict=True)) for p in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == len(data)
    assert splits.train.label_names == data.label_names  # ids do not shift between splits
    again = stratified_split(data, seed=7)
    assert again.test.texts == splits.test.texts and again.test.fingerprint() == splits.test.fingerprint()
    other = stratified_split(data, seed=8)
    assert other.test.texts != splits.test.texts
    assert "total" in splits.format_counts() and "   96" in splits.format_counts()


def test_tiny_classes_still_reach_every_split(tmp_path: Path) -> None:
    data = load_data(str(write_csv(tmp_path / "d.csv", csv_of(good_rows(3)))))
    counts = stratified_split(data, seed=0).counts()
    assert all(n == 1 for split in ("val", "test") for n in counts[split].values())


def test_bbc_corpus_loads_offline_with_the_one_cp1252_file_recorded() -> None:
    data = load_bbc()
    assert len(data) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(data.labels)["sports"] == 511
    assert data.info["decoded_as_cp1252"] == ["sports/199.txt"]
    mutu = data.texts[data.source_of.index(next(s for s in data.source_of if s.endswith("sports/199.txt")))]
    assert "£15.8m" in mutu
    counts = stratified_split(data, seed=42).counts()
    assert sum(counts["test"].values()) == 223 and sum(counts["train"].values()) == 1779


# --- metrics ------------------------------------------------------------------------------------------------


def test_classification_report_matches_hand_computed_values() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    report = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report.accuracy == pytest.approx(4 / 6)
    # a: p=1, r=2/3 -> f1 0.8; b: p=1/2, r=1/2 -> 0.5; c: p=1/2, r=1 -> 2/3
    assert report.f1 == pytest.approx([0.8, 0.5, 2 / 3])
    assert report.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report.support == [3, 2, 1]
    text = report.format()
    assert "macro-F1 0.6556" in text and "confusion matrix" in text


def test_macro_f1_ignores_classes_absent_from_both_truth_and_predictions() -> None:
    report = classification_report(np.array([0, 1]), np.array([0, 1]), ["a", "b", "unused"])
    assert report.macro_f1 == 1.0 and report.f1[2] == 0.0


# --- sentence pairs -------------------------------------------------------------------------------------------


def pair_csv(rows: list[tuple[str, str, str]]) -> str:
    return "premise,hypothesis,label\n" + "".join(f'"{a}","{b}",{lab}\n' for a, b, lab in rows)


def test_pairs_load_from_csv_and_jsonl_and_split_together(tmp_path: Path) -> None:
    rows = [(f"first {i} {lab}", f"second {i} {lab}", lab) for lab in ("yes", "no") for i in range(10)]
    data = load_data(str(write_csv(tmp_path / "p.csv", pair_csv(rows))), "premise", pair_column="hypothesis")
    assert data.pairs is not None and data.pairs[0] == "second 0 yes" and data.texts[0] == "first 0 yes"
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"a": a, "b": b, "label": lab}) + "\n" for a, b, lab in rows), encoding="utf-8")
    from_jsonl = load_data(str(jl), "a", pair_column="b")
    assert from_jsonl.pairs == data.pairs
    split = stratified_split(data, seed=1)
    for part in (split.train, split.val, split.test):
        assert part.pairs is not None
        assert all(b == a.replace("first", "second") for a, b in zip(part.texts, part.pairs, strict=True))
    # the second text is part of the split's identity
    assert data.fingerprint() != load_data(str(write_csv(tmp_path / "s.csv", pair_csv(rows))), "premise").fingerprint()


def test_pair_errors_name_the_second_column(tmp_path: Path) -> None:
    rows = [(f"first {i}", f"second {i}", lab) for lab in ("yes", "no") for i in range(5)]
    path = write_csv(tmp_path / "p.csv", pair_csv(rows))
    with pytest.raises(DataError, match=r"column 'other' not found.*--text-pair-column"):
        load_data(str(path), "premise", pair_column="other")
    empty = write_csv(tmp_path / "e.csv", pair_csv(rows).replace('"second 3"', '"  "'))
    expected = r"row 4 \(line 5\): column 'hypothesis' is empty \(the second text of the pair\)"
    with pytest.raises(DataError, match=expected):
        load_data(str(empty), "premise", pair_column="hypothesis")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"a": "x", "label": "yes"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 1\): column 'b' missing.*--text-pair-column"):
        load_data(str(jl), "a", pair_column="b")
    with pytest.raises(DataError, match="no pairs, no multi-label"):
        load_data("bbc", pair_column="b")


# --- multi-label ----------------------------------------------------------------------------------------------


def multi_rows(n: int = 12) -> list[tuple[str, str]]:
    sets = ["food", "food;price", "service", "price;service", "food;service", "price"]
    return [(f"text {i}", sets[i % len(sets)]) for i in range(n)]


def test_multi_label_csv_and_jsonl_give_label_sets_and_a_target_matrix(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", csv_of(multi_rows()))
    data = load_data(str(path), multi_label=True)
    assert data.label_names == ["food", "price", "service"]
    assert data.label_sets is not None and data.label_sets[1] == ("food", "price")
    assert data.targets()[1].tolist() == [1.0, 1.0, 0.0] and data.targets().dtype == np.float32
    assert data.info["class_counts"] == {"food": 6, "price": 6, "service": 6}
    jl = tmp_path / "m.jsonl"
    jl.write_text(
        "".join(json.dumps({"text": t, "label": labels.split(";")}) + "\n" for t, labels in multi_rows()),
        encoding="utf-8",
    )
    assert load_data(str(jl), multi_label=True).label_sets == data.label_sets
    piped = write_csv(tmp_path / "p.csv", csv_of([(t, lab.replace(";", "|")) for t, lab in multi_rows()]))
    assert load_data(str(piped), multi_label=True, label_separator="|").label_sets == data.label_sets
    counts = stratified_split(data, seed=0).counts()
    assert all(n >= 1 for split in counts.values() for n in split.values())  # every label in every split


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("text,label\na,x;;y\n", {}, r"row 1 \(line 2\): column 'label': label 2 of 'x;;y' is empty"),
        ("text,label\na,x;\n", {}, r"label 2 of 'x;' is empty"),
        ("text,label\na,x\nb,y\n", {}, r"label separator ';' never occurs in column 'label'"),
        ("text,label\na,x;y\n", {"label_separator": ""}, r"--label-separator: must not be empty"),
    ],
)
def test_multi_label_csv_errors(tmp_path: Path, content: str, kwargs: dict[str, str], message: str) -> None:
    path = write_csv(tmp_path / "m.csv", content)
    with pytest.raises(DataError, match=message):
        load_data(str(path), multi_label=True, **kwargs)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ('"x;y"', r"must be a JSON list of labels with --multi-label, got str"),
        ("[]", r"is an empty list; every row needs at least one label"),
        ('["x", ""]', r"label 2 \(''\) is empty or not a string"),
        ('["x", null]', r"label 2 \(None\) is empty or not a string"),
    ],
)
def test_multi_label_jsonl_errors(tmp_path: Path, label: str, message: str) -> None:
    jl = tmp_path / "m.jsonl"
    jl.write_text(f'{{"text": "a", "label": {label}}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_data(str(jl), multi_label=True)


def test_a_list_of_labels_without_multi_label_says_so(tmp_path: Path) -> None:
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"text": "a", "label": ["x", "y"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"must be a string, got list \(several labels per row need --multi-label\)"):
        load_data(str(jl))


def test_a_rare_multi_label_names_its_rows(tmp_path: Path) -> None:
    rows = [*multi_rows(), ("odd one", "food;rare")]
    path = write_csv(tmp_path / "m.csv", csv_of(rows))
    expected = r"label 'rare' in column 'label' has only 1 example\(s\) \(row 13 \(line 14\)\)"
    with pytest.raises(DataError, match=expected):
        load_data(str(path), multi_label=True)


def test_the_manifest_gets_a_file_name_not_the_training_machines_path(tmp_path: Path) -> None:
    data = load_data(str(write_csv(tmp_path / "d.csv", csv_of(good_rows()))))
    assert data.info["path"] == "d.csv" and data.source == "d.csv"
    assert str(tmp_path) in data.source_of[0]  # error messages still point at the real file


def test_scoring_a_file_of_one_label_rows_needs_no_separator(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "text,label\na,x\nb,y\n")
    assert load_data(str(path), multi_label=True, for_training=False).label_sets == [("x",), ("y",)]
