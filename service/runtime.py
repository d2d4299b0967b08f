"""The model backend in three stages (after Infinity): pre (tokenize), core (run a padded batch), post (softmax).

The batcher only sees token-id arrays and probability rows; it never knows which model or provider it drives.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from service.bundle import Bundle

log = logging.getLogger("bertserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used (e.g. CUDA demanded on a machine without it)."""


class TextTooLong(ValueError):
    """An input has more tokens than the model takes and the client asked not to truncate."""

    def __init__(self, index: int, max_length: int) -> None:
        super().__init__(
            f"input {index} has more than {max_length} tokens (the model's max_length); "
            "send truncate=true to cut it"
        )


@dataclass(frozen=True, slots=True)
class Output:
    """One sequence's result: raw logits and softmax probabilities, both float32 rows."""

    logits: np.ndarray
    probs: np.ndarray


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads: without it, asking ORT for CUDA only logs an error."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_variant(requested: str, bundle: Bundle, on_cuda: bool) -> str:
    """auto prefers fp16, then the fused graph, on CUDA; on CPU the exported fp32 graph (the reference)."""
    available = bundle.manifest.variants
    if requested != "auto":
        if requested not in available:
            raise ProviderError(f"variant {requested!r} is not in the bundle (has {sorted(available)})")
        return requested
    order = ("fp16", "opt", "fp32") if on_cuda else ("fp32",)
    return next(v for v in order if v in available)


def session_options(threads: int, spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Shapes change with every batch, so pre-planned memory patterns never hit.
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class ModelRuntime:
    """An ONNX Runtime session plus the bundle's fast tokenizer; thread-safe for one runner at a time."""

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "auto",
        variant: str = "auto",
        threads: int = 1,
        spinning: bool = False,
        solo_threads: int = 0,
    ) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.name, self.version = manifest.name, manifest.version
        self.labels = list(manifest.labels)
        self.max_length = manifest.max_length
        self.tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

        want_cuda = provider == "cuda" or (
            provider == "auto" and CUDA in ort.get_available_providers() and cuda_driver_present()
        )
        if provider == "cuda" and CUDA not in ort.get_available_providers():
            raise ProviderError("BERTSERVE_PROVIDER=cuda but this onnxruntime build has no CUDA provider")
        self.variant = choose_variant(variant, bundle, want_cuda)
        providers = [CUDA, CPU] if want_cuda else [CPU]
        model_path = bundle.model_path(self.variant)
        self.session = ort.InferenceSession(
            str(model_path), sess_options=session_options(threads, spinning), providers=providers
        )
        # onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing: trust only get_providers().
        self.providers: list[str] = self.session.get_providers()
        self.on_cuda = CUDA in self.providers
        if want_cuda and not self.on_cuda:
            if provider == "cuda":
                raise ProviderError(
                    "BERTSERVE_PROVIDER=cuda but ONNX Runtime could not create the CUDA provider "
                    "(missing CUDA/cuDNN libraries or no GPU); it fell back to CPU"
                )
            log.warning("CUDA provider unavailable at session creation; serving on CPU")
        # A lone batch (nothing else computing or queued) gets every core through a second, wider session: one
        # intra-op pool cannot change its size, and the single-threaded sessions that keep two batches busy
        # under load leave half the CPU idle for a lone client. The cost is a second copy of the weights.
        self.solo_session: ort.InferenceSession | None = None
        if not self.on_cuda and solo_threads > threads:
            self.solo_session = ort.InferenceSession(
                str(model_path), sess_options=session_options(solo_threads, spinning), providers=[CPU]
            )
        self.threads = threads
        self.solo_threads = solo_threads if self.solo_session is not None else None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        log.info(
            "loaded %s:%s variant=%s file=%s providers=%s threads=%d solo_threads=%s",
            self.name, self.version, self.variant, model_path.name, self.providers, threads,
            self.solo_threads or "off",
        )  # fmt: skip

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def can_run_solo(self) -> bool:
        return self.solo_session is not None

    # -- pre -------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], truncate: bool) -> list[np.ndarray]:
        """Token ids per text ([CLS] ... [SEP], at most max_length); raises TextTooLong when not truncating."""
        encodings = self.tokenizer.encode_batch(texts)
        out: list[np.ndarray] = []
        for i, enc in enumerate(encodings):
            if enc.overflowing and not truncate:
                raise TextTooLong(i, self.max_length)
            out.append(np.asarray(enc.ids, dtype=np.int64))
        return out

    # -- core + post -----------------------------------------------------------------------------------
    def run(self, sequences: list[np.ndarray], solo: bool = False) -> list[Output]:
        """Pad to the longest sequence, run the session (the wide one if ``solo``), return logits and softmax."""
        length = max(len(s) for s in sequences)
        input_ids = np.zeros((len(sequences), length), dtype=np.int64)
        attention_mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        logits = self._run(feeds, solo).astype(np.float32, copy=False)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=1, keepdims=True)
        return [Output(logits[i], probs[i]) for i in range(len(sequences))]

    def _run(self, feeds: dict[str, np.ndarray], solo: bool) -> np.ndarray:
        if not self.on_cuda:
            session = self.solo_session if solo and self.solo_session is not None else self.session
            return session.run([self.output_name], feeds)[0]
        # I/O binding: inputs copied to the device once, logits written straight back into host memory.
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warmup(self, max_batch_size: int, runs: int) -> float:
        """Run representative shapes so the first real requests do not pay for kernel and arena set-up."""
        start = time.perf_counter()
        cls_sep = self.tokenize(["warm up"], truncate=True)[0]
        shapes = {(1, 16), (4, 32), (min(max_batch_size, 32), 64), (1, self.max_length), (max_batch_size, 16)}
        for batch, length in sorted(shapes):
            ids = np.full(length, cls_sep[1], dtype=np.int64)
            ids[0], ids[-1] = cls_sep[0], cls_sep[-1]
            for _ in range(runs):
                self.run([ids] * batch)
                if self.solo_session is not None:
                    self.run([ids] * batch, solo=True)
        return time.perf_counter() - start
