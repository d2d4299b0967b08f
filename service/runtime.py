"""The model core: an ONNX Runtime session (or two) that turns a batch of token sequences into logits.

Provider choice is honest: ``providers`` is what ``session.get_providers()`` reports, never what was asked for
(onnxruntime-gpu quietly falls back to CPU when CUDA libraries are missing). Tokenizing (pre) is the API side's
job and scores (post) the head's (both in service/modelio.py); this module only pads and runs.
"""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError
from service.config import RuntimeOptions
from service.modelio import Encoder, TokenSeq, pad_feeds

log = logging.getLogger("bertserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used (e.g. CUDA demanded on a machine without it)."""


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
            raise BundleError(f"variant {requested!r} is not in the bundle (has {sorted(available)})")
        if requested == "fp16" and not on_cuda:
            # ONNX Runtime's CPU provider has few fp16 kernels: it inserts casts around most ops and runs slower
            # than fp32 with no memory benefit that matters here, so an explicit fp16 request on CPU is refused.
            raise ProviderError("variant 'fp16' needs the CUDA provider; on CPU serve fp32, opt or int8")
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
    """An ONNX Runtime session (plus a wide solo session on CPU); one runner per session at a time."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.name, self.version = manifest.name, manifest.version
        self.labels = list(manifest.labels)
        self.max_length = manifest.max_length
        provider, variant = options.provider, options.variant
        threads, solo_threads, spinning = options.threads, options.solo_threads, options.spinning
        self.pad_id = Encoder.from_file(bundle.tokenizer_path, manifest.max_length).pad_id

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
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.feed_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in graph_inputs)
        self.output_name = self.session.get_outputs()[0].name
        log.info(
            "loaded %s:%s variant=%s file=%s providers=%s threads=%d solo_threads=%s",
            self.name,
            self.version,
            self.variant,
            model_path.name,
            self.providers,
            threads,
            self.solo_threads or "off",
        )

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def can_run_solo(self) -> bool:
        return self.solo_session is not None

    def run(self, sequences: list[TokenSeq], solo: bool = False) -> np.ndarray:
        """Pad to the longest sequence and run the session (the wide one if ``solo``): float32 logits [n, labels]."""
        feeds = pad_feeds(sequences, self.pad_id, self.feed_names)
        return np.asarray(self._run(feeds, solo), dtype=np.float32)

    def _run(self, feeds: dict[str, np.ndarray], solo: bool) -> np.ndarray:
        if not self.on_cuda:
            session = self.solo_session if solo and self.solo_session is not None else self.session
            return np.asarray(session.run([self.output_name], feeds)[0])
        # I/O binding: inputs copied to the device once, logits written straight back into host memory.
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def warmup(self, max_batch_size: int, runs: int) -> float:
        """Run representative shapes so the first real requests do not pay for kernel and arena set-up."""
        start = time.perf_counter()
        shapes = {(1, 16), (4, 32), (min(max_batch_size, 32), 64), (1, self.max_length), (max_batch_size, 16)}
        for batch, length in sorted(shapes):
            seq = TokenSeq(np.full(length, 1000, dtype=np.int64), length)
            for _ in range(runs):
                self.run([seq] * batch)
                if self.solo_session is not None:
                    self.run([seq] * batch, solo=True)
        return time.perf_counter() - start
