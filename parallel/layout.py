"""Who is in which sharding group and replica group (2D sparse parallelism).

With world size ``W`` and sharding-group size ``S`` there are ``M = W / S`` replica groups.
TorchRec's ``DMPCollection`` convention (the default, intra-node all-reduce): with
``step = M``, rank ``r``'s sharding group is ``{r mod step + i·step : i < S}`` and its
replica group is the contiguous block ``{⌊r/step⌋·step + j : j < step}`` — replicas sit
next to each other (same host), so the per-step weight sync stays on fast links, while
the embedding all-to-all spans hosts. Example W=4, S=2: sharding groups [0,2] and [1,3],
replica groups [0,1] and [2,3].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    sharding_group_size: int  # S
    strategy: str = "2d"

    def __post_init__(self) -> None:
        if self.sharding_group_size <= 0 or self.world_size % self.sharding_group_size:
            raise ValueError(f"sharding group size {self.sharding_group_size} does not divide the world size {self.world_size}")

    @property
    def num_replica_groups(self) -> int:
        """M: how many copies of every embedding table exist."""
        return self.world_size // self.sharding_group_size

    def sharding_groups(self) -> List[List[int]]:
        step = self.num_replica_groups
        return [[g + i * step for i in range(self.sharding_group_size)] for g in range(step)]

    def replica_groups(self) -> List[List[int]]:
        step = self.num_replica_groups
        return [[b * step + j for j in range(step)] for b in range(self.sharding_group_size)]

    def replica_group_of(self, rank: int) -> List[int]:
        return next(g for g in self.replica_groups() if rank in g)

    def describe(self) -> str:
        if self.strategy == "1d":
            return f"1D sparse: every table sharded over all {self.world_size} ranks (no replicas)"
        return (
            f"2D sparse: {self.world_size} ranks = {self.num_replica_groups} replica groups x sharding groups of "
            f"{self.sharding_group_size}\n  sharding groups (tables sharded within): {self.sharding_groups()}\n"
            f"  replica groups (weights averaged across): {self.replica_groups()}"
        )
