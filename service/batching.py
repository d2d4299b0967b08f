"""The dynamic batcher: a bounded queue, one scheduler task that owns it, a few inference worker threads.

Design (after text-embeddings-inference's queue and Infinity's batch handler):
- Only the scheduler task and the event loop touch the queue, so there are no locks.
- A request is one :class:`Job` with one future, whatever its number of inputs; its sequences queue as
  :class:`Item` rows and the job resolves when its last row has been computed. One future per request (not per
  sequence) keeps the per-request cost on the event loop small and leaves nothing to gather or cancel.
- While a batch computes in a worker thread, requests keep arriving; when a worker frees, the scheduler forms
  the next batch from a look-ahead window of the oldest queued sequences. The batch always contains the oldest
  sequence (so nothing starves) and grows with the sequences whose lengths add the least padding, bounded by
  max_batch_size sequences and max_batch_tokens padded tokens. On a CPU, batching only pays when lengths are
  grouped: batches in arrival order pad to ~2.5x the real tokens and run slower than batch 1.
- Expired, abandoned and disconnected requests are dropped when a batch is formed, so they cost no compute. A
  client that went away is found by its ``gone()`` probe (a flag the HTTP server keeps), not by a task per
  request waiting for a disconnect message.
- Under load, ``inference_workers`` batches compute at once on single-threaded sessions (keeps every core busy); a batch
  that would run alone (no other batch computing, nothing else queued) runs "solo" on the backend's wide session
  with every core and holds every worker slot meanwhile, so a lone client gets the lowest latency and the
  cores are never oversubscribed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.config import BatchPolicy
from service.errors import DeadlineExceeded, Disconnected, Draining, InferenceFailed, QueueFull
from service.metrics import ModelMetrics
from service.modelio import TokenSeq

log = logging.getLogger("bertserve.batching")

Post = Callable[[np.ndarray], tuple[np.ndarray, list[list[int]]]]
"""logits [n, labels] -> (scores [n, labels], predicted label indices per row); runs in the worker thread."""


class Backend(Protocol):
    @property
    def can_run_solo(self) -> bool: ...

    def run(self, sequences: list[TokenSeq], solo: bool = False) -> np.ndarray: ...


@dataclass(slots=True, eq=False)
class Job:
    """One request's work and, once its future resolves, its result (logits, scores, predictions, timings)."""

    seqs: Sequence[TokenSeq]
    future: asyncio.Future[Job]
    deadline: float
    enqueued: float
    gone: Callable[[], bool] | None = None
    remaining: int = 0
    logits: np.ndarray | None = None
    scores: np.ndarray | None = None
    predicted: list[list[int]] = field(default_factory=list)
    queue_s: float = 0.0
    inference_s: float = 0.0
    batches: list[tuple[int, float, float]] = field(default_factory=list)  # (size, start, end) perf_counter
    timer: asyncio.TimerHandle | None = None
    link: tuple[int, int] | None = None  # the request's trace span (trace id, span id), for the batch span

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        if self.timer is not None:
            self.timer.cancel()


@dataclass(slots=True, eq=False)
class Item:
    job: Job
    row: int
    seq: TokenSeq


def select_batch(lengths: Sequence[int], policy: BatchPolicy) -> list[int]:
    """Pick indices into ``lengths`` (arrival order, index 0 oldest) for the next batch.

    Start from the oldest sequence and repeatedly add the neighbour in length order that adds the fewest
    padded tokens (a shorter one pads only itself, a longer one pads every row already chosen), while the
    batch stays within max_batch_size sequences, max_batch_tokens padded tokens and max_padding_ratio
    padded/real tokens. On a CPU a batch's cost is close to its padded tokens and a batch's fixed cost is
    small, so two well-packed batches beat one padded batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    pos = order.index(0)
    lo = hi = pos
    longest = real = lengths[0]
    size = 1

    def fits(new_longest: int, new_real: int) -> bool:
        padded = (size + 1) * new_longest
        return padded <= policy.max_batch_tokens and padded <= policy.max_padding_ratio * new_real

    while size < policy.max_batch_size:
        left = lengths[order[lo - 1]] if lo > 0 else 0
        right = lengths[order[hi + 1]] if hi + 1 < len(order) else 0
        left_cost = longest - left if lo > 0 and fits(longest, real + left) else math.inf
        right_cost = size * (right - longest) if right and fits(right, real + right) else math.inf
        if left_cost == right_cost == math.inf:
            break
        if left_cost <= right_cost:
            lo -= 1
            real += left
        else:
            hi += 1
            longest = right
            real += right
        size += 1
    return order[lo : hi + 1]


class Device:
    """The compute slots of one device, shared by every model's batcher on it.

    At most ``workers`` batches compute at once on the device, whichever models they belong to, and slots are
    granted first come, first served (asyncio's semaphore is FIFO): a saturated model's scheduler waits in
    line like everyone else, so a neighbour's batch waits for at most one batch to finish instead of sharing
    the cores with twice as many batches as there are workers.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.slots = asyncio.Semaphore(workers)
        self.busy = 0  # batches computing on the device, all models together
        self.waiting = 0  # schedulers waiting for a slot

    async def acquire(self) -> None:
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("batch scheduler died; requests will time out", exc_info=task.exception())


class Batcher:
    """Owns the queue and the worker threads for one model runtime."""

    def __init__(
        self,
        backend: Backend,
        policy: BatchPolicy,
        metrics: ModelMetrics,
        post: Post,
        on_batch: Callable[[np.ndarray, list[list[int]]], None] | None = None,
        on_batch_span: Callable[[int, float, float, list[tuple[int, int]]], None] | None = None,
        device: Device | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.metrics = metrics
        self.post = post
        # prediction monitoring, called in the worker thread after each batch: off the event loop, which is what
        # limits a single API process; one lock because two workers can finish at once
        self.on_batch = on_batch
        self._on_batch_lock = threading.Lock()
        self.on_batch_span = on_batch_span  # (size, start, end, links): a trace span per batch, when tracing
        self.accepting = False
        self._queue: list[Item] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=policy.inference_workers, thread_name_prefix="bertserve-infer")
        self.device = device or Device(policy.inference_workers)
        self._running: set[asyncio.Task[None]] = set()  # batches in the workers, for close()
        self._busy = 0  # this model's batches computing (the device counts every model's)
        self._task: asyncio.Task[None] | None = None
        self._rate = 0.0  # EWMA of sequences/s, for Retry-After
        # counters in Triton's statistics terms (service/frontend/v2 reports them)
        self.stats = BatchStats()

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.accepting = True
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="bertserve-scheduler")
        self._task.add_done_callback(_report_crash)

    async def drain(self) -> None:
        """Stop accepting, then wait until every queued and computing sequence has been answered."""
        self.accepting = False
        self._wakeup.set()
        await self._idle.wait()

    async def close(self) -> None:
        self.accepting = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._queue:
            item.job.fail(Draining("server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=False)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- admission -------------------------------------------------------------------------------------
    def check_room(self, n: int) -> None:
        """Raise QueueFull now if ``n`` more sequences cannot be queued: refusing costs no tokenization."""
        if len(self._queue) + n > self.policy.max_queue:
            # Batches only look at the queue's head, so dead rows further back are purged here, when they
            # would cost a live request its place (abandoned, timed out, or the client gone: counted once).
            now = time.monotonic()
            self._queue = [item for item in self._queue if self._alive(item.job, now)]
        if len(self._queue) + n > self.policy.max_queue:
            raise QueueFull.retry_in(self._retry_after())  # counted where it is answered (the protocol's error path)

    def submit(
        self,
        seqs: Sequence[TokenSeq],
        deadline: float,
        gone: Callable[[], bool] | None = None,
        link: tuple[int, int] | None = None,
    ) -> asyncio.Future[Job]:
        """Queue one request's sequences (all or none); the future resolves to its finished Job."""
        if not self.accepting:
            raise Draining("model is being replaced or the server is draining")
        self.check_room(len(seqs))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = Job(seqs, loop.create_future(), deadline, now, gone, remaining=len(seqs), link=link)
        job.timer = loop.call_at(loop.time() + (deadline - now), self._expire, job)
        self._queue.extend(Item(job, row, seq) for row, seq in enumerate(seqs))
        self._idle.clear()
        self._wakeup.set()
        return job.future

    def _expire(self, job: Job) -> None:
        if not job.future.done():
            self.metrics.rejected_deadline.inc()
            job.future.set_exception(DeadlineExceeded("request deadline passed before its inputs were computed"))

    def _retry_after(self) -> int:
        rate = self._rate or 1.0
        return int(min(60, max(1, math.ceil(len(self._queue) / rate))))

    # -- scheduling ------------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._check_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.policy.max_wait_s > 0 and len(self._queue) < self.policy.max_batch_size:
                remaining = self._queue[0].job.enqueued + self.policy.max_wait_s - time.monotonic()
                if remaining > 0 and self.accepting:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        pass
                    else:
                        continue
            # Form the batch only once a worker is free: the later it forms, the more sequences it can choose from.
            device = self.device
            await device.acquire()
            batch = self._take_batch()
            if not batch:
                device.slots.release()
                continue
            # solo: nothing computes on the device, nothing else is queued here and no other model waits
            solo = self.backend.can_run_solo and device.busy == 0 and not self._queue and device.waiting == 0
            held = 1
            if solo:  # every slot is free, so these acquires return at once
                for _ in range(device.workers - 1):
                    await device.slots.acquire()
                held = device.workers
            self._busy += 1
            device.busy += 1
            task = loop.create_task(self._run_batch(batch, solo, held))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _check_idle(self) -> None:
        if not self._queue and not self._busy:
            self._idle.set()

    async def _run_batch(self, batch: list[Item], solo: bool, held: int) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            logits, scores, predicted = await loop.run_in_executor(
                self._executor, self._compute, [i.seq for i in batch], solo
            )
        except Exception as exc:  # one bad batch fails its own requests, never the server
            log.exception("inference batch of %d failed", len(batch))
            self.metrics.batch_failures.inc()
            self.stats.fail(len({id(i.job) for i in batch}), time.perf_counter() - started)
            for item in batch:
                item.job.fail(InferenceFailed(f"inference failed: {exc}"))
            return
        finally:
            self._busy -= 1
            self.device.busy -= 1
            for _ in range(held):
                self.device.slots.release()
            self._check_idle()
        ended = time.perf_counter()
        elapsed = ended - started
        rate = len(batch) / elapsed * (1 if solo else self.device.workers)
        self._rate = 0.8 * self._rate + 0.2 * rate if self._rate else rate
        self.stats.execution(len(batch), elapsed)
        if self.on_batch_span is not None:
            links = list({item.job.link for item in batch if item.job.link is not None})
            self.on_batch_span(len(batch), started, ended, links)
        for i, item in enumerate(batch):
            job = item.job
            if job.future.done():
                continue
            if len(job.seqs) == 1:  # the common case: views of the batch's rows, no copy
                job.logits, job.scores, job.predicted = logits[i : i + 1], scores[i : i + 1], [predicted[i]]
            else:
                if job.logits is None or job.scores is None:
                    job.logits = np.empty((len(job.seqs), logits.shape[1]), np.float32)
                    job.scores = np.empty_like(job.logits)
                    job.predicted = [[] for _ in job.seqs]
                job.logits[item.row] = logits[i]
                job.scores[item.row] = scores[i]
                job.predicted[item.row] = predicted[i]
            job.inference_s = max(job.inference_s, elapsed)
            if not job.batches or job.batches[-1][1] != started:
                job.batches.append((len(batch), started, ended))
            job.remaining -= 1
            if job.remaining == 0:
                if job.timer is not None:
                    job.timer.cancel()
                job.future.set_result(job)
                self.stats.success(len(job.seqs), time.monotonic() - job.enqueued, job.queue_s, job.inference_s)

    def _take_batch(self) -> list[Item]:
        """Pick the next batch from the look-ahead window of live sequences; keep the rest in order.

        Only the head of the queue is examined: dead sequences (timed out, failed on another row, client gone)
        are dropped as the window reaches them, so forming a batch costs O(window), not O(queue). Scanning the
        whole queue for every batch made a deep queue quadratic: with 64 clients x 8 texts (512 queued, batches
        of <= 24) it was 16% of the event loop's samples.
        """
        now = time.monotonic()
        queue = self._queue
        lookahead = self.policy.batch_lookahead
        window: list[Item] = []
        scanned = 0
        for item in queue:
            if len(window) == lookahead:
                break
            scanned += 1
            if self._alive(item.job, now):  # a dead job's other rows find its future done: counted once
                window.append(item)
        chosen: list[Item] = []
        if window:
            picked = sorted(select_batch([len(item.seq) for item in window], self.policy))
            chosen = [window[i] for i in picked]
            taken = set(picked)
            window = [item for i, item in enumerate(window) if i not in taken]
        self._queue = window + queue[scanned:] if window else queue[scanned:]
        queue_hist = self.metrics.queue_duration
        for item in chosen:
            waited = now - item.job.enqueued
            item.job.queue_s = max(item.job.queue_s, waited)
            queue_hist.observe(waited)
        self.metrics.queue_depth.set(len(self._queue))
        return chosen

    def _alive(self, job: Job, now: float) -> bool:
        """False (and the job failed, counted) when it timed out or its client went away; False when done."""
        if job.future.done():  # timed out, or failed on another row
            return False
        if job.gone is not None and job.gone():
            self.metrics.rejected_disconnected.inc()
            job.fail(Disconnected())
            return False
        if job.deadline <= now:
            self._expire(job)
            return False
        return True

    def _compute(self, sequences: list[TokenSeq], solo: bool) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Runs in a worker thread: the session, then the head (scores and predicted labels) for the batch."""
        started = time.perf_counter()
        logits = self.backend.run(sequences, solo=solo)
        scores, predicted = self.post(logits)
        if self.on_batch is not None:
            with self._on_batch_lock:
                self.on_batch(scores, predicted)
        m = self.metrics
        m.inference_duration.observe(time.perf_counter() - started)
        real = sum(len(s) for s in sequences)
        padded = len(sequences) * max(len(s) for s in sequences)
        m.batch_size.observe(len(sequences))
        m.batch_tokens.observe(padded)
        m.batch_padding.observe(padded / real)
        return logits, scores, predicted


@dataclass(slots=True)
class BatchStats:
    """Counters in Triton's model statistics terms (durations in seconds; reported as ns)."""

    success_count: int = 0
    success_s: float = 0.0
    fail_count: int = 0
    fail_s: float = 0.0
    queue_count: int = 0
    queue_s: float = 0.0
    compute_count: int = 0
    compute_s: float = 0.0
    inference_count: int = 0  # inputs computed
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0

    def success(self, inputs: int, total_s: float, queue_s: float, compute_s: float) -> None:
        self.success_count += 1
        self.success_s += total_s
        self.queue_count += 1
        self.queue_s += queue_s
        self.compute_count += 1
        self.compute_s += compute_s
        self.inference_count += inputs
        self.last_inference_ms = int(time.time() * 1000)

    def fail(self, requests: int, seconds: float) -> None:
        self.fail_count += requests
        self.fail_s += seconds * requests

    def execution(self, size: int, seconds: float) -> None:
        self.execution_count += 1
