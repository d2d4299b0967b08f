"""Data-parallel training across processes and machines: plain ``torch.distributed`` launched by ``torchrun``.

Why plain torch.distributed rather than Hugging Face Accelerate: the training loop is ours and small, and what DDP
needs from it is a handful of calls (join the process group, wrap the model, average gradients, share a few
numbers), all here. Accelerate would wrap the same DistributedDataParallel and the same process group, but its
sampler sharding pads with duplicated rows (the evaluation bug this module exists to avoid), its checkpoints do
not know our length-grouped sampler's position, and it would be one more dependency whose defaults decide the
recipe. ``torchrun`` stays the launcher either way, so the command lines are the ones users know.

- :class:`~training.world.World` (what torchrun set: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); with one
  process nothing here touches torch.distributed, so single-process ``fit`` runs exactly as before.
- :func:`partition` splits one global batch (``--batch-size`` rows) into ``world x grad_accum`` slices of similar
  length (sorted by length first): each rank's micro-batches pad little, and every rank gets work of the same
  size, so nobody waits long at the gradient all-reduce. With one process and no accumulation the batch is left
  as it is (same rows, same order: the same result as a plain loop).
- :func:`gather_rows` puts per-rank prediction rows back together: each rank scores a disjoint slice of the
  split and exactly the real rows are gathered, so metrics under DDP are the single-process metrics (no padded
  duplicates, the classic DistributedSampler evaluation error).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from training.errors import TrainingError
from training.world import World

# A collective waits this long for the slowest rank: the per-epoch validation and checkpoint writes happen
# between collectives, so the limit only has to exceed one of those, not data preparation (which uses a file lock).
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def device_for(world: World, requested: torch.device) -> torch.device:
    """Under torchrun on CUDA each process takes the GPU of its local rank; CPU processes share the CPU."""
    if world.distributed and requested.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"local rank {world.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "start torchrun with --nproc-per-node at most the GPU count"
            )
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return requested


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group (NCCL on CUDA, gloo on CPU) for the body; nothing at all for one process."""
    if not world.distributed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: Sequence[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (float64, so sums of losses stay exact enough)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_flag(world: World, flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one decision, e.g. "stop early", taken once)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def partition(batch: Sequence[int], lengths: np.ndarray, world: World, accum: int) -> list[list[int]]:
    """This rank's micro-batches (``accum`` of them) of one global batch; a slice may be empty at the very end.

    Slices are cut from the batch sorted by length (longest first), slice ``k * world + r`` going to rank r's
    micro-step k: at every micro-step the ranks hold rows of similar length.
    """
    slots = world.size * accum
    if slots == 1:
        return [list(batch)]
    ordered = sorted(batch, key=lambda i: -int(lengths[i]))
    slices = np.array_split(np.asarray(ordered, dtype=np.int64), slots)
    return [slices[k * world.size + world.rank].tolist() for k in range(accum)]


def shard(lengths: np.ndarray, world: World) -> np.ndarray:
    """This rank's rows of an evaluation split: every ``world``-th row of the length-sorted order."""
    order = np.argsort(-lengths, kind="stable")
    return order[world.rank :: world.size]


def gather_rows(world: World, local: np.ndarray, n: int, lengths: np.ndarray, device: torch.device) -> np.ndarray:
    """Per-rank predictions of :func:`shard`'s rows back as one [n, ...] array in split order, on every rank.

    Every rank knows every shard's size (they follow from n and the world size), so the padding added for the
    all-gather is cut off exactly: each real row appears once.
    """
    if not world.distributed:
        return local
    order = np.argsort(-lengths, kind="stable")
    longest = -(-n // world.size)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(local).to(device)
    pieces = [torch.zeros_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    out = np.zeros((n, *local.shape[1:]), dtype=np.float32)
    for rank, piece in enumerate(pieces):
        rows = order[rank :: world.size]
        out[rows] = piece[: len(rows)].cpu().numpy()
    return out
