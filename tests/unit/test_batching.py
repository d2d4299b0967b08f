"""The batch policy (which sequences go together) and the batcher's admission rules, without HTTP."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, Job, select_batch
from service.config import BatchPolicy
from service.errors import DeadlineExceeded, Disconnected, Draining, QueueFull
from service.metrics import Metrics
from service.modelio import Head, TokenSeq

HEAD = Head(("a", "b"))


def post(logits: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    scores = HEAD.scores(logits)
    return scores, HEAD.predict(scores)


def make_batcher(backend: EchoBackend, policy: BatchPolicy) -> Batcher:
    return Batcher(backend, policy, Metrics().for_model("m", "1"), post)


def seq(n: int) -> list[TokenSeq]:
    return [TokenSeq(np.zeros(n, np.int64), n)]


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

    def run(self, sequences: list[TokenSeq], solo: bool = False) -> np.ndarray:
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
        return np.array([[len(s), 0.0] for s in sequences], np.float32)


def test_results_come_back_to_their_own_requests_and_batches_form() -> None:
    async def main() -> None:
        backend = EchoBackend(delay=0.01)
        batcher = make_batcher(backend, BatchPolicy(max_batch_size=8))
        batcher.start()
        deadline = time.monotonic() + 60
        lengths = [random.Random(i).randint(1, 50) for i in range(64)]
        futures = [batcher.submit(seq(n), deadline) for n in lengths]
        jobs: list[Job] = await asyncio.gather(*futures)
        assert [int(j.logits[0, 0]) for j in jobs] == lengths  # type: ignore[index]
        # a request of several inputs resolves once, with its rows in order
        many = await batcher.submit([TokenSeq(np.zeros(n, np.int64), n) for n in (7, 3, 9)], deadline)
        assert many.logits[:, 0].tolist() == [7, 3, 9] and len(many.predicted) == 3  # type: ignore[index]
        assert max(backend.batches) > 1 and sum(backend.batches) == 64 + 3
        await batcher.close()

    asyncio.run(main())


def test_queue_bound_deadline_and_drain() -> None:
    async def main() -> None:
        batcher = make_batcher(EchoBackend(delay=0.05), BatchPolicy(max_batch_size=1, max_queue=3, inference_workers=1))
        batcher.start()
        far = time.monotonic() + 60
        with pytest.raises(QueueFull):
            batcher.submit(seq(3) * 4, far)
        first = batcher.submit(seq(3), far)
        expired = batcher.submit(seq(3), time.monotonic() + 0.01)
        assert (await first).logits[0, 0] == 3  # type: ignore[index]
        with pytest.raises(DeadlineExceeded):
            await expired
        pending = batcher.submit(seq(5), far)
        await batcher.drain()
        assert pending.done() and pending.result().logits[0, 0] == 5
        with pytest.raises(Draining):
            batcher.submit(seq(3), far)
        await batcher.close()

    asyncio.run(main())


def test_a_lone_batch_runs_solo_and_load_runs_on_every_worker() -> None:
    """Solo batches use the wide session and never share the CPU with another batch; queued load is spread."""

    async def main() -> None:
        backend = EchoBackend(delay=0.02, can_run_solo=True)
        batcher = make_batcher(backend, BatchPolicy(max_batch_size=2, inference_workers=2))
        batcher.start()
        far = time.monotonic() + 60
        for n in (3, 4, 5):  # one client at a time: each batch runs alone
            assert (await batcher.submit(seq(n), far)).logits[0, 0] == n  # type: ignore[index]
        assert backend.solo == [True, True, True]
        futures = [batcher.submit(seq(n), far) for n in range(1, 21)]
        jobs = await asyncio.gather(*futures)
        assert [int(j.logits[0, 0]) for j in jobs] == list(range(1, 21))  # type: ignore[index]
        assert backend.most_running == 2 and not backend.overlapped_solo
        assert backend.solo[3:].count(False) >= 8  # the queue was deep: batches ran two at a time
        await batcher.close()

    asyncio.run(main())


def test_a_client_that_went_away_is_dropped_before_compute_and_counted() -> None:
    """The gone() probe is read when a batch forms: the request costs no compute and fails Disconnected."""

    async def main() -> None:
        backend = EchoBackend(delay=0.05)
        metrics = Metrics()
        batcher = Batcher(
            backend, BatchPolicy(max_batch_size=1, inference_workers=1), metrics.for_model("m", "1"), post
        )
        batcher.start()
        far = time.monotonic() + 60
        busy = batcher.submit(seq(2), far)  # occupies the only worker
        await asyncio.sleep(0.01)
        left = batcher.submit(seq(4), far, gone=lambda: True)
        assert (await busy).logits[0, 0] == 2  # type: ignore[index]
        with pytest.raises(Disconnected):
            await left
        assert backend.batches == [1]  # the abandoned request never reached the backend
        assert metrics.rejected.labels("disconnected")._value.get() == 1
        await batcher.close()

    asyncio.run(main())


def test_one_future_per_request_leaves_nothing_unretrieved_on_cancel(caplog: pytest.LogCaptureFixture) -> None:
    """A cancelled waiter (a client that went away mid-request) logs no 'exception was never retrieved'."""

    async def main() -> None:
        batcher = make_batcher(EchoBackend(delay=0.02), BatchPolicy(max_batch_size=4, inference_workers=1))
        batcher.start()
        far = time.monotonic() + 60
        waiters = [asyncio.ensure_future(batcher.submit(seq(3) * 3, far)) for _ in range(8)]
        await asyncio.sleep(0.005)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await batcher.drain()
        await batcher.close()

    asyncio.run(main())
    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_full_queue_makes_room_by_dropping_requests_whose_clients_went_away() -> None:
    """Batches look only at the queue's head; a full queue purges dead rows anywhere before refusing."""

    async def main() -> None:
        batcher = make_batcher(EchoBackend(delay=0.05), BatchPolicy(max_batch_size=1, max_queue=4, inference_workers=1))
        batcher.start()  # its scheduler first runs when this test awaits: the submits below queue together
        far = time.monotonic() + 60
        gone = batcher.submit(seq(3) * 2, far, gone=lambda: True)
        live = batcher.submit(seq(3) * 2, far)
        newcomer = batcher.submit(seq(4) * 2, far)  # 6 > 4 rows: room only once the gone client's rows go
        with pytest.raises(Disconnected):
            await gone
        assert batcher.depth == 4 and not live.done() and not newcomer.done()
        with pytest.raises(QueueFull):
            batcher.submit(seq(3), far)  # live rows only now: refused
        assert (await newcomer).logits[1, 0] == 4  # type: ignore[index]
        await batcher.close()

    asyncio.run(main())
