"""Data parallelism for the dense tower: DDP (TorchRec's default wrapper) or FSDP2.

``FSDPDenseWrapper`` is handed to ``DistributedModelParallel`` / ``DMPCollection`` as the
``data_parallel_wrapper``: after the embedding tables are sharded, it applies FSDP2
``fully_shard`` to every child of the wrapped model that holds no sharded embedding
module (the dense tower), over a 1D mesh of all ranks. The root, which holds the sharded
tables, is never wrapped (FSDP would try to flatten the sharded tables).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchrec.distributed.model_parallel import DataParallelWrapper
from torchrec.distributed.types import ShardedModule


def _holds_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(m, ShardedModule) for m in module.modules())


class FSDPDenseWrapper(DataParallelWrapper):
    def wrap(self, dmp, env, device: torch.device) -> None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        root = dmp._dmp_wrapped_module
        for _name, child in root.named_children():
            if _holds_sharded(child) or not any(p.requires_grad for p in child.parameters()):
                continue
            fully_shard(child, mesh=mesh)
