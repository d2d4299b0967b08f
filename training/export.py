"""ONNX export, the parity check against PyTorch, graph optimization, int8 quantization and fp16 conversion.

The service runs ONNX, not PyTorch, so every graph that goes into a bundle is compared with the PyTorch model on
the same padded batches before it is accepted. The parity texts deliberately have mixed lengths (about half are
cut to a few words) so that batches of 8 and 32 contain real padding: a graph that mishandles the attention mask,
or a mask that the tracer froze into a constant, shows up as a logit difference instead of passing unnoticed.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.bundle import INPUT_NAMES, OUTPUT_NAMES, Parity
from service.modelio import sigmoid, softmax
from training.encoding import TokenRows, length_sorted_batches
from training.errors import ParityError

OPSET = 17
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)
PARITY_MIN_TEXTS = 64
FP32_TOLERANCE = 1e-4
# float16 keeps 11 significant bits (relative step 2^-11 ~ 5e-4); through 6 layers of matmuls with fp32
# accumulation a MiniLM's logits (|z| up to ~10) move by a few 1e-3. 5e-2 leaves room for larger logits and
# still catches a broken conversion (a masked position leaking, an overflow), which moves them by whole units.
FP16_TOLERANCE = 5e-2
FP16_MIN_AGREEMENT = 0.999
# Kept in fp32 by the converter: the reductions and exponentials where half precision loses or overflows
# (layer-norm mean/variance, the attention softmax, GELU's erf); the matmuls and adds, most of the work, go fp16.
FP16_KEEP_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax", "Erf")


class _LogitsOnly(nn.Module):
    """Positional (input_ids, attention_mask, token_type_ids) -> logits, the bundle's ONNX signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def export_onnx(model: nn.Module, sample: dict[str, np.ndarray], path: Path, opset: int = OPSET) -> None:
    """TorchScript-based export (dynamo=False) with dynamic batch and sequence axes, on CPU in fp32.

    ``sample`` should contain padding, so that no mask-dependent branch is traced as "no padding".
    """
    model = model.to("cpu").float().eval()
    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on tensor shapes inside transformers' mask code; those branches
        # are shape-only (mask length == sequence length), and the parity check below is the real test.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        torch.onnx.export(
            _LogitsOnly(model),
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _decisions(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """What a graph decides per row: the argmax, or (multi-label) the labels over 0 in logit (0.5 in score)."""
    return logits >= 0 if multi_label else logits.argmax(axis=1)


def _scores(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    return sigmoid(logits) if multi_label else softmax(logits)


def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU provider with full graph optimizations (what evaluate measures).

    With an explicit thread count, spin-waiting is turned off: on a CPU shared with other work, spinning
    threads steal the cores they are waiting for.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, encoded: TokenRows, batch_size: int = 32) -> np.ndarray:
    """Logits for every row of ``encoded`` in original order, in length-sorted batches."""
    n_labels = session.get_outputs()[0].shape[-1]
    names = [i.name for i in session.get_inputs()]
    out: np.ndarray | None = None
    for indices in length_sorted_batches(encoded, batch_size):
        (logits,) = session.run(list(OUTPUT_NAMES), encoded.batch(indices, names))
        if out is None:
            out = np.zeros((len(encoded), n_labels if isinstance(n_labels, int) else logits.shape[1]), np.float32)
        out[indices] = logits
    return out if out is not None else np.zeros((0, 0), np.float32)


def parity_texts(held_out: Sequence[str], fill: Sequence[str], n: int = PARITY_MIN_TEXTS) -> list[str]:
    """``n`` texts for the parity check: held-out texts first (then training texts if too few).

    Every second text is cut to its first 3..42 words, so any batch mixes short and long rows.
    """
    pool = [t for t in (*held_out, *fill) if t.strip()]
    if not pool:
        raise ParityError("parity check: no texts to compare on")
    texts = []
    for i in range(n):
        text = pool[i % len(pool)]
        if i % 2 == 1 or i >= len(pool):
            words = text.split()
            text = " ".join(words[: 3 + (i * 7) % 40])
        texts.append(text)
    return texts


@dataclass(frozen=True)
class ParityResult:
    parity: Parity
    padded_fraction: float  # share of token positions in the checked batches that were padding
    seconds: float
    flip_margins: tuple[float, ...] = ()  # rows whose decision changed: how close PyTorch itself was to a tie


def _margin(reference: np.ndarray, multi_label: bool) -> np.ndarray:
    """Per row, how far the reference logits are from changing the decision (top-2 gap, or nearest |logit|)."""
    if multi_label:
        return np.abs(reference).min(axis=1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    encoded: TokenRows,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    torch_cache: dict[tuple[int, int], np.ndarray] | None = None,
    threads: int | None = None,
    multi_label: bool = False,
) -> ParityResult:
    """Compare ONNX and PyTorch logits batch by batch, in arrival order (not length-sorted: real padding).

    ``torch_cache`` (keyed by batch size and start) lets several variants share one set of PyTorch runs. The
    scores (softmax, or sigmoid for ``multi_label``) are compared too; ``argmax_agreement`` is the share of rows
    with the same decision: the same argmax, or (multi-label) the same set of labels at 0.5.
    """
    started = time.perf_counter()
    model = model.to("cpu").float().eval()
    session = cpu_session(onnx_path, threads)
    max_diff = score_diff = 0.0
    agree = total = 0
    flip_margins: list[float] = []
    pad = positions = 0
    for bs in batch_sizes:
        for start in range(0, len(encoded), bs):
            indices = list(range(start, min(start + bs, len(encoded))))
            batch = encoded.batch(indices)
            key = (bs, start)
            if torch_cache is not None and key in torch_cache:
                reference = torch_cache[key]
            else:
                with torch.no_grad():
                    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
                    reference = model(**tensors).logits.numpy()
                if torch_cache is not None:
                    torch_cache[key] = reference
            (logits,) = session.run(list(OUTPUT_NAMES), batch)
            max_diff = max(max_diff, float(np.abs(logits - reference).max()))
            score_diff = max(
                score_diff, float(np.abs(_scores(logits, multi_label) - _scores(reference, multi_label)).max())
            )
            same = _decisions(logits, multi_label) == _decisions(reference, multi_label)
            row_same = same.all(axis=1) if multi_label else same
            agree += int(row_same.sum())
            flip_margins += [float(m) for m in _margin(reference, multi_label)[~row_same]]
            total += len(indices)
            pad += int((batch["attention_mask"] == 0).sum())
            positions += batch["attention_mask"].size
    parity = Parity(
        max_abs_diff=max_diff,
        argmax_agreement=agree / max(1, total),
        n_texts=len(encoded),
        batch_sizes=list(batch_sizes),
        reference="pytorch",
        max_score_diff=score_diff,
    )
    return ParityResult(
        parity=parity,
        padded_fraction=pad / max(1, positions),
        seconds=time.perf_counter() - started,
        flip_margins=tuple(flip_margins),
    )


def enforce_parity(variant: str, result: ParityResult, tolerance: float, min_agreement: float = 1.0) -> None:
    """Fail loudly unless max |diff| <= tolerance and at least ``min_agreement`` of the decisions match.

    Within the tolerance, a decision can only change where PyTorch itself was within 2 x tolerance of a tie;
    the message then says so (the flipped rows' margins), since that is a near-tie, not a broken graph.
    """
    p = result.parity
    if not (p.max_abs_diff <= tolerance and p.argmax_agreement >= min_agreement):
        ties = ""
        if result.flip_margins and p.max_abs_diff <= tolerance:
            margins = ", ".join(f"{m:.2g}" for m in sorted(result.flip_margins)[:5])
            ties = (
                f" (the {len(result.flip_margins)} changed decision(s) were near-ties in PyTorch too: logit "
                f"margins {margins})"
            )
        raise ParityError(
            f"parity check failed for variant {variant!r}: max |logit diff| {p.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}), argmax agreement {p.argmax_agreement:.4f} (at least "
            f"{min_agreement:g}) over {p.n_texts} texts at batch sizes {p.batch_sizes}{ties}; "
            "the graph does not reproduce the PyTorch model and was not bundled"
        )


def optimize_graph(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (model_type bert): fuses Attention, LayerNorm, GELU, embeddings.

    Returns the fused-operator counts so the manifest shows whether fusion actually happened.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, use_gpu=False)
    optimized.save_model_to_file(str(dst))
    stats = optimized.get_fused_operator_statistics()
    return {name: int(count) for name, count in sorted(stats.items()) if count}


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8: per-channel signed int8 weights (QInt8), activations quantized at run time.

    Per-channel signed int8 measured fastest on AVX2 CPUs with about half the logit error of per-tensor
    (see FACTS.md). ``DefaultTensorType`` keeps shape inference working on optimizer-fused graphs too.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" hint at WARNING, always
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    return {"method": "quantize_dynamic", "weight_type": "QInt8", "per_channel": True, "source": src.name}


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """ONNX Runtime's float16 conversion: fp16 weights and compute, fp32 inputs and outputs.

    ``keep_io_types`` leaves the graph's inputs and ``logits`` output in their original types (int64, float32),
    so the service feeds and reads it exactly like the fp32 graph; the ops in FP16_KEEP_FP32_OPS (and the
    converter's own block list) stay fp32 behind Cast nodes.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    block = sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values clipped to fp16 range" for the attention mask's -inf stand-in
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    onnx.save(converted, str(dst))
    return {
        "method": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "kept_fp32_ops": list(FP16_KEEP_FP32_OPS),
        "source": src.name,
    }
