"""The batch policy (which sequences go together) and the batcher's admission rules, without HTTP."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, BatchPolicy, DeadlineExceeded, Draining, QueueFull, select_batch
from service.metrics import Metrics
from service.runtime import Output


def test_batch_always_holds_the_oldest_and_groups_similar_lengths() -> None:
    lengths = [50, 10, 12, 48, 11, 52, 49, 9]
    picked = select_batch(lengths, BatchPolicy(max_batch_size=4, max_batch_tokens=10_000))
    assert 0 in picked
    assert sorted(lengths[i] for i in picked) == [48, 49, 50, 52]


def test_shorter_neighbours_are_preferred_because_they_pad_only_themselves() -> None:
    lengths = [20, 19, 30]
    assert sorted(select_batch(lengths, BatchPolicy(max_batch_size=2, max_batch_tokens=10_000))) == [0, 1]


def test_token_budget_bounds_padded_tokens() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(3, 200) for _ in range(rng.randint(1, 80))]
        policy = BatchPolicy(max_batch_size=rng.randint(1, 64), max_batch_tokens=rng.randint(200, 4000))
        picked = select_batch(lengths, policy)
        assert 0 in picked and len(set(picked)) == len(picked)
        assert len(picked) <= policy.max_batch_size
        padded = len(picked) * max(lengths[i] for i in picked)
        assert padded <= policy.max_batch_tokens or len(picked) == 1  # a lone sequence always runs


def test_padding_ratio_bounds_padded_per_real_token() -> None:
    rng = random.Random(2)
    for _ in range(200):
        lengths = [rng.randint(3, 200) for _ in range(rng.randint(1, 80))]
        policy = BatchPolicy(max_batch_size=64, max_batch_tokens=100_000, max_padding_ratio=rng.uniform(1, 2))
        picked = select_batch(lengths, policy)
        real = sum(lengths[i] for i in picked)
        assert len(picked) * max(lengths[i] for i in picked) <= policy.max_padding_ratio * real + 1e-9
    # a loose ratio lets a mixed window go together; the default splits short from long
    mixed = [10, 11, 12, 150, 160]
    assert len(select_batch(mixed, BatchPolicy(max_padding_ratio=10.0, max_batch_tokens=4096))) == 5
    assert sorted(select_batch(mixed, BatchPolicy())) == [0, 1, 2]


def test_sorted_grouping_pads_far_less_than_arrival_order() -> None:
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(100, 200)]) for _ in range(128)]
    policy = BatchPolicy(max_batch_size=16, max_batch_tokens=100_000, max_padding_ratio=100.0)
    remaining = list(range(len(lengths)))
    padded = 0
    while remaining:
        picked = select_batch([lengths[i] for i in remaining], policy)
        chosen = [remaining[i] for i in picked]
        padded += len(chosen) * max(lengths[i] for i in chosen)
        remaining = [i for i in remaining if i not in chosen]
    arrival = sum(16 * max(lengths[i : i + 16]) for i in range(0, 128, 16))
    assert padded / sum(lengths) < 1.3 < arrival / sum(lengths)


class EchoBackend:
    """A real (if trivial) backend: logits are the sequence length, so results can be checked per sequence."""

    def __init__(self, delay: float = 0.0, can_run_solo: bool = False) -> None:
        self.delay = delay
        self.can_run_solo = can_run_solo
        self.batches: list[int] = []
        self.solo: list[bool] = []
        self.running = 0
        self.most_running = 0
        self.overlapped_solo = False
        self._lock = threading.Lock()

    def run(self, sequences: list[np.ndarray], solo: bool = False) -> list[Output]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.overlapped_solo |= solo and self.running > 1
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
            self.overlapped_solo |= solo and self.running > 0
            self.batches.append(len(sequences))
            self.solo.append(solo)
        return [Output(np.array([len(s)], np.float32), np.array([1.0], np.float32)) for s in sequences]


def test_results_come_back_to_their_own_requests_and_batches_form() -> None:
    async def main() -> None:
        backend = EchoBackend(delay=0.01)
        batcher = Batcher(backend, BatchPolicy(max_batch_size=8), Metrics())
        batcher.start()
        deadline = asyncio.get_running_loop().time() + 1e9
        lengths = [random.Random(i).randint(1, 50) for i in range(64)]
        futures = [batcher.submit([np.zeros(n, np.int64)], deadline)[0] for n in lengths]
        outputs = await asyncio.gather(*futures)
        assert [int(o.logits[0]) for o in outputs] == lengths
        assert max(backend.batches) > 1 and sum(backend.batches) == 64
        await batcher.close()

    asyncio.run(main())


def test_queue_bound_deadline_and_drain() -> None:
    async def main() -> None:
        batcher = Batcher(EchoBackend(delay=0.05), BatchPolicy(max_batch_size=1, max_queue=3, workers=1), Metrics())
        batcher.start()
        far = time.monotonic() + 60
        with pytest.raises(QueueFull):
            batcher.submit([np.zeros(3, np.int64)] * 4, far)
        first = batcher.submit([np.zeros(3, np.int64)], far)
        expired = batcher.submit([np.zeros(3, np.int64)], time.monotonic() + 0.01)
        assert (await first[0]).logits[0] == 3
        with pytest.raises(DeadlineExceeded):
            await expired[0]
        pending = batcher.submit([np.zeros(5, np.int64)], far)
        await batcher.drain()
        assert pending[0].done() and pending[0].result().logits[0] == 5
        with pytest.raises(Draining):
            batcher.submit([np.zeros(3, np.int64)], far)
        await batcher.close()

    asyncio.run(main())


def test_a_lone_batch_runs_solo_and_load_runs_on_every_worker() -> None:
    """Solo batches use the wide session and never share the CPU with another batch; queued load is spread."""

    async def main() -> None:
        backend = EchoBackend(delay=0.02, can_run_solo=True)
        batcher = Batcher(backend, BatchPolicy(max_batch_size=2, workers=2), Metrics())
        batcher.start()
        far = time.monotonic() + 60
        for n in (3, 4, 5):  # one client at a time: each batch runs alone
            assert (await batcher.submit([np.zeros(n, np.int64)], far)[0]).logits[0] == n
        assert backend.solo == [True, True, True]
        futures = [batcher.submit([np.zeros(n, np.int64)], far)[0] for n in range(1, 21)]
        assert [int(o.logits[0]) for o in await asyncio.gather(*futures)] == list(range(1, 21))
        assert backend.most_running == 2 and not backend.overlapped_solo
        assert backend.solo[3:].count(False) >= 8  # the queue was deep: batches ran two at a time
        await batcher.close()

    asyncio.run(main())
