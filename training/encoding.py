"""Training's side of the model I/O contract: a base checkpoint's tokenizer, encoded splits, the bundle's files.

Tokenizing, pair encoding and padding are :mod:`service.modelio`'s (:class:`~service.modelio.Encoder`,
:func:`~service.modelio.pad_feeds`), the same code the service runs, so the model is trained, parity-checked
and scored on exactly the feeds it will be served. What is left here is what only training needs: getting a
fast tokenizer out of a Hugging Face checkpoint that may lack tokenizer.json, holding a split's token
sequences for batching, and writing the tokenizer files into a bundle.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from service.modelio import FEED_NAMES, Encoder, TokenSeq, configure_tokenizer, pad_feeds
from training.errors import TrainingError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class TokenRows(Protocol):
    """Rows of token sequences that can be batched: :class:`Encoded` in memory, or a memory-mapped split
    (:class:`training.tokens.TokenView`)."""

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray: ...

    def batch(self, indices: Sequence[int], names: Sequence[str] = FEED_NAMES) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Encoded:
    """One split's token sequences (unpadded) and the pad id; :meth:`batch` pads exactly as the service does."""

    seqs: list[TokenSeq]
    pad_id: int

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.seqs), dtype=np.int64, count=len(self.seqs))

    def batch(self, indices: Sequence[int], names: Sequence[str] = FEED_NAMES) -> dict[str, np.ndarray]:
        """The padded feeds of the rows at ``indices``: :func:`service.modelio.pad_feeds`, nothing else."""
        return pad_feeds([self.seqs[i] for i in indices], self.pad_id, names)


def checkpoint_encoder(model_dir: Path, max_length: int) -> Encoder:
    """The fast tokenizer of a local checkpoint as an :class:`Encoder` (truncate at ``max_length``, no padding).

    Checkpoints without tokenizer.json (only vocab.txt) are converted once through transformers, offline.
    """
    path = model_dir / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        try:
            from transformers import AutoTokenizer

            slow_or_fast = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
            tokenizer = slow_or_fast.backend_tokenizer
        except Exception as exc:  # any failure here means "no usable tokenizer"; say where we looked
            raise TrainingError(
                f"{model_dir}: no tokenizer.json and no loadable Hugging Face tokenizer ({exc})"
            ) from exc
    return Encoder(configure_tokenizer(tokenizer, max_length), max_length)


def encode(encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
    """Encode ``texts`` (with ``pairs[i]`` as the second segment of text i) through the service's Encoder."""
    return Encoded(encoder.encode(texts, pairs), encoder.pad_id)


def length_sorted_batches(encoded: TokenRows, batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first): inference pads little and fails early on OOM."""
    order = np.argsort(-encoded.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield [int(i) for i in order[start : start + batch_size]]


def save_tokenizer(encoder: Encoder, source_dir: Path, bundle_dir: Path) -> list[str]:
    """Write tokenizer.json (truncation at max_length, no padding) and copy the companion config files.

    The service sets truncation and padding itself (modelio.load_tokenizer), but a bundle whose tokenizer.json
    says what the model was trained with is less surprising to anyone loading it with other tools. Returns the
    file names written.
    """
    encoder.tokenizer.save(str(bundle_dir / "tokenizer.json"))
    written = ["tokenizer.json"]
    for name in TOKENIZER_FILES[1:]:
        src = source_dir / name
        if not src.is_file():
            continue
        if name == "tokenizer_config.json":
            try:
                config = json.loads(src.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                shutil.copyfile(src, bundle_dir / name)
            else:
                config["model_max_length"] = encoder.max_length
                (bundle_dir / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, bundle_dir / name)
        written.append(name)
    return written
