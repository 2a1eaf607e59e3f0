"""Configuration of the parallel package: sparse (1D/2D) and dense (DDP/FSDP) parallelism
(``JobConfig.parallel``), composed into the job config by ``kunlun.trainer.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from kunlun.common import check, check_choice

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_column_wise", "table_row_wise", "data_parallel")
# TorchRec 1.8 DMPCollection supports these for 2D
SHARDING_TYPES_2D = ("table_wise", "row_wise", "column_wise")


COMM_PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


@dataclass
class SparseParallelConfig:
    """How embedding tables are distributed (``kunlun.parallel.sparse``)."""

    strategy: str = "1d"  # 1d: shard over all ranks | 2d: shard within groups, replicate across
    sharding_group_size: int = 0  # 2d: ranks per sharding group (divides the world size); 0 = world
    # 2d: combine replicas (weights + AdaGrad state) every N steps; 0 = never. 4: NE equal to
    # every step within the seed spread on synthetic and MovieLens (periods 1-16 alike, 64+
    # worse; BENCHMARKS.md "2D replica sync"), a quarter of the syncs
    sync_every_n_steps: int = 4
    # 2d: what a sync averages: touched = only the rows some replica looked up since the last
    # sync (parallel/touched_sync.py; bitwise the full sync's result, 3.6x its speed on the
    # 4-rank CPU job of BENCHMARKS.md) | full = every local row (TorchRec's DMPCollection.sync)
    sync: str = "touched"
    # 2d: how replicas are combined at a sync: mean (TorchRec's average) | sum_delta (add every
    # replica's change since the last sync; needs sync=touched; see parallel/touched_sync.py)
    sync_reduce: str = "mean"
    # 2d: where replica groups sit. intra_node (TorchRec's default): replicas on one host, the
    # sync on the fast link, sharding groups across hosts | inter_node: the reverse
    replica_placement: str = "intra_node"
    momentum_scaling: bool = True  # 2d: scale the sparse lr and eps by sqrt(#replica groups)
    # Sharding types the planner may choose from; empty = the fused types (no data_parallel).
    sharding_types: List[str] = field(default_factory=list)
    # Precision of the embedding all-to-all / reduce-scatter (forward and backward), through
    # TorchRec's qcomm codecs: fp32 (no codec) | bf16 | fp16 | fp8 (fp8: CUDA only)
    comm_precision: str = "fp32"

    def __post_init__(self) -> None:
        check_choice(self, "comm_precision", COMM_PRECISIONS)
        check_choice(self, "strategy", ("1d", "2d"))
        check(self, self.sharding_group_size >= 0, "sharding_group_size", "an integer >= 0 (0 = the world size)")
        check_choice(self, "sync", ("full", "touched"))
        check_choice(self, "replica_placement", ("intra_node", "inter_node"))
        check_choice(self, "sync_reduce", ("mean", "sum_delta"))
        if self.sync_reduce == "sum_delta":
            check(self, self.sync == "touched", "sync_reduce", "mean unless parallel.sparse.sync=touched (sum_delta tracks the rows it adds up)")
        check(self, self.sync_every_n_steps >= 0, "sync_every_n_steps", "an integer >= 0 (0 = never)")
        check(self, all(t in SHARDING_TYPES for t in self.sharding_types), "sharding_types", f"a list drawn from {list(SHARDING_TYPES)}")
        if self.strategy == "2d":
            check(
                self,
                set(self.sharding_types) <= set(SHARDING_TYPES_2D),
                "sharding_types",
                f"with strategy=2d only {', '.join(SHARDING_TYPES_2D)} (TorchRec 1.8 DMPCollection)",
            )


@dataclass
class DenseParallelConfig:
    strategy: str = "ddp"  # ddp: replicate the dense tower | fsdp: FSDP2 fully_shard it

    def __post_init__(self) -> None:
        check_choice(self, "strategy", ("ddp", "fsdp"))


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    sparse: SparseParallelConfig = field(default_factory=SparseParallelConfig)
    dense: DenseParallelConfig = field(default_factory=DenseParallelConfig)

    def __post_init__(self) -> None:
        check_choice(self, "backend", ("auto", "gloo", "nccl"))
