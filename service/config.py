"""Service settings: environment variables prefixed BERTSERVE_, overridable by command-line flags.

Every batching and admission knob is declared here, named and documented, in the spirit of Triton's model
configuration: the README's settings table is generated from these field descriptions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTSERVE_", extra="ignore", env_ignore_empty=True)

    model_dir: Path = Field(Path("models/bbc"), description="model bundle directory written by `training`")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 in containers")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when it really initialises, else CPU; cuda: refuse to start without it"
    )
    variant: Literal["auto", "fp32", "opt", "int8", "fp16"] = Field(
        "auto", description="ONNX graph to serve; auto: fp16, then opt, then fp32 on CUDA; fp32 on CPU"
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="most sequences in one inference batch")
    max_batch_tokens: int = Field(
        384,
        ge=16,
        description="most padded tokens (batch x longest sequence) in one inference batch; small on a CPU so a "
        "batch of long texts finishes quickly (a lone longer sequence still runs)",
    )
    max_padding_ratio: float = Field(
        1.25,
        ge=1.0,
        description="most padded tokens per real token in a batch; a sequence that would pad more waits "
        "for a batch of its own length",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long an idle worker waits for more requests to fill a batch; batches also form "
        "naturally while the previous batch computes",
    )
    batch_lookahead: int = Field(
        24, ge=1, description="oldest queued sequences considered when grouping similar lengths into a batch"
    )
    max_queue: int = Field(1024, ge=1, description="queued sequences before requests are refused with 429")
    max_client_batch: int = Field(64, ge=1, description="most inputs in one request (413 above)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body in bytes (413 above)")
    request_timeout_s: float = Field(30.0, gt=0, description="default deadline of a request (504 after)")
    max_request_timeout_s: float = Field(120.0, gt=0, description="cap on a request's own `timeout_s`")
    inference_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="batches computed at once, each in its own thread; on a small CPU two single-threaded "
        "batches keep the cores busier than one two-threaded batch",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads per worker; 0 = CPU cores / inference_workers"
    )
    solo_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads for a batch that runs alone (no other batch computing, nothing "
        "queued), in a second session on CPU; 0 = inference_workers x intra-op threads; a value no larger "
        "than the intra-op threads turns the second session off",
    )
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads spin between ops; off leaves the cores to the HTTP layer",
    )
    tokenizer_threads: int = Field(1, ge=1, description="threads that tokenize requests off the event loop")
    tokenize_inline_chars: int = Field(
        2048,
        ge=0,
        description="requests with at most this many characters are tokenized on the event loop (a thread "
        "hop costs more than tokenizing a short text); longer ones in the tokenizer threads",
    )
    warmup_runs: int = Field(2, ge=0, description="runs of each warm-up shape before readiness turns on")
    api_key: SecretStr | None = Field(
        None, description="when set, predict, v2 infer and admin need `Authorization: Bearer <key>`"
    )
    auth_all: bool = Field(False, description="also require the key on health, readiness and metrics")
    drain_delay_s: float = Field(
        0.0, ge=0, description="after SIGTERM, seconds readiness is 503 while requests are still served"
    )
    drain_timeout_s: float = Field(30.0, gt=0, description="longest wait for in-flight requests on shutdown")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(False, description="uvicorn access log (costs CPU per request)")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_request_timeout_s < self.request_timeout_s:
            raise ValueError("max_request_timeout_s must be >= request_timeout_s")
        return self

    @property
    def threads(self) -> int:
        return self.intra_op_threads or max(1, len(os.sched_getaffinity(0)) // self.inference_workers)

    @property
    def solo_thread_count(self) -> int:
        return self.solo_threads or self.threads * self.inference_workers


def parse_args(argv: list[str] | None = None) -> Settings:
    """Build Settings from the environment, with any flag given on the command line taking precedence."""
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve a bertserve model bundle.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=f"{field.description} (env BERTSERVE_{name.upper()})")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)
