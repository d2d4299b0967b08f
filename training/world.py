"""This process's place among the training processes, as ``torchrun`` describes it (no torch import needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from training.errors import TrainingError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process, world size 1, without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    @classmethod
    def from_env(cls) -> World:
        """Read torchrun's variables; a malformed one is an error, not a silent single-process run."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        except ValueError as exc:
            raise TrainingError(f"torchrun environment: {exc}") from None
        if not 0 <= rank < size:
            raise TrainingError(f"torchrun environment: RANK {rank} is not within WORLD_SIZE {size}")
        return cls(rank, size, local_rank, local_size)
