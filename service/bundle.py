"""The model-bundle format: one directory that fully describes a servable classifier.

Training writes bundles through :func:`write_manifest`; the service reads them through :func:`load_bundle`.
Keeping both sides in one module means the format cannot drift between the writer and the reader.

A bundle directory holds::

    manifest.json        this schema (Manifest), including a sha256 of every other file
    model.onnx           fp32 graph exported from PyTorch           (variant "fp32", always present)
    model.opt.onnx       ONNX Runtime transformer-optimized graph   (variant "opt", optional)
    model.int8.onnx      dynamically int8-quantized graph           (variant "int8", optional)
    model.fp16.onnx      float16 graph, fp32 inputs and outputs     (variant "fp16", optional)
    tokenizer.json       the fast (Rust) tokenizer, plus its config files
    config.json          Hugging Face config (id2label, problem_type) for Optimum/transformers; never read here

The task is in the manifest: ``problem_type`` (single_label: softmax + argmax; multi_label: sigmoid + a threshold
per label), ``text_pair`` (the model reads ``[CLS] a [SEP] b [SEP]``), the calibration temperature, and the
reference distributions of the test split that drift monitoring compares live traffic with. ``training_run``
records how the model was trained (processes, device, precision, global batch, tracker run ids). Every one of these
fields is optional with the old behaviour as default, so bundles written before them load unchanged;
:meth:`Manifest.head` turns them into the :class:`service.modelio.Head` that both sides score with.

A manifest names files and packages, never absolute paths of the training machine: the service shows the
manifest to clients. Older manifests that recorded such paths are reduced to the file name when read.

Nothing in a bundle is ever unpickled or executed: the manifest is JSON, the models are ONNX protobufs and the
tokenizer is JSON. A bundle whose files do not match their recorded checksums is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.modelio import Head

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "opt": "model.opt.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES: tuple[str, ...] = ("logits",)


class BundleError(Exception):
    """A bundle is missing, malformed or tampered with; the message names the offending file."""


class Parity(BaseModel):
    """How closely an ONNX variant reproduces the PyTorch logits on held-out texts."""

    model_config = ConfigDict(extra="forbid")

    max_abs_diff: float = Field(description="max |logit difference| vs PyTorch over all checked texts")
    argmax_agreement: float = Field(description="fraction of texts whose predicted class is identical")
    n_texts: int
    batch_sizes: list[int]
    reference: str = Field(default="pytorch", description="what the variant was compared against")
    max_score_diff: float | None = Field(
        default=None, description="max |score difference| (softmax or sigmoid, temperature 1) vs the reference"
    )
    tolerance: float | None = Field(default=None, description="the max_abs_diff this variant had to stay within")


class Variant(BaseModel):
    """One ONNX graph of the model and what was measured about it."""

    model_config = ConfigDict(extra="forbid")

    file: str
    metrics: dict[str, float] = Field(default_factory=dict, description="test-split metrics of this graph")
    parity: Parity | None = None


class Calibration(BaseModel):
    """Temperature scaling fitted on the validation split; ECE of the top score on ``split`` before and after."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(gt=0, description="scores = softmax|sigmoid(logits / temperature)")
    ece_before: float = Field(ge=0, le=1)
    ece_after: float = Field(ge=0, le=1)
    bins: int = 15
    split: str = "test"
    method: str = Field(description="how the temperature was fitted, e.g. 'temperature (softmax NLL on val)'")


class Reference(BaseModel):
    """What the bundle predicted on its test split: the baseline drift monitoring compares live traffic with.

    ``labels``: fraction of predictions per label (every label present, summing to 1; multi-label: the share of
    each label among all predicted labels). ``confidence``: fraction of top (calibrated) scores per bin, the bins
    bounded by ``confidence_edges`` over [0, 1].
    """

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, description="test-split inputs the distributions were measured on")
    labels: dict[str, float]
    confidence_edges: list[float] = Field(min_length=2)
    confidence: list[float]

    @model_validator(mode="after")
    def _consistent(self) -> Reference:
        if len(self.confidence) != len(self.confidence_edges) - 1:
            raise ValueError("confidence needs one fraction per bin (len(confidence_edges) - 1)")
        if any(b <= a for a, b in zip(self.confidence_edges, self.confidence_edges[1:], strict=False)):
            raise ValueError("confidence_edges must increase")
        return self


class TrainingRun(BaseModel):
    """Where and at what scale the model was trained, and where the run is tracked (optional: older bundles
    have none)."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(default=1, ge=1, description="training processes (torchrun ranks)")
    nodes: int = Field(default=1, ge=1, description="machines the processes ran on")
    device_type: str = Field(default="cpu", description="cpu or cuda")
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="training precision")
    global_batch: int = Field(ge=1, description="rows per optimizer step, over all processes and accumulation")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step on each process")
    resumed_from_step: int | None = Field(default=None, description="the checkpoint step a resumed run started at")
    tracking: dict[str, str] = Field(
        default_factory=dict, description="tracker -> run id (mlflow: the run id; tensorboard: the run directory)"
    )


_ABSOLUTE = re.compile(r"(?<![\w.])(?:/|[A-Za-z]:[\\/])[^\s'\"]*")


def strip_paths(text: str) -> str:
    """``text`` with every absolute path reduced to its last component (``/home/me/data.csv`` -> ``data.csv``)."""
    return _ABSOLUTE.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1] or m.group(0), text)


def _strip_paths_in(value: Any) -> Any:
    if isinstance(value, str):
        return strip_paths(value)
    if isinstance(value, dict):
        return {k: _strip_paths_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths_in(v) for v in value]
    return value


class Manifest(BaseModel):
    """manifest.json: everything the service needs to serve the bundle, and its provenance."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    task: Literal["text-classification"] = "text-classification"
    labels: list[str] = Field(min_length=2, description="class names in logit index order")
    max_length: int = Field(ge=8, le=8192, description="max tokens per text, [CLS] and [SEP] included")
    inputs: list[str] = Field(default_factory=lambda: list(INPUT_NAMES))
    outputs: list[str] = Field(default_factory=lambda: list(OUTPUT_NAMES))
    opset: int
    base_model: str
    dataset: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict, description="hyper-parameters and timings")
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    variants: dict[str, Variant]
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256 hex digest")
    problem_type: Literal["single_label", "multi_label"] = "single_label"
    text_pair: bool = Field(default=False, description="the model reads a pair of texts, [CLS] a [SEP] b [SEP]")
    thresholds: list[float] | None = Field(
        default=None, description="multi-label: decision threshold on the calibrated score, per label in logit order"
    )
    calibration: Calibration | None = None
    reference: Reference | None = None
    training_run: TrainingRun | None = None

    @field_validator("base_model")
    @classmethod
    def _no_absolute_base_model(cls, value: str) -> str:
        return strip_paths(value)

    @field_validator("dataset", "training")
    @classmethod
    def _no_absolute_paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _strip_paths_in(value)  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _task_fields_agree(self) -> Manifest:
        if self.problem_type == "multi_label":
            if self.thresholds is None:
                raise ValueError("a multi_label manifest needs thresholds (one per label)")
        elif self.thresholds is not None:
            raise ValueError("thresholds are only for problem_type multi_label")
        if self.thresholds is not None and len(self.thresholds) != len(self.labels):
            raise ValueError(f"thresholds: {len(self.thresholds)} values for {len(self.labels)} labels")
        if self.reference is not None and set(self.reference.labels) != set(self.labels):
            raise ValueError("reference.labels must have one entry per label")
        return self

    def head(self) -> Head:
        """How this model's logits become scores and predicted labels (see :class:`service.modelio.Head`)."""
        return Head(
            labels=tuple(self.labels),
            problem_type=self.problem_type,
            temperature=self.calibration.temperature if self.calibration else 1.0,
            thresholds=tuple(self.thresholds) if self.thresholds is not None else None,
        )


class Bundle(BaseModel):
    """A loaded, verified bundle: its directory and manifest."""

    path: Path
    manifest: Manifest

    def model_path(self, variant: str) -> Path:
        if variant not in self.manifest.variants:
            raise BundleError(f"{self.path}: variant {variant!r} not in bundle (has {sorted(self.manifest.variants)})")
        return self.path / self.manifest.variants[variant].file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_NAME


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundle_files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Record a checksum of every file now in ``directory`` and write manifest.json atomically."""
    directory = Path(directory)
    for variant, info in manifest.variants.items():
        if not (directory / info.file).is_file():
            raise BundleError(f"{directory / info.file}: model file of variant {variant!r} does not exist")
    if not (directory / TOKENIZER_NAME).is_file():
        raise BundleError(f"{directory / TOKENIZER_NAME}: tokenizer file does not exist")
    files = {name: sha256_file(directory / name) for name in _bundle_files(directory)}
    manifest = manifest.model_copy(update={"files": files})
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate manifest.json without checking file contents."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise BundleError(f"{directory}: model bundle directory does not exist")
    if not path.is_file():
        raise BundleError(f"{path}: manifest not found; is this a bundle written by `python -m training`?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.format_version}, this build reads {FORMAT_VERSION}")
    return manifest


def load_bundle(directory: Path | str, verify: bool = True) -> Bundle:
    """Read a bundle; with ``verify`` every file listed in the manifest must exist and match its sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    required = {TOKENIZER_NAME} | {v.file for v in manifest.variants.values()}
    for name in sorted(required - set(manifest.files)):
        raise BundleError(f"{directory / name}: required file has no checksum in the manifest")
    if verify:
        for name, expected in manifest.files.items():
            path = directory / name
            if not path.is_file():
                raise BundleError(f"{path}: file listed in the manifest is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path}: checksum mismatch (manifest {expected[:12]}..., file {actual[:12]}...); "
                    "the file was altered or corrupted"
                )
    return Bundle(path=directory.resolve(), manifest=manifest)
