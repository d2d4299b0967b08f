"""The engine: the models loaded on one device, their batchers, and load / unload / reload / drain.

One engine per device. With one API process it runs inside that process; with several it runs in its own
process (service/ipc/) and every API process's traffic reaches the same batchers, so batches stay global.
The engine knows no protocol: it takes token sequences for a (model, version) and returns a finished
:class:`~service.batching.Job` (logits, calibrated scores, predicted labels, timings). :class:`Engine` is the
in-process :class:`~service.core.EngineClient`; service/ipc/client.py is the same interface over IPC.

Models come from one bundle directory (``model_dir``; name and version from its manifest) or a repository
(``model_repository``: ``DIR/NAME/VERSION/`` or ``DIR/NAME/`` bundles, served as NAME, version VERSION or the
manifest's). Each model version has its own session(s) and batcher, and every batcher draws on one set of
``inference_workers`` compute slots for the device (:class:`~service.batching.Device`), granted first come,
first served: two busy models never run more batches at once than the device has workers.

A hot reload is a load of a new version: it is loaded and warmed beside the old one, swapped in atomically,
then the old one drains (every admitted request is answered) and is closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.batching import Batcher, Device, Job
from service.bundle import MANIFEST_NAME, Bundle, BundleError, load_bundle
from service.catalog import ModelDescriptor, RepositoryEntry, version_key
from service.config import Settings
from service.errors import Conflict, Draining, NotFound, NotReady, Unprocessable
from service.metrics import Metrics
from service.modelio import Head, TokenSeq
from service.monitoring import PredictionMonitor
from service.runtime import ModelRuntime
from service.tracing import Tracing, epoch_ns

log = logging.getLogger("bertserve.engine")


def public_manifest(bundle: Bundle) -> dict[str, Any]:
    """The manifest as clients may see it: no file checksums, no absolute path of any machine."""
    data = bundle.manifest.model_dump(mode="json", exclude={"files"})
    dataset = data.get("dataset") or {}
    for key in ("path",):
        dataset.pop(key, None)
    if str(data.get("base_model", "")).startswith("/"):
        data["base_model"] = Path(data["base_model"]).name
    return data


@dataclass
class LoadedModel:
    bundle: Bundle
    runtime: ModelRuntime
    head: Head
    batcher: Batcher
    monitor: PredictionMonitor | None = None

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def version(self) -> str:
        return self.runtime.version

    def descriptor(self) -> ModelDescriptor:
        r = self.runtime
        return ModelDescriptor(
            name=self.name,
            version=self.version,
            bundle_path=str(self.bundle.path),
            variant=r.variant,
            providers=list(r.providers),
            threads=r.threads,
            solo_threads=r.solo_threads,
            policy=asdict(self.batcher.policy),
            manifest=public_manifest(self.bundle),
        )


@dataclass
class Engine:
    """Every model this device serves; the one place models are loaded, swapped and closed."""

    settings: Settings
    metrics: Metrics
    tracing: Tracing | None = None
    models: dict[str, dict[str, LoadedModel]] = field(default_factory=dict)
    index: dict[str, RepositoryEntry] = field(default_factory=dict)  # by name, for the repository extension
    generation: int = 0
    ready: bool = False
    _prepared: dict[str, list[LoadedModel]] = field(default_factory=dict)
    _device: Device | None = None  # the compute slots every model's batcher shares (one engine per device)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- discovery ----------------------------------------------------------------------------------------
    def repository_models(self) -> dict[str, list[Path]]:
        """NAME -> bundle directories to serve (latest ``version_policy`` versions), for repository mode."""
        root = self.settings.model_repository
        if root is None or not root.is_dir():
            raise BundleError(f"{root}: model repository directory does not exist")
        found: dict[str, list[Path]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found[model_dir.name] = self._versions_of(model_dir)
        return found

    def _versions_of(self, model_dir: Path) -> list[Path]:
        if (model_dir / MANIFEST_NAME).is_file():
            return [model_dir]
        versions = sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()),
            key=lambda p: version_key(p.name),
        )
        if not versions:
            raise BundleError(f"{model_dir}: no bundle (NAME/manifest.json or NAME/VERSION/manifest.json)")
        keep = self.settings.version_policy
        return versions[-keep:] if keep else versions

    # -- loading ------------------------------------------------------------------------------------------
    def _load_one(self, path: Path, name: str | None, variant: str | None) -> LoadedModel:
        """Verify a bundle and create its session(s) (blocking: call it in a thread)."""
        bundle = load_bundle(path, verify=True)
        if name is not None:  # repository mode: the directory names the model (as in Triton); or model_name
            version = path.name if path.parent.name == name else bundle.manifest.version
            manifest = bundle.manifest.model_copy(update={"name": name, "version": version})
            bundle = bundle.model_copy(update={"manifest": manifest})
        runtime = ModelRuntime(bundle, self.settings.runtime_options(variant))
        head = bundle.manifest.head()
        monitor = self._monitor(bundle, head)

        def post(logits: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
            scores = head.scores(logits)
            return scores, head.predict(scores)

        tracing = self.tracing
        span_hook = None
        if tracing is not None and tracing.enabled:
            model_name = runtime.name

            def span_hook(size: int, start: float, end: float, links: list[tuple[int, int]]) -> None:
                tracing.batch_span(model_name, size, epoch_ns(int(start * 1e9)), epoch_ns(int(end * 1e9)), links)

        if self._device is None:
            self._device = Device(self.settings.inference_workers)
        batcher = Batcher(
            runtime,
            self.settings.batch_policy(),
            self.metrics.for_model(runtime.name, runtime.version),
            post,
            on_batch=monitor.observe if monitor is not None else None,
            on_batch_span=span_hook,
            device=self._device,
        )
        return LoadedModel(bundle, runtime, head, batcher, monitor)

    def _monitor(self, bundle: Bundle, head: Head) -> PredictionMonitor | None:
        """Prediction metrics and drift for a model, in this process's registry (the shared one when several
        processes serve)."""
        if not self.settings.monitoring:
            return None
        return PredictionMonitor(
            None if self.metrics.multiprocess else self.metrics.registry,
            bundle.manifest.name,
            list(head.labels),
            bundle.manifest.reference,
            window=self.settings.drift_window,
            window_s=self.settings.drift_window_s,
            low_margin=self.settings.low_margin,
        )

    async def _load_and_warm(self, path: Path, name: str | None, variant: str | None) -> LoadedModel:
        model = await asyncio.to_thread(self._load_one, path, name, variant)
        await asyncio.to_thread(self._warm, model)
        return model

    def _warm(self, model: LoadedModel) -> None:
        model.runtime.warmup(model.batcher.policy.max_batch_size, self.settings.warmup_runs)

    def prepare(self) -> None:
        """Verify every configured bundle and create its sessions (blocking, before the server listens).

        A bad bundle in ``model_dir`` mode raises, so it never serves; in repository mode a model that fails is
        reported UNAVAILABLE (as Triton does) and only a repository where nothing loads raises.
        """
        if self.settings.model_repository is None:
            model = self._load_one(self.settings.model_dir, self.settings.model_name, None)
            self._prepared = {model.name: [model]}
            return
        for name, paths in self.repository_models().items():
            try:
                self._prepared[name] = [self._load_one(p, name, None) for p in paths]
                self.index[name] = RepositoryEntry(name, "", "LOADING")
            except Exception as exc:  # one bad model does not stop the others
                log.error("model %s failed to load: %s", name, exc)
                self.index[name] = RepositoryEntry(name, "", "UNAVAILABLE", str(exc))
        if not self._prepared:
            raise BundleError(f"{self.settings.model_repository}: no model could be loaded")

    async def start(self) -> None:
        """Warm the prepared models and start serving them; the engine is ready when all are."""
        if not self._prepared:
            await asyncio.to_thread(self.prepare)
        prepared, self._prepared = self._prepared, {}
        for versions in prepared.values():
            for model in versions:
                await asyncio.to_thread(self._warm, model)
        self._install(prepared)
        self.ready = True

    def _install(self, new: dict[str, list[LoadedModel]]) -> list[LoadedModel]:
        """Swap in models by name; returns the model versions they replaced (to drain and close)."""
        replaced: list[LoadedModel] = []
        for name, versions in new.items():
            for model in versions:
                model.batcher.start()
                r = model.runtime
                self.metrics.set_model(r.name, r.version, r.variant, r.provider)
            old = self.models.get(name, {})
            self.models[name] = {m.version: m for m in versions}
            replaced += [m for v, m in old.items() if self.models[name].get(v) is not m]
            latest = max(self.models[name], key=version_key)
            self.index[name] = RepositoryEntry(name, latest, "READY")
        self.generation += 1
        return replaced

    async def _retire(self, models: Sequence[LoadedModel]) -> None:
        for model in models:
            r = model.runtime
            self.metrics.set_model(r.name, r.version, r.variant, r.provider, loaded=False)
            await model.batcher.drain()
            await model.batcher.close()
            if model.monitor is not None:
                model.monitor.close()
        if models:
            # The cancelled scheduler task keeps a traceback whose frames point back at the batcher: the session
            # sits in a reference cycle only a full collection frees. Collect now, off the event loop.
            await asyncio.to_thread(gc.collect)

    # -- the repository and admin operations --------------------------------------------------------------
    async def load(self, name: str) -> None:
        """(Re)load every served version of repository model ``name``; the old ones drain after the swap."""
        if self.settings.model_repository is None:
            raise Unprocessable("the repository extension needs BERTSERVE_MODEL_REPOSITORY (a directory of models)")
        if self._lock.locked():
            raise Conflict("a load, unload or reload is already in progress")
        async with self._lock:
            model_dir = self.settings.model_repository / name
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or not model_dir.is_dir():
                raise NotFound(f"model {name!r} is not in the repository")
            self.index[name] = RepositoryEntry(name, "", "LOADING")
            try:
                paths = self._versions_of(model_dir)
                loaded = [await self._load_and_warm(p, name, None) for p in paths]
            except Exception as exc:
                previous = self.models.get(name)
                state = "READY" if previous else "UNAVAILABLE"
                self.index[name] = RepositoryEntry(
                    name, max(previous, key=version_key) if previous else "", state, str(exc)
                )
                raise Unprocessable(f"model {name!r} failed to load: {exc}") from None
            old = self._install({name: loaded})
        await self._retire(old)

    async def unload(self, name: str) -> None:
        if self.settings.model_repository is None:
            raise Unprocessable("the repository extension needs BERTSERVE_MODEL_REPOSITORY (a directory of models)")
        if name not in self.models:
            raise NotFound(f"model {name!r} is not loaded")
        if self._lock.locked():
            raise Conflict("a load, unload or reload is already in progress")
        async with self._lock:
            versions = list(self.models.pop(name).values())
            self.index[name] = RepositoryEntry(name, "", "UNAVAILABLE", "unloaded")
            self.generation += 1
        await self._retire(versions)

    async def reload(self, model_dir: str | None, variant: str | None) -> ModelDescriptor:
        """Load a bundle (default: the configured one), warm it, swap it in for the served model of that name."""
        if self._lock.locked():
            raise Conflict("a reload is already in progress")
        async with self._lock:
            if not self.ready:
                raise NotReady("server is starting; reload not applied")
            try:
                path = Path(model_dir) if model_dir else self.settings.model_dir
                model = await self._load_and_warm(path, self.settings.model_name, variant)
            except Exception as exc:  # whatever stops the new bundle loading or warming, the old one serves on
                log.warning("reload refused: %s", exc)
                raise Unprocessable(f"reload refused, still serving the old model: {exc}") from None
            old = [m for versions in self.models.values() for m in versions.values()]
            self.models.clear()
            self._install({model.name: [model]})
        log.info("reloaded: now serving %s:%s", model.name, model.version)
        await self._retire(old)
        return model.descriptor()

    async def close(self) -> None:
        """Finish what was admitted, then release every session."""
        self.ready = False
        models = [m for versions in self.models.values() for m in versions.values()]
        self.models.clear()
        await self._retire(models)

    # -- serving (the EngineClient interface, service/core.py) -----------------------------------------------
    def descriptors(self) -> list[ModelDescriptor]:
        return [m.descriptor() for versions in self.models.values() for m in versions.values()]

    def find(self, name: str, version: str) -> LoadedModel:
        model = self.models.get(name, {}).get(version)
        if model is None:
            raise Draining(f"model {name!r} version {version!r} is no longer served")
        return model

    def check_room(self, name: str, version: str, n: int) -> None:
        self.find(name, version).batcher.check_room(n)

    def submit(
        self,
        name: str,
        version: str,
        seqs: Sequence[TokenSeq],
        deadline: float,
        gone: Callable[[], bool] | None,
        link: tuple[int, int] | None = None,
    ) -> asyncio.Future[Job]:
        return self.find(name, version).batcher.submit(seqs, deadline, gone, link)

    async def stats(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(m.name, m.version): asdict(m.batcher.stats) for vs in self.models.values() for m in vs.values()}

    async def repository_index(self) -> list[RepositoryEntry]:
        return sorted(self.index.values(), key=lambda entry: entry.name)

    async def refresh(self) -> None:
        """The model table is read straight from this object: always current."""

    async def drain_barrier(self) -> None:
        """One process holds every listener: nothing to wait for before connections close."""

    def queue_depth(self) -> int:
        return sum(m.batcher.depth for vs in self.models.values() for m in vs.values())
