"""The model I/O contract (service.modelio) and the manifest fields that feed it (service.bundle).

Real MiniLM tokenizer, no model: these run in well under a second. The one test that matters most is
``test_training_and_service_build_identical_feeds``: training's parity and evaluation feeds and the service's
feeds come from the same code, for single texts and for pairs, so a model is served exactly what it was
trained and verified on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service.bundle import Manifest, strip_paths
from service.modelio import FEED_NAMES, Encoder, Head, TokenSeq, TooLong, load_tokenizer, pad_feeds
from training.data import load_data, stratified_split
from training.encoding import checkpoint_encoder, encode, save_tokenizer
from training.evaluate import encode_part
from training.export import parity_texts
from training.pipeline import default_base_model

BASE = default_base_model()


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_file(BASE / "tokenizer.json", 16)


def test_a_pair_is_cls_a_sep_b_sep_with_segment_ids_0_then_1(encoder: Encoder) -> None:
    (seq,) = encoder.encode(["good film"], ["bad hotel"])
    tokens = [encoder.tokenizer.id_to_token(int(i)) for i in seq.ids]
    assert tokens == ["[CLS]", "good", "film", "[SEP]", "bad", "hotel", "[SEP]"]
    assert seq.segment == 4
    feeds = pad_feeds([seq, *encoder.encode(["ok"])], encoder.pad_id)
    assert list(feeds) == list(FEED_NAMES)
    assert feeds["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]
    assert feeds["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert feeds["input_ids"][1, 3:].tolist() == [encoder.pad_id] * 4 and encoder.pad_id == 0
    assert all(v.dtype == np.int64 for v in feeds.values())
    assert list(pad_feeds([seq], 0, ["input_ids", "attention_mask"])) == ["input_ids", "attention_mask"]


def test_pairs_truncate_longest_first_so_the_short_side_survives(encoder: Encoder) -> None:
    (seq,) = encoder.encode(["word " * 40], ["short answer"])
    assert len(seq) == 16
    tokens = [encoder.tokenizer.id_to_token(int(i)) for i in seq.ids]
    assert tokens[-4:] == ["[SEP]", "short", "answer", "[SEP]"]
    with pytest.raises(TooLong, match="input 1 has more than 16 tokens"):
        encoder.encode(["fine", "word " * 40], truncate=False)


def test_head_calibrates_scores_without_changing_decisions() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]], dtype=np.float32)
    plain, hot = Head(("a", "b", "c")), Head(("a", "b", "c"), temperature=0.5)
    assert plain.predict(plain.scores(logits)) == hot.predict(hot.scores(logits)) == [[0], [1]]
    assert hot.scores(logits)[0, 0] > plain.scores(logits)[0, 0]
    multi = Head(("a", "b", "c"), "multi_label", 2.0, (0.6, 0.6, 0.55))
    scores = multi.scores(logits)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits / 2)), rtol=1e-6)
    # row 0: sigmoid([1, .25, -.5]) = [.73, .56, .38]; row 1: [.51, .54, .52]: nothing passes, no label
    assert multi.predict(scores) == [[0], []]
    with pytest.raises(ValueError, match="one threshold per label"):
        Head(("a", "b"), "multi_label", thresholds=(0.5,))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Head(("a", "b"), temperature=0.0)


# --- the manifest's task fields --------------------------------------------------------------------------------


def minimal_manifest(**extra: Any) -> dict[str, Any]:
    """A manifest as bundles wrote it before pairs, multi-label, calibration and drift references."""
    return {
        "format_version": 1,
        "name": "old",
        "version": "1",
        "labels": ["neg", "pos"],
        "max_length": 64,
        "opset": 17,
        "base_model": "/home/trainer/checkpoints/minilm",
        "dataset": {"source": "/home/trainer/data/reviews.csv", "path": "/home/trainer/data/reviews.csv", "seed": 1},
        "training": {"command": "python -m training fit --data /home/trainer/data/reviews.csv --output models/x"},
        "variants": {"fp32": {"file": "model.onnx"}},
        **extra,
    }


def test_an_old_manifest_loads_with_defaults_and_without_absolute_paths() -> None:
    m = Manifest.model_validate(minimal_manifest())
    assert (m.problem_type, m.text_pair, m.thresholds, m.calibration, m.reference) == (
        "single_label",
        False,
        None,
        None,
        None,
    )
    assert m.head() == Head(("neg", "pos"), "single_label", 1.0, None)
    assert m.base_model == "minilm" and m.dataset["path"] == "reviews.csv" and m.dataset["source"] == "reviews.csv"
    assert m.training["command"] == "python -m training fit --data reviews.csv --output models/x"
    assert "/home/" not in m.model_dump_json()
    hub_name = "sentence-transformers/all-MiniLM-L6-v2 (pkg 1.0)"
    assert strip_paths(hub_name) == hub_name


def test_the_new_fields_build_the_head_and_are_checked() -> None:
    m = Manifest.model_validate(
        minimal_manifest(
            problem_type="multi_label",
            text_pair=True,
            thresholds=[0.4, 0.6],
            calibration={"temperature": 0.8, "ece_before": 0.05, "ece_after": 0.01, "method": "temperature"},
            reference={
                "n": 10,
                "labels": {"neg": 0.3, "pos": 0.7},
                "confidence_edges": [0.0, 0.5, 1.0],
                "confidence": [0.2, 0.8],
            },
        )
    )
    assert m.head() == Head(("neg", "pos"), "multi_label", 0.8, (0.4, 0.6))
    assert m.calibration is not None and m.calibration.bins == 15 and m.calibration.split == "test"
    bad = [
        ({"problem_type": "multi_label"}, "needs thresholds"),
        ({"thresholds": [0.5, 0.5]}, "only for problem_type multi_label"),
        ({"problem_type": "multi_label", "thresholds": [0.5]}, "1 values for 2 labels"),
        ({"reference": {"n": 1, "labels": {"neg": 1.0}, "confidence_edges": [0, 1], "confidence": [1]}}, "one entry"),
        ({"reference": {"n": 1, "labels": {"neg": 0, "pos": 1}, "confidence_edges": [0, 1], "confidence": []}}, "bin"),
    ]
    for extra, message in bad:
        with pytest.raises(ValidationError, match=message):
            Manifest.model_validate(minimal_manifest(**extra))


# --- one contract: training's feeds are the service's feeds ---------------------------------------------------


def test_training_and_service_build_identical_feeds(tmp_path: Path) -> None:
    """Parity and evaluation (training) vs runtime (service), for single texts and pairs, same texts in.

    Training encodes with the base checkpoint's tokenizer and writes it into the bundle; the service loads the
    bundle's tokenizer.json with modelio.load_tokenizer and pads with pad_feeds. Every feed must match exactly.
    """
    max_length = 24
    trainer = checkpoint_encoder(BASE, max_length)
    save_tokenizer(trainer, BASE, tmp_path)
    served = Encoder(load_tokenizer(tmp_path / "tokenizer.json", max_length), max_length)

    rows = [
        (f"review {i}: " + "quite long words here " * (i % 5), f"reply {i}", ("yes", "no")[i % 2]) for i in range(30)
    ]
    path = tmp_path / "pairs.csv"
    path.write_text("a,b,label\n" + "".join(f'"{a}","{b}",{lab}\n' for a, b, lab in rows), encoding="utf-8")
    for pair_column in (None, "b"):
        data = load_data(str(path), "a", pair_column=pair_column)
        test = stratified_split(data, seed=0).test
        # evaluation: a split encoded by training, batched by its Encoded.batch
        evaluated = encode_part(trainer, test)
        indices = list(range(len(test)))
        service_feeds = pad_feeds(served.encode(test.texts, test.pairs), served.pad_id, FEED_NAMES)
        for name in FEED_NAMES:
            np.testing.assert_array_equal(evaluated.batch(indices)[name], service_feeds[name])
        # parity: mixed-length texts (and pairs), in batches of 8 as check_parity runs them
        texts = parity_texts(data.texts, [], 32)
        pairs = None if pair_column is None else [data.pairs[i % len(data)] for i in range(32)]  # type: ignore[index]
        checked = encode(trainer, texts, pairs)
        for start in range(0, 32, 8):
            batch = list(range(start, start + 8))
            service_batch = pad_feeds(
                served.encode(texts[start : start + 8], None if pairs is None else pairs[start : start + 8]),
                served.pad_id,
            )
            for name in FEED_NAMES:
                np.testing.assert_array_equal(checked.batch(batch)[name], service_batch[name])
        if pair_column is not None:
            assert service_feeds["token_type_ids"].any()  # pairs really produced segment 1
    assert isinstance(checked.seqs[0], TokenSeq)
