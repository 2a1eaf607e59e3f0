"""Wrap a ``RecModel`` in TorchRec's ``DistributedModelParallel`` (1D sparse parallelism).

Embedding tables are sharded over all ranks by the planner's plan; the dense tower is
replicated with DDP (DMP's default data-parallel wrapper). The same code runs with gloo
on CPU and NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from kunlun.parallel.planner import build_sharders, plan_sharding


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    plan: ShardingPlan


def table_names(model: torch.nn.Module) -> List[str]:
    names = [c.name for c in model.ebc.embedding_bag_configs()]
    names += [c.name for c in model.ec.embedding_configs()]
    return names


def shard_model(model: torch.nn.Module, parallel_cfg, optim_cfg, device: torch.device) -> ShardedModel:
    """Plan (collectively) and shard ``model``; embeddings may be on ``meta``."""
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    sharders = build_sharders(optim_cfg)
    plan = plan_sharding(
        model,
        sharders,
        table_names(model),
        list(parallel_cfg.sharding_types),
        device,
        world_size=world,
        local_world_size=local_world,
        pg=dist.GroupMember.WORLD,
    )
    dmp = DistributedModelParallel(
        module=model,
        device=device,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        plan=plan,
        sharders=sharders,
    )
    return ShardedModel(dmp=dmp, plan=plan)
