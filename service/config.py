"""Service settings: environment variables prefixed BERTSERVE_, overridable by command-line flags.

Every knob is declared once, here, with its default and description (the README's settings table is generated
from these fields by ``scripts/settings_table.py``). ``Settings`` maps itself to the small frozen value objects
the rest of the service takes (:class:`BatchPolicy`, :class:`RuntimeOptions`, :class:`Limits`), so no module
copies fields one by one and no default is written twice.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class BatchPolicy:
    """How the batcher forms batches and admits work (see service/batching.py)."""

    max_batch_size: int = 8
    max_batch_tokens: int = 384
    max_padding_ratio: float = 1.25
    max_wait_s: float = 0.0
    batch_lookahead: int = 24
    max_queue: int = 1024
    inference_workers: int = 2


@dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime sessions are created (see service/runtime.py)."""

    provider: str = "auto"
    variant: str = "auto"
    threads: int = 1
    solo_threads: int = 0
    spinning: bool = False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (see service/core.py)."""

    max_client_batch: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 30.0
    max_request_timeout_s: float = 120.0

    def deadline_s(self, timeout_s: float | None) -> float:
        """Seconds this request may take: its own timeout, capped, or the default."""
        return self.request_timeout_s if timeout_s is None else min(timeout_s, self.max_request_timeout_s)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTSERVE_", extra="ignore", env_ignore_empty=True)

    model_dir: Path = Field(Path("models/bbc"), description="one model bundle directory written by `training`")
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="serve the model_dir bundle under this name, not its manifest's (KServe: the service's name)",
    )
    model_repository: Path | None = Field(
        None,
        description="serve every bundle under this directory; NAME/VERSION/ or NAME/ bundles, instead of model_dir",
    )
    version_policy: int = Field(1, ge=0, description="repository versions served per model: the latest N; 0 = all")
    host: str = Field("127.0.0.1", description="address to bind (HTTP and gRPC); the image sets 0.0.0.0")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="KServe v2 gRPC port; unset: HTTP port + 1; 0: off")
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes (HTTP + gRPC, validation, tokenization); above 1 they share the ports and "
        "feed one engine process that owns the batchers and sessions",
    )
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when it really initialises, else CPU; cuda: refuse to start without it"
    )
    variant: Literal["auto", "fp32", "opt", "int8", "fp16"] = Field(
        "auto", description="ONNX graph to serve; auto: fp16, then opt, then fp32 on CUDA; fp32 on CPU"
    )
    max_batch_size: int = Field(BatchPolicy.max_batch_size, ge=1, le=1024, description="most sequences in one batch")
    max_batch_tokens: int = Field(
        BatchPolicy.max_batch_tokens,
        ge=16,
        description="most padded tokens (batch x longest sequence) in one inference batch; small on a CPU so a "
        "batch of long texts finishes quickly (a lone longer sequence still runs)",
    )
    max_padding_ratio: float = Field(
        BatchPolicy.max_padding_ratio,
        ge=1.0,
        description="most padded tokens per real token in a batch; a sequence that would pad more waits "
        "for a batch of its own length",
    )
    max_wait_ms: float = Field(
        BatchPolicy.max_wait_s * 1000,
        ge=0,
        le=1000,
        description="how long an idle worker waits for more requests to fill a batch; batches also form "
        "naturally while the previous batch computes",
    )
    batch_lookahead: int = Field(
        BatchPolicy.batch_lookahead, ge=1, description="oldest queued sequences considered when grouping lengths"
    )
    max_queue: int = Field(BatchPolicy.max_queue, ge=1, description="queued sequences per model before 429")
    max_client_batch: int = Field(Limits.max_client_batch, ge=1, description="most inputs in one request (413 above)")
    max_body_bytes: int = Field(Limits.max_body_bytes, ge=1024, description="largest request body (413 above)")
    request_timeout_s: float = Field(Limits.request_timeout_s, gt=0, description="default request deadline (504)")
    max_request_timeout_s: float = Field(
        Limits.max_request_timeout_s, gt=0, description="cap on a request's own `timeout_s`"
    )
    inference_workers: int = Field(
        BatchPolicy.inference_workers,
        ge=1,
        le=64,
        description="batches computed at once on the device, all models together; each in its own thread: on a "
        "small CPU two single-threaded batches keep the cores busier than one two-threaded batch",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads per worker; 0 = CPU cores / inference_workers"
    )
    solo_threads: int = Field(
        0,
        ge=0,
        description="threads of the CPU session for a batch that runs alone; nothing else computing or queued; "
        "0 = inference_workers x intra-op threads; at most the intra-op threads turns it off",
    )
    ort_spinning: bool = Field(
        RuntimeOptions.spinning,
        description="let ONNX Runtime's threads spin between ops; off leaves the cores to the HTTP layer",
    )
    warmup_runs: int = Field(2, ge=0, description="runs of each warm-up shape before readiness turns on")
    api_key: SecretStr | None = Field(
        None, description="inference calls need `Authorization: Bearer <key>`; unset: open"
    )
    api_key_file: Path | None = Field(None, description="read api_key from this file (a mounted secret)")
    admin_api_key: SecretStr | None = Field(
        None,
        description="the model repository API and reload need this key, not api_key; unset: api_key",
    )
    admin_api_key_file: Path | None = Field(None, description="read admin_api_key from this file")
    auth_all: bool = Field(False, description="also require the key on health, readiness and metrics")
    drain_delay_s: float = Field(
        0.0, ge=0, description="after SIGTERM, seconds readiness is 503 while the listener still accepts"
    )
    drain_timeout_s: float = Field(30.0, gt=0, description="longest wait for in-flight requests on shutdown")
    keep_alive_s: float = Field(
        5.0, gt=0, description="idle keep-alive connections are closed after this; also while draining"
    )
    monitoring: bool = Field(
        True, description="prediction metrics and drift PSI per model; off only to measure what they cost"
    )
    drift_window: int = Field(2000, ge=10, description="recent predictions per model that drift PSI compares")
    drift_window_s: float = Field(
        0.0, ge=0, description="also only those of the last N seconds (a time window); 0 = by count only"
    )
    low_margin: float = Field(0.1, ge=0, le=1, description="a top-1 minus top-2 score below this counts as low-margin")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text, or one JSON object per line")
    access_log: bool = Field(False, description="one log line per request (costs CPU per request)")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_request_timeout_s < self.request_timeout_s:
            raise ValueError("max_request_timeout_s must be >= request_timeout_s")
        if self.grpc_port is None:  # follows the HTTP port, so moving one server moves both (off with port 0)
            if self.port == 65535:
                raise ValueError("port 65535 leaves no port for gRPC: set grpc_port (0 turns gRPC off)")
            self.grpc_port = self.port + 1 if self.port else 0
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError("grpc_port must differ from port (or be 0 to turn gRPC off)")
        self.api_key = _secret("api_key", self.api_key, self.api_key_file)
        self.admin_api_key = _secret("admin_api_key", self.admin_api_key, self.admin_api_key_file)
        return self

    @property
    def grpc_listen_port(self) -> int:
        """The gRPC port in force (0: off); the validator has resolved an unset one."""
        return self.grpc_port or 0

    @property
    def admin_key(self) -> SecretStr | None:
        """The key that guards the model repository and reload: the admin key, else the API key."""
        return self.admin_api_key or self.api_key

    def secrets(self) -> list[str]:
        """Every configured key, for the log filter that keeps them out of the logs."""
        return [key.get_secret_value() for key in (self.api_key, self.admin_api_key) if key is not None]

    @property
    def threads(self) -> int:
        return self.intra_op_threads or max(1, len(os.sched_getaffinity(0)) // self.inference_workers)

    @property
    def solo_thread_count(self) -> int:
        return self.solo_threads or self.threads * self.inference_workers

    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_padding_ratio=self.max_padding_ratio,
            max_wait_s=self.max_wait_ms / 1000.0,
            batch_lookahead=self.batch_lookahead,
            max_queue=self.max_queue,
            inference_workers=self.inference_workers,
        )

    def runtime_options(self, variant: str | None = None) -> RuntimeOptions:
        return RuntimeOptions(
            provider=self.provider,
            variant=variant or self.variant,
            threads=self.threads,
            solo_threads=self.solo_thread_count,
            spinning=self.ort_spinning,
        )

    def limits(self) -> Limits:
        return Limits(
            max_client_batch=self.max_client_batch,
            max_body_bytes=self.max_body_bytes,
            request_timeout_s=self.request_timeout_s,
            max_request_timeout_s=self.max_request_timeout_s,
        )


def _secret(name: str, value: SecretStr | None, path: Path | None) -> SecretStr | None:
    """A key given directly or read from a file (surrounding whitespace and the trailing newline dropped).

    Both may be set only when they agree: a process started from another's settings carries both.
    """
    if path is None:
        return value
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name}_file: cannot read {path}: {exc}") from None
    if not text:
        raise ValueError(f"{name}_file: {path} is empty")
    if value is not None and value.get_secret_value() != text:
        raise ValueError(f"set {name} or {name}_file, not both")
    return SecretStr(text)


def parse_args(argv: list[str] | None = None) -> Settings:
    """Build Settings from the environment, with any flag given on the command line taking precedence."""
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve bertserve model bundles.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=f"{field.description} (env BERTSERVE_{name.upper()})")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)
