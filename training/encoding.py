"""Tokenization exactly as the service does it, and padding of token lists into int64 batches.

Training, the parity check and ``evaluate`` all tokenize with the fast (Rust) ``tokenizers.Tokenizer`` loaded
from ``tokenizer.json``, truncating at ``max_length`` and never padding inside the tokenizer; batches are padded
here to their own longest row. That is what the service does with the bundle's tokenizer.json, so the model is
trained and measured on the same token ids it will be served.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from training.errors import TrainingError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class Encoded:
    """Token ids per text (unpadded); ``type_ids`` are the BERT segment ids, all 0 for single texts."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Right-pad the rows at ``indices`` to their longest; int64 input_ids, attention_mask, token_type_ids."""
        longest = max(len(self.ids[i]) for i in indices)
        input_ids = np.full((len(indices), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(indices), longest), dtype=np.int64)
        token_type_ids = np.zeros((len(indices), longest), dtype=np.int64)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            input_ids[row, :n] = self.ids[i]
            attention_mask[row, :n] = 1
            token_type_ids[row, :n] = self.type_ids[i]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def load_tokenizer(model_dir: Path, max_length: int) -> Tokenizer:
    """The fast tokenizer of a local checkpoint, set to truncate at ``max_length`` and not to pad.

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
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def pad_token_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> Encoded:
    encodings = tokenizer.encode_batch(list(texts))
    return Encoded(
        ids=[np.asarray(e.ids, dtype=np.int64) for e in encodings],
        type_ids=[np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
        pad_id=pad_token_id(tokenizer),
    )


def length_sorted_batches(encoded: Encoded, batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first): inference pads little and fails early on OOM."""
    order = np.argsort(-encoded.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield [int(i) for i in order[start : start + batch_size]]


def save_tokenizer(tokenizer: Tokenizer, source_dir: Path, bundle_dir: Path, max_length: int) -> list[str]:
    """Write tokenizer.json (truncation at max_length, no padding) and copy the companion config files.

    The service overrides truncation/padding anyway, but a bundle whose tokenizer.json says what the model was
    trained with is less surprising to anyone loading it with other tools. Returns the file names written.
    """
    tokenizer.save(str(bundle_dir / "tokenizer.json"))
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
                config["model_max_length"] = max_length
                (bundle_dir / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, bundle_dir / name)
        written.append(name)
    return written
