"""The model I/O contract, written once: tokenizer from a bundle, token sequences, padded feeds, the head.

Training (parity, evaluation), the service (runtime, batcher, protocols) and the benchmarks all build their
ONNX feeds and read their scores through this module, so they cannot disagree about padding ids, segment ids,
pair encoding or how logits become scores. It imports neither torch nor onnxruntime: the batcher and the API
processes use it without loading a session.

- :class:`TokenSeq`: one input's token ids and where its second segment starts (pairs), unpadded.
- :func:`load_tokenizer` / :class:`Encoder`: the bundle's fast tokenizer, truncating at max_length, never padding.
- :func:`pad_feeds`: right-pad a batch of TokenSeq to its longest row with the tokenizer's pad id.
- :class:`Head`: how the model's logits become scores (softmax or sigmoid, calibrated by a temperature) and
  predicted labels (argmax, or every label over its threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

FEED_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
ProblemType = Literal["single_label", "multi_label"]


class TooLong(ValueError):
    """An input has more tokens than the model takes and the caller asked not to truncate."""

    def __init__(self, index: int, max_length: int) -> None:
        super().__init__(
            f"input {index} has more than {max_length} tokens (the model's max_length); send truncate=true to cut it"
        )
        self.index = index
        self.max_length = max_length


@dataclass(frozen=True, slots=True)
class TokenSeq:
    """One input, unpadded: ``ids`` (int64) and the index where segment 1 starts (``len(ids)`` for one text).

    BERT's token_type_ids are 0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``, so one integer carries them; that
    keeps a sequence one array plus an int on its way through the queue and across processes.
    """

    ids: np.ndarray
    segment: int

    def __len__(self) -> int:
        return len(self.ids)


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's own pad id ([PAD] or <pad>), 0 when it names none."""
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def configure_tokenizer(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """Set ``tokenizer`` (in place) to truncate at ``max_length``, longest segment first, and never to pad.

    longest_first trims the longer text of a pair token by token, so a long premise cannot push a short
    hypothesis out entirely (only_first/only_second fail outright on pairs where that side is too short).
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    return tokenizer


def load_tokenizer(path: Path | str, max_length: int) -> Tokenizer:
    """A fast tokenizer from ``tokenizer.json``, set to truncate at ``max_length`` (longest first) and not to pad."""
    return configure_tokenizer(Tokenizer.from_file(str(path)), max_length)


def _to_seq(encoding: Encoding, pair: bool) -> TokenSeq:
    ids = np.asarray(encoding.ids, dtype=np.int64)
    if not pair:  # a single text has no segment 1: skip scanning the type ids (this runs once per input)
        return TokenSeq(ids, len(ids))
    type_ids = encoding.type_ids
    # index of the first segment-1 token; len(ids) when there is none
    segment = type_ids.index(1) if 1 in type_ids else len(ids)
    return TokenSeq(ids, segment)


class Encoder:
    """The bundle's tokenizer: texts (or text pairs) -> TokenSeq, exactly as training and serving both do it."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_token_id(tokenizer)

    @classmethod
    def from_file(cls, path: Path | str, max_length: int) -> Encoder:
        return cls(load_tokenizer(path, max_length), max_length)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = True) -> list[TokenSeq]:
        """Token sequences for ``texts`` (with ``pairs[i]`` as the second segment of text i when given).

        ``encode_batch_fast`` gives the same ids, type ids and overflow as ``encode_batch`` without computing
        character offsets, which nothing here reads (and which cost time per text).

        Raises TooLong for the first input that had to be cut when ``truncate`` is false.
        """
        encodings: list[Encoding]
        if len(texts) == 1:  # encode_batch hands even one text to rayon's thread pool: a cross-thread hop
            encodings = [self.tokenizer.encode(texts[0], pairs[0] if pairs is not None else None)]
        else:
            batch: list[str] | list[tuple[str, str]]
            batch = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
            encodings = self.tokenizer.encode_batch_fast(batch)
        if not truncate:
            for i, enc in enumerate(encodings):
                if enc.overflowing:
                    raise TooLong(i, self.max_length)
        pair = pairs is not None
        return [_to_seq(enc, pair) for enc in encodings]

    def encode_all(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[list[TokenSeq], list[bool]]:
        """Token sequences for many inputs in one tokenizer call, and which of them were cut at max_length.

        For callers that batch several requests' inputs together and decide per request what a cut means.
        """
        batch: list[str] | list[tuple[str, str]]
        batch = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encodings = self.tokenizer.encode_batch_fast(batch)
        pair = pairs is not None
        return [_to_seq(enc, pair) for enc in encodings], [bool(enc.overflowing) for enc in encodings]


def pad_feeds(
    sequences: Sequence[TokenSeq], pad_id: int = 0, names: Sequence[str] = FEED_NAMES
) -> dict[str, np.ndarray]:
    """Right-pad to the longest row: int64 input_ids (pad_id), attention_mask (1 = real), token_type_ids.

    ``names`` selects the feeds the graph takes (a graph without token_type_ids gets none).
    """
    rows = len(sequences)
    longest = max(len(s) for s in sequences)
    input_ids = np.full((rows, longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((rows, longest), dtype=np.int64)
    token_type_ids = np.zeros((rows, longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        n = len(seq.ids)
        input_ids[row, :n] = seq.ids
        attention_mask[row, :n] = 1
        if seq.segment < n:
            token_type_ids[row, seq.segment : n] = 1
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    return {name: feeds[name] for name in names}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


def sigmoid(logits: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
    return result


@dataclass(frozen=True, slots=True)
class Head:
    """How logits become scores and predictions for one model.

    single_label: scores = softmax(logits / temperature), predicted = [argmax].
    multi_label: scores = sigmoid(logits / temperature), predicted = every label whose score >= its threshold
    (possibly none). A temperature of 1.0 is uncalibrated.
    """

    labels: tuple[str, ...]
    problem_type: ProblemType = "single_label"
    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.problem_type == "multi_label" and (self.thresholds is None or len(self.thresholds) != len(self.labels)):
            raise ValueError("a multi-label head needs one threshold per label")

    @property
    def multi_label(self) -> bool:
        return self.problem_type == "multi_label"

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, float32, same shape as ``logits`` ([n, labels])."""
        scaled = logits.astype(np.float32, copy=False)
        if self.temperature != 1.0:
            scaled = scaled / np.float32(self.temperature)
        return (sigmoid(scaled) if self.multi_label else softmax(scaled)).astype(np.float32, copy=False)

    def predict(self, scores: np.ndarray) -> list[list[int]]:
        """Predicted label indices per row of ``scores``: [argmax], or those at or over their threshold."""
        if not self.multi_label:
            return [[int(i)] for i in scores.argmax(axis=-1)]
        passed = scores >= np.asarray(self.thresholds, dtype=np.float32)  # __post_init__: one per label
        return [[int(i) for i in np.flatnonzero(row)] for row in passed]
