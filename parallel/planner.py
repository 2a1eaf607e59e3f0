"""Sharders, planner constraints and the printed sharding plan.

Embedding tables train with FBGEMM's fused ``EXACT_ROWWISE_ADAGRAD`` (the update runs
inside the backward pass of the TBE kernel), configured through the sharders'
``fused_params``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan

# Fused (optimizer-in-backward) types; data_parallel would hand tables to the dense optimizer.
DEFAULT_SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "table_column_wise"]
# 2D (DMPCollection): TorchRec 1.8 supports TW/RW/CW; with table_column_wise a rank of the
# sharding group that holds no shard of a table fails in DTensor.from_local ("Found
# shape:None", seen intermittently when the planner ties TW and TWCW), and TWRW is
# unsupported (torchrec#2554).
SHARDING_TYPES_2D = ["table_wise", "row_wise", "column_wise"]


class CpuCapableEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Offers row-wise (and table-row-wise) sharding on CPU too.

    Stock TorchRec lists RW/TWRW/GRID only for ``cuda`` compute devices, although the CPU
    TBE kernels and gloo collectives run them (verified with the pinned CPU stack: RW trains
    and checkpoints on CPU/gloo; the stock planner fails with "No available sharding type"). On CUDA this
    is the stock sharder.
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        if compute_device_type == "cpu":
            return super().sharding_types("cuda")
        return super().sharding_types(compute_device_type)


def fused_params(optim_cfg, lr_scale: float = 1.0, eps_scale: float = 1.0) -> Dict:
    """Fused row-wise AdaGrad settings; the scales implement 2D momentum scaling (sparse.py)."""
    return {
        "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "learning_rate": optim_cfg.sparse_lr * lr_scale,
        "eps": optim_cfg.sparse_eps * eps_scale,
    }


def qcomm_registry(comm_precision: str):
    """TorchRec's quantized-communication codecs for ``parallel.sparse.comm_precision`` (the
    same precision forward and backward), or None for fp32 (no codec, no conversion)."""
    if comm_precision == "fp32":
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

    kind = {"bf16": CommType.BF16, "fp16": CommType.FP16, "fp8": CommType.FP8}[comm_precision]
    return get_qcomm_codecs_registry(QCommsConfig(forward_precision=kind, backward_precision=kind))


def build_sharders(optim_cfg, lr_scale: float = 1.0, eps_scale: float = 1.0, comm_precision: str = "fp32") -> List[ModuleSharder]:
    fp = fused_params(optim_cfg, lr_scale, eps_scale)
    codecs = qcomm_registry(comm_precision)
    return [
        CpuCapableEmbeddingBagCollectionSharder(fused_params=fp, qcomm_codecs_registry=codecs),
        EmbeddingCollectionSharder(fused_params=fp, qcomm_codecs_registry=codecs),
    ]


def build_constraints(table_names: List[str], sharding_types: Optional[List[str]]) -> Dict[str, ParameterConstraints]:
    allowed = list(sharding_types) if sharding_types else DEFAULT_SHARDING_TYPES
    return {t: ParameterConstraints(sharding_types=allowed) for t in table_names}


def plan_sharding(
    model: torch.nn.Module,
    sharders: List[ModuleSharder],
    table_names: List[str],
    sharding_types: Optional[List[str]],
    device: torch.device,
    world_size: int,
    local_world_size: int,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """Run TorchRec's planner on every rank and agree on rank 0's plan (``collective_plan``)."""
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=build_constraints(table_names, sharding_types))
    if pg is None:
        return planner.plan(model, sharders)
    return planner.collective_plan(model, sharders, pg)


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: module, table, sharding type, kernel, ranks holding shards."""
    lines = [f"  {'module':<6} {'table':<22} {'sharding':<18} {'kernel':<8} ranks"]
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, ps in sorted(module_plan.items()):  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            lines.append(f"  {module_path:<6} {table:<22} {ps.sharding_type:<18} {ps.compute_kernel:<8} {ranks}")
    return "\n".join(lines)
