"""Configuration of the parallel package: sparse (1D/2D) and dense (DDP/FSDP) parallelism
(``JobConfig.parallel``), composed into the job config by ``kunlun.trainer.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class SparseParallelConfig:
    """How embedding tables are distributed (``kunlun.parallel.sparse``)."""

    strategy: str = "1d"  # 1d: shard over all ranks | 2d: shard within groups, replicate across
    sharding_group_size: int = 0  # 2d: ranks per sharding group (divides the world size); 0 = world
    sync_every_n_steps: int = 1  # 2d: average replicas (weights + AdaGrad state) every N steps; 0 = never
    momentum_scaling: bool = True  # 2d: scale the sparse lr and eps by sqrt(#replica groups)
    # Sharding types the planner may choose from; empty = the fused types (no data_parallel).
    sharding_types: List[str] = field(default_factory=list)


@dataclass
class DenseParallelConfig:
    strategy: str = "ddp"  # ddp: replicate the dense tower | fsdp: FSDP2 fully_shard it


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    sparse: SparseParallelConfig = field(default_factory=SparseParallelConfig)
    dense: DenseParallelConfig = field(default_factory=DenseParallelConfig)
