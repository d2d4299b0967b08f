"""The dynamic batcher: a bounded queue, one scheduler task that owns it, a few inference worker threads.

Design (after text-embeddings-inference's queue and Infinity's batch handler):
- Only the scheduler task touches the queue and only on the event loop, so there are no locks.
- While a batch computes in the worker thread, requests keep arriving; when the worker frees, the scheduler
  forms the next batch from a look-ahead window of the oldest queued sequences. The batch always contains
  the oldest sequence (so nothing starves) and grows with the sequences whose lengths add the least padding,
  bounded by max_batch_size sequences and max_batch_tokens padded tokens. On a CPU, batching only pays when
  lengths are grouped: batches in arrival order pad to ~2.5x the real tokens and run slower than batch 1.
- Expired and abandoned sequences are dropped when a batch is formed, so they cost no compute.
- Under load, ``workers`` batches compute at once on single-threaded sessions (keeps every core busy); a batch
  that would run alone (no other batch computing, nothing else queued) runs "solo" on the backend's wide session
  with every core and holds every worker slot meanwhile, so a lone client gets the lowest latency and the
  cores are never oversubscribed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.metrics import Metrics
from service.runtime import Output

log = logging.getLogger("bertserve.batching")


class QueueFull(Exception):
    """The queue cannot take the request's sequences; the client should retry after ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The batcher no longer accepts work (shutdown or model swap in progress)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its sequences were computed."""


class InferenceFailed(Exception):
    """The batch holding this sequence raised in the model runtime; only that batch's requests fail."""


class Backend(Protocol):
    @property
    def can_run_solo(self) -> bool: ...

    def run(self, sequences: list[np.ndarray], solo: bool = False) -> list[Output]: ...


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int = 8
    max_batch_tokens: int = 384
    max_padding_ratio: float = 1.25
    max_wait_s: float = 0.0
    lookahead: int = 24
    max_queue: int = 1024
    workers: int = 2


@dataclass(slots=True, eq=False)
class Item:
    ids: np.ndarray
    future: asyncio.Future[Output]
    deadline: float
    enqueued: float


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


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("batch scheduler died; requests will time out", exc_info=task.exception())


class Batcher:
    """Owns the queue and the worker thread for one model runtime."""

    def __init__(self, backend: Backend, policy: BatchPolicy, metrics: Metrics) -> None:
        self.backend = backend
        self.policy = policy
        self.metrics = metrics
        self.accepting = False
        self._queue: list[Item] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(max_workers=policy.workers, thread_name_prefix="bertserve-infer")
        self._slots = asyncio.Semaphore(policy.workers)
        self._running: set[asyncio.Task[None]] = set()  # batches in the workers, for close()
        self._busy = 0
        self._task: asyncio.Task[None] | None = None
        self._rate = 0.0  # EWMA of sequences/s, for Retry-After

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
            if not item.future.done():
                item.future.set_exception(Draining("server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=False)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- admission -------------------------------------------------------------------------------------
    def check_room(self, n: int) -> None:
        """Raise QueueFull now if ``n`` more sequences cannot be queued: refusing costs no tokenization."""
        if len(self._queue) + n > self.policy.max_queue:
            self._queue = [item for item in self._queue if not item.future.done()]  # abandoned ones hold no slot
        if len(self._queue) + n > self.policy.max_queue:
            raise QueueFull(self._retry_after())

    def submit(self, sequences: list[np.ndarray], deadline: float) -> list[asyncio.Future[Output]]:
        """Queue a request's sequences; all or none are admitted."""
        if not self.accepting:
            raise Draining("server is draining")
        self.check_room(len(sequences))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [Item(ids, loop.create_future(), deadline, now) for ids in sequences]
        self._queue.extend(items)
        self._idle.clear()
        self._wakeup.set()
        return [item.future for item in items]

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
                remaining = self._queue[0].enqueued + self.policy.max_wait_s - time.monotonic()
                if remaining > 0 and self.accepting:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        pass
                    else:
                        continue
            # Form the batch only once a worker is free: the later it forms, the more sequences it can choose from.
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            solo = self.backend.can_run_solo and self._busy == 0 and not self._queue
            held = 1
            if solo:  # nothing computes, so every slot is free and these acquires return at once
                for _ in range(self.policy.workers - 1):
                    await self._slots.acquire()
                held = self.policy.workers
            self._busy += 1
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
            outputs = await loop.run_in_executor(self._executor, self._compute, [i.ids for i in batch], solo)
        except Exception as exc:  # one bad batch fails its own requests, never the server
            log.exception("inference batch of %d failed", len(batch))
            self.metrics.batch_failures.inc()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"inference failed: {exc}"))
            return
        finally:
            self._busy -= 1
            for _ in range(held):
                self._slots.release()
            self._check_idle()
        elapsed = time.perf_counter() - started
        rate = len(batch) / elapsed * (1 if solo else self.policy.workers)
        self._rate = 0.8 * self._rate + 0.2 * rate if self._rate else rate
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)

    def _take_batch(self) -> list[Item]:
        """Drop dead sequences, pick the next batch from the look-ahead window, keep the rest in order."""
        now = time.monotonic()
        live: list[Item] = []
        for item in self._queue:
            if item.future.done():  # the request was cancelled (client gone or request timed out)
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(item)
        window = live[: self.policy.lookahead]
        chosen: list[Item] = []
        if window:
            picked = select_batch([len(item.ids) for item in window], self.policy)
            chosen = [window[i] for i in sorted(picked)]
            taken = set(chosen)  # Items hash by identity
            live = [item for item in live if item not in taken]
        self._queue = live
        queue_hist = self.metrics.queue_duration
        for item in chosen:
            queue_hist.observe(now - item.enqueued)
        return chosen

    def _compute(self, sequences: list[np.ndarray], solo: bool) -> list[Output]:
        """Runs in the worker thread."""
        started = time.perf_counter()
        outputs = self.backend.run(sequences, solo=solo)
        m = self.metrics
        m.inference_duration.observe(time.perf_counter() - started)
        real = sum(len(s) for s in sequences)
        padded = len(sequences) * max(len(s) for s in sequences)
        m.batch_size.observe(len(sequences))
        m.batch_tokens.observe(padded)
        m.batch_padding.observe(padded / real)
        return outputs
