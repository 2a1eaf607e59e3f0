"""Who is in which sharding group and replica group (2D sparse parallelism).

With world size ``W`` and sharding-group size ``S`` there are ``M = W / S`` replica groups.
TorchRec's ``DMPCollection`` convention (the default, intra-node all-reduce): with
``step = M``, rank ``r``'s sharding group is ``{r mod step + i·step : i < S}`` and its
replica group is the contiguous block ``{⌊r/step⌋·step + j : j < step}`` — replicas sit
next to each other (same host), so the per-step weight sync stays on fast links, while
the embedding all-to-all spans hosts. Example W=4, S=2: sharding groups [0,2] and [1,3],
replica groups [0,1] and [2,3].

``placement="inter_node"`` is TorchRec's other layout (``use_inter_host_allreduce``):
sharding groups are contiguous blocks ``{⌊r/S⌋·S + i : i < S}`` (the all-to-all stays on a
host when ``S`` ≤ ranks per host) and replica groups are strided ``{r mod S + k·S : k < M}``
(the sync crosses hosts). W=4, S=2: sharding groups [0,1] and [2,3], replica groups [0,2]
and [1,3]. Choose it when the all-to-all outweighs the sync (rare syncs, touched-rows sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    sharding_group_size: int  # S
    strategy: str = "2d"
    placement: str = "intra_node"  # where replica groups sit: intra_node (default) | inter_node
    local_world_size: int = 0  # ranks per host, to say which hosts a group spans (0: unknown)

    def __post_init__(self) -> None:
        if self.sharding_group_size <= 0 or self.world_size % self.sharding_group_size:
            raise ValueError(f"sharding group size {self.sharding_group_size} does not divide the world size {self.world_size}")
        if self.placement not in ("intra_node", "inter_node"):
            raise ValueError(f"replica placement {self.placement!r}: expected intra_node or inter_node")

    @property
    def inter_node(self) -> bool:
        return self.placement == "inter_node"

    @property
    def num_replica_groups(self) -> int:
        """M: how many copies of every embedding table exist."""
        return self.world_size // self.sharding_group_size

    def sharding_groups(self) -> List[List[int]]:
        s, step = self.sharding_group_size, self.num_replica_groups
        if self.inter_node:
            return [[b * s + i for i in range(s)] for b in range(step)]
        return [[g + i * step for i in range(s)] for g in range(step)]

    def replica_groups(self) -> List[List[int]]:
        s, step = self.sharding_group_size, self.num_replica_groups
        if self.inter_node:
            return [[i + k * s for k in range(step)] for i in range(s)]
        return [[b * step + j for j in range(step)] for b in range(s)]

    def hosts_of(self, group: List[int]) -> List[int]:
        """Host indices (rank // ranks per host) a group of ranks spans."""
        n = self.local_world_size or self.world_size
        return sorted({r // n for r in group})

    def replica_group_of(self, rank: int) -> List[int]:
        return next(g for g in self.replica_groups() if rank in g)

    def describe(self) -> str:
        if self.strategy == "1d":
            return f"1D sparse: every table sharded over all {self.world_size} ranks (no replicas)"
        spans = [len(self.hosts_of(g)) for g in self.replica_groups()]
        if not self.local_world_size:
            where = "hosts unknown"
        elif max(spans) == 1:
            where = f"each within one host of {self.local_world_size} ranks: the sync uses the intra-host link"
        else:
            where = f"spanning up to {max(spans)} hosts of {self.local_world_size} ranks: the sync crosses hosts"
        return (
            f"2D sparse: {self.world_size} ranks = {self.num_replica_groups} replica groups x sharding groups of "
            f"{self.sharding_group_size} (replica placement {self.placement})\n"
            f"  sharding groups (tables sharded within): {self.sharding_groups()}\n"
            f"  replica groups (weights averaged across): {self.replica_groups()} ({where})"
        )
