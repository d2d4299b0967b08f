"""The benchmark workload: deterministic, realistic lengths (5-200 tokens, skewed), every article readable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench import workload


@pytest.fixture(scope="module")
def articles() -> list[workload.Article]:
    return workload.load_articles()


def test_same_seed_same_texts_other_seed_other_texts(articles: list[workload.Article]) -> None:
    first = workload.make_texts(400, seed=3, articles=articles)
    assert first == workload.make_texts(400, seed=3, articles=articles)
    assert first != workload.make_texts(400, seed=4, articles=articles)
    assert len(first) == 400
    assert len(set(first)) > 380  # distinct (article, kind) pairs; a few headline fallbacks may repeat


def test_token_lengths_in_range_and_skewed(articles: list[workload.Article]) -> None:
    texts = workload.make_texts(1000, seed=0, articles=articles)
    lengths = workload.token_lengths(texts, workload.default_tokenizer_path())
    summary = workload.length_summary(lengths)
    assert summary["min"] >= 5 and summary["max"] <= 200
    assert summary["mean"] > summary["p50"]  # long right tail
    assert summary["p10"] < 16 and summary["p90"] > 100
    assert summary["n"] == 1000


def test_corpus_is_complete_and_the_bad_utf8_file_is_decoded(articles: list[workload.Article]) -> None:
    assert len(articles) > 2000
    assert {a.topic for a in articles} == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(a.headline and a.paragraphs for a in articles)
    assert any("\ufffd" in a.headline + " ".join(a.paragraphs) for a in articles)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    texts = ["ünïcode “quotes”", "plain"]
    workload.save_texts(tmp_path / "t.json", texts)
    assert workload.load_texts(tmp_path / "t.json") == texts
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError):
        workload.load_texts(tmp_path / "bad.json")


def test_bodies_carry_one_text_or_the_next_n() -> None:
    texts = ["a", "b", "c"]
    assert workload.workload_bodies(texts, 1) == [{"inputs": "a"}, {"inputs": "b"}, {"inputs": "c"}]
    assert workload.workload_bodies(texts, 2)[2] == {"inputs": ["c", "a"]}
