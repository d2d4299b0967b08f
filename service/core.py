"""The neutral data plane: what every protocol calls, and nothing protocol-specific.

A protocol module decodes its request, asks :meth:`DataPlane.model` for the model it names and calls
:meth:`DataPlane.infer`; it then encodes the :class:`InferResult` its own way (after KServe's data plane: the
protocols depend on it and never on each other). Here: input limits, tokenizing in this (API) process, the
request deadline, submission to the engine, retrying on the model now current when a hot reload swapped the one
chosen, and one :class:`Timing` record per request that feeds metrics, response headers and traces. Model
administration (reload, repository load / unload / index, statistics) goes through here too, so no protocol
touches the engine.

The engine is an :class:`EngineClient`: :class:`service.engine.Engine` in this process, or
:class:`service.ipc.client.RemoteEngine` in the engine process over IPC. This module imports neither: an API
process never loads ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.bundle import load_bundle
from service.catalog import ModelDescriptor, RepositoryEntry, version_key
from service.config import Limits, Settings
from service.errors import Draining, NotFound, NotReady, PayloadTooLarge, TextTooLong, Unprocessable
from service.metrics import Metrics
from service.modelio import Encoder, Head, TokenSeq, TooLong
from service.tracing import RequestSpan, epoch_ns


class EngineClient(Protocol):
    """The engine as the data plane sees it: in this process or in the engine process (service/ipc/)."""

    @property
    def generation(self) -> int: ...  # changes whenever the model table does

    @property
    def ready(self) -> bool: ...

    def descriptors(self) -> list[ModelDescriptor]: ...

    def check_room(self, name: str, version: str, n: int) -> None: ...  # QueueFull before any tokenizing

    def submit(
        self,
        name: str,
        version: str,
        seqs: Sequence[TokenSeq],
        deadline: float,
        gone: Callable[[], bool] | None,
        link: tuple[int, int] | None = None,
    ) -> asyncio.Future[Any]: ...  # resolves to the finished request: logits, scores, predicted, timings

    async def start(self) -> None: ...  # load and warm (in process), or connect (IPC)

    async def close(self) -> None: ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def reload(self, model_dir: str | None, variant: str | None) -> ModelDescriptor: ...

    async def stats(self) -> dict[tuple[str, str], dict[str, Any]]: ...

    async def repository_index(self) -> list[RepositoryEntry]: ...

    async def refresh(self) -> None: ...  # fetch the model table now (after a reload retired a version)

    async def drain_barrier(self) -> None: ...  # wait until every API process has closed its listener


@dataclass(frozen=True)
class ModelView:
    """A served model as protocols see it: metadata, its tokenizer and head."""

    desc: ModelDescriptor
    encoder: Encoder
    head: Head

    @property
    def name(self) -> str:
        return self.desc.name

    @property
    def version(self) -> str:
        return self.desc.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def pair(self) -> bool:
        return bool(self.desc.manifest.get("text_pair", False))

    @property
    def manifest(self) -> dict[str, Any]:
        return self.desc.manifest


def view_of(desc: ModelDescriptor, previous: ModelView | None = None) -> ModelView:
    """Build (or reuse, when the bundle did not change) the API-side view of a served model."""
    if (
        previous is not None
        and previous.desc.bundle_path == desc.bundle_path
        and previous.desc.manifest == desc.manifest
    ):
        return ModelView(desc, previous.encoder, previous.head)
    bundle = load_bundle(desc.bundle_path, verify=False)  # the engine verified the checksums
    encoder = Encoder.from_file(bundle.tokenizer_path, bundle.manifest.max_length)
    return ModelView(desc, encoder, bundle.manifest.head())


@dataclass(slots=True)
class Timing:
    """One request's clock: stages in seconds; ``start`` is perf_counter() at arrival."""

    start: float = field(default_factory=time.perf_counter)
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0

    def total_s(self) -> float:
        return time.perf_counter() - self.start

    def headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        """TEI's per-response timing headers (milliseconds) and the request id."""
        return [
            (b"x-request-id", request_id.encode()),
            (b"x-total-time", b"%.3f" % (self.total_s() * 1000)),
            (b"x-tokenize-time", b"%.3f" % (self.tokenize_s * 1000)),
            (b"x-queue-time", b"%.3f" % (self.queue_s * 1000)),
            (b"x-inference-time", b"%.3f" % (self.inference_s * 1000)),
        ]


@dataclass(slots=True)
class Call:
    """One request as the data plane sees it, whatever its protocol: its clock, a probe for whether its client is
    still there (requests of clients that went away are dropped before compute), and its trace span."""

    timing: Timing = field(default_factory=Timing)
    gone: Callable[[], bool] | None = None
    span: RequestSpan | None = None


@dataclass(slots=True)
class _Pending:
    texts: Sequence[str]
    pairs: Sequence[str] | None
    truncate: bool
    future: asyncio.Future[list[TokenSeq]]


class TokenizeRounds:
    """Tokenize every request that arrives in one event-loop round with one ``encode_batch`` call.

    The Rust tokenizer releases the GIL for each call, and on the event-loop thread every release lets the
    inference threads in and makes the loop wait to get the GIL back. One call per round (per model and input
    kind) pays that once for everything that arrived together; a request alone in its round is tokenized the
    same way, just later by one ``call_soon``.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[int, bool], tuple[Encoder, list[_Pending]]] = {}

    def encode(
        self, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None, truncate: bool
    ) -> asyncio.Future[list[TokenSeq]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[TokenSeq]] = loop.create_future()
        key = (id(encoder), pairs is not None)
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = (encoder, [])
            loop.call_soon(self._flush, key)
        entry[1].append(_Pending(texts, pairs, truncate, future))
        return future

    def _flush(self, key: tuple[int, bool]) -> None:
        encoder, requests = self._pending.pop(key)
        texts = [t for r in requests for t in r.texts]
        pairs = [p for r in requests if r.pairs is not None for p in r.pairs] if key[1] else None
        try:
            seqs, too_long = encoder.encode_all(texts, pairs)
        except Exception as exc:  # a tokenizer failure fails this round's requests, not the loop
            for r in requests:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        start = 0
        for r in requests:
            end = start + len(r.texts)
            if r.future.done():  # the request went away while it waited for the round
                pass
            elif not r.truncate and any(too_long[start:end]):
                first = next(i for i in range(start, end) if too_long[i]) - start
                r.future.set_exception(TooLong(first, encoder.max_length))
            else:
                r.future.set_result(seqs[start:end])
            start = end


@dataclass(slots=True)
class InferResult:
    model: ModelView
    logits: np.ndarray  # [n, labels] float32
    scores: np.ndarray  # [n, labels] calibrated probabilities (softmax or sigmoid)
    predicted: list[list[int]]  # label indices per input: [argmax], or those over their thresholds
    tokens: int  # tokens of the inputs, special tokens included (what the model computed on)
    timing: Timing
    batches: list[tuple[int, float, float]]  # (size, start, end) of the batches that served it


class DataPlane:
    """Models as protocols see them, ``infer`` (the one path from decoded inputs to results) and the model
    administration every protocol exposes its own way."""

    def __init__(self, settings: Settings, engine: EngineClient, metrics: Metrics) -> None:
        self.settings = settings
        self.limits: Limits = settings.limits()
        self.engine = engine
        self.metrics = metrics
        self.draining = False
        self._generation = -1
        self._views: dict[tuple[str, str], ModelView] = {}
        self._latest: dict[str, ModelView] = {}
        self._tokenize = metrics.tokenize_duration
        self._rounds = TokenizeRounds()

    # -- models -------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining and bool(self.views())

    def views(self) -> dict[tuple[str, str], ModelView]:
        """Every served model version, rebuilt only when the engine's model table changed."""
        if self.engine.generation != self._generation:
            generation = self.engine.generation
            views = {}
            for desc in self.engine.descriptors():
                key = (desc.name, desc.version)
                views[key] = view_of(desc, self._views.get(key))
            latest: dict[str, ModelView] = {}
            for view in sorted(views.values(), key=lambda v: version_key(v.version)):
                latest[view.name] = view
            self._views, self._latest, self._generation = views, latest, generation
        return self._views

    def latest(self) -> dict[str, ModelView]:
        self.views()
        return self._latest

    def model(self, name: str | None, version: str | None = None) -> ModelView:
        """The model a request names (its latest version when none is named); NotFound / NotReady otherwise."""
        if not self.engine.ready:  # while draining requests are still served: only readiness turns 503
            raise NotReady("model is loading or warming up")
        latest = self.latest()
        if not latest:
            raise NotFound("no model is loaded")
        if not name:
            if len(latest) == 1:
                return next(iter(latest.values()))
            raise Unprocessable(f"several models are served ({', '.join(sorted(latest))}); name one with 'model'")
        if not version:
            view = latest.get(name)
        else:
            view = self._views.get((name, version))
            if view is None and name in latest:
                served = sorted(v for n, v in self._views if n == name)
                raise NotFound(f"model {name!r} has no version {version!r}; it serves {served}")
        if view is None:
            raise NotFound(f"unknown model {name!r}; this server serves {sorted(latest)}")
        return view

    # -- inference ----------------------------------------------------------------------------------------
    def check_inputs(self, view: ModelView, texts: Sequence[str], pairs: Sequence[str] | None) -> None:
        """Limits and shape of the inputs, before any work: 413 for too many, 422 for empty or the wrong task."""
        if not texts:
            raise Unprocessable("inputs is empty; send at least one text")
        if len(texts) > self.limits.max_client_batch:
            raise PayloadTooLarge(f"{len(texts)} inputs exceed the limit of {self.limits.max_client_batch} per request")
        if view.pair and pairs is None:
            raise Unprocessable(
                f'model {view.name!r} classifies text pairs: send ["text", "text_pair"] or a list of such pairs'
            )
        if not view.pair and pairs is not None:
            raise Unprocessable(
                f"model {view.name!r} classifies single texts, not pairs: send a text or a list of texts"
            )
        for i, text in enumerate(texts):
            _check_text(i, text)
        if pairs is not None:
            for i, text in enumerate(pairs):
                _check_text(i, text, " (second text of the pair)")

    async def infer(
        self,
        view: ModelView,
        texts: Sequence[str],
        pairs: Sequence[str] | None,
        call: Call,
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
    ) -> InferResult:
        """Tokenize, submit to the engine, wait for the result: the one inference path of every protocol."""
        timing, span = call.timing, call.span
        self.check_inputs(view, texts, pairs)
        deadline = time.monotonic() + self.limits.deadline_s(timeout_s)
        for _ in range(3):  # a hot reload may retire the chosen version between choice and submission
            self.engine.check_room(view.name, view.version, len(texts))  # a 429 before any tokenizing
            started = time.perf_counter()
            try:
                seqs = await self._rounds.encode(view.encoder, texts, pairs, truncate)
            except TooLong as exc:
                raise TextTooLong(str(exc)) from None
            tokenized = time.perf_counter()
            elapsed = tokenized - started
            timing.tokenize_s += elapsed
            self._tokenize.observe(elapsed)
            link = None
            if span is not None:
                span.stage("tokenize", epoch_ns(int(started * 1e9)), epoch_ns(int(tokenized * 1e9)))
                link = span.link_context()
            try:
                job = await self.engine.submit(view.name, view.version, seqs, deadline, call.gone, link)
            except Draining:
                if self.draining:
                    raise
                await self.engine.refresh()  # the engine may be in another process: ask for its table
                current = self.latest().get(view.name)
                if current is None or current is view:
                    raise
                view = current
                continue
            timing.queue_s, timing.inference_s = job.queue_s, job.inference_s
            if span is not None:
                queued = epoch_ns(int(tokenized * 1e9))
                span.stage("queue", queued, queued + int(job.queue_s * 1e9))
            tokens = sum(len(seq) for seq in seqs)
            return InferResult(view, job.logits, job.scores, job.predicted, tokens, timing, job.batches)
        raise Draining(f"model {view.name!r} is being replaced; retry")

    # -- administration ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    async def drain_barrier(self) -> None:
        await self.engine.drain_barrier()

    async def reload(self, model_dir: str | None, variant: str | None) -> ModelDescriptor:
        """Load a bundle (default: the configured one), warm it and swap it in (also on SIGHUP)."""
        if self.draining:
            raise NotReady("server is draining")
        desc = await self.engine.reload(model_dir, variant)
        await self.engine.refresh()
        return desc

    async def load(self, name: str) -> None:
        """(Re)load a repository model: every served version, swapped in once warm."""
        await self.engine.load(name)
        await self.engine.refresh()

    async def unload(self, name: str) -> None:
        """Stop serving a repository model; what was admitted is answered first."""
        await self.engine.unload(name)
        await self.engine.refresh()

    async def statistics(self, name: str | None, version: str | None) -> dict[tuple[str, str], dict[str, Any]]:
        """Batcher counters per served (model, version): all, one model's, or one version's (404 when unknown)."""
        if name:
            self.model(name, version or None)  # NotFound / NotReady with the usual messages
        stats = await self.engine.stats()
        return {
            (n, v): s
            for (n, v), s in sorted(stats.items())
            if (not name or n == name) and (not version or v == version)
        }

    async def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model of the repository with its state (READY, LOADING, UNAVAILABLE) and why."""
        return [e for e in await self.engine.repository_index() if not ready_only or e.state == "READY"]


def _check_text(i: int, text: str, what: str = "") -> None:
    if not text.strip():
        raise Unprocessable(f"input {i}{what} is empty or only whitespace")
    if "\x00" in text:
        raise Unprocessable(f"input {i}{what} contains a NUL character")
