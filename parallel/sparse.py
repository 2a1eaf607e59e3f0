"""Shard a ``RecModel``'s embedding tables: 1D (``DistributedModelParallel``) or 2D
(``DMPCollection``: shard within a group, replicate across groups).

1D: every table is sharded over all ``W`` ranks by the planner's plan.

2D: ranks form ``M = W / S`` replica groups of sharding groups of size ``S``
(``kunlun.parallel.layout``). The plan is made for ``S`` ranks and every sharding group
holds a full copy of the tables, so the embedding all-to-all spans only ``S`` ranks while
the dense tower still sees the global batch. Replicas are averaged (weights and AdaGrad
state) by :meth:`ShardedModel.sync` every ``sparse.sync_every_n_steps``.

**Momentum-scaled row-wise AdaGrad** (``sparse.momentum_scaling``, on by default in 2D).
Row-wise AdaGrad keeps, per row, ``v ← v + mean_j g_j²`` and steps ``w ← w − η g/(√v + ε)``.
In 2D each replica sees ``1/M`` of the global batch, so its per-row gradient is the mean
over ``B/M`` examples instead of ``B``: for the noise-dominated regime of sparse rows
``E[g²]`` grows ~M× (the variance of a mean scales with 1/batch), and averaging the
replicas' accumulators at each sync keeps that M× growth. The effective step
``η/√v`` is then ~√M too small and keeps shrinking faster than in 1D. The correction is
to use ``v/M`` in the update, ``η g / (√(v/M) + ε)``. Since FBGEMM computes
``lr·g/(√v + eps)``, setting ``lr = η√M`` and ``eps = ε√M`` gives exactly
``η√M·g/(√v + ε√M) = η g/(√(v/M) + ε)`` with the stored accumulator unchanged (so
checkpoints stay comparable with 1D). Dividing the whole accumulator by M at every
sync would instead shrink it geometrically (v_t ≈ Σ_k M^{k−t} increments) and is not done.

TorchRec's embedding gradient is a *sum* over the sharding group's examples, and a row
seen by only one replica group gets its update and accumulator increment halved by the
averaging sync; with that convention the accumulator does not grow M× faster, so the
scaling matters little there (the measurement is in BENCHMARKS.md, "2D vs 1D quality").
The option stays (on by default, as specified) for loss conventions that normalise per
replica.

CPU: stock ``DMPCollection`` refuses non-CUDA devices and writes CUDA-style shard
placements; :class:`CpuDMPCollection` is the small project class that fixes both (see
its docstring). On CUDA the stock class is used unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.remote_device import _remote_device
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel, DMPCollection
from torchrec.distributed.types import (
    DMPCollectionContext,
    EnumerableShardingSpec,
    ShardingEnv,
    ShardingEnv2D,
    ShardingPlan,
    ShardingStrategy,
)

from kunlun.common import ConfigError
from kunlun.parallel.dense import FSDPDenseWrapper
from kunlun.parallel.layout import ParallelLayout
from kunlun.parallel.planner import SHARDING_TYPES_2D, build_sharders, plan_sharding
from kunlun.parallel.touched_sync import TouchedRowsSync

log = logging.getLogger(__name__)


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    plan: ShardingPlan
    layout: ParallelLayout
    sparse_lr_scale: float = 1.0  # multiply the configured sparse lr by this (momentum scaling)
    sync_every_n_steps: int = 0  # 2D replica sync period (0: never / 1D)
    touched: Optional[TouchedRowsSync] = None  # parallel.sparse.sync=touched: only changed rows

    def tracked_sync_kernels(self) -> List[torch.nn.Module]:
        """The TBE kernels a 2D sync averages (one list per DMPCollection context)."""
        return [kernel for ctx in self.dmp._ctxs for kernel, _ in ctx.modules_to_sync]  # type: ignore[attr-defined]

    @property
    def is_2d(self) -> bool:
        return self.layout.strategy == "2d"

    def sync(self) -> None:
        """Average replica weights and AdaGrad state across replica groups (2D; no-op in 1D)."""
        if self.is_2d and self.layout.num_replica_groups > 1:
            if self.touched is not None:
                self.touched.sync()
            else:
                self.dmp.sync(include_optimizer_state=True)  # type: ignore[attr-defined]

    def maybe_sync(self, step: int) -> bool:
        if self.is_2d and self.sync_every_n_steps and step % self.sync_every_n_steps == 0:
            self.sync()
            return True
        return False


class CpuDMPCollection(DMPCollection):
    """``DMPCollection`` for CPU / gloo (CI and CPU clusters); CUDA uses the stock class.

    Two differences from TorchRec 1.8.0:

    1. The stock ``__init__`` starts with ``assert device.type in ("cuda", "mtia")``. This
       ``__init__`` performs the same steps for the default context only (no submodule
       configs, no sharded relay, no managed-collision tables — kunlun uses none of them):
       process groups from a device mesh, plan remapping, ``ShardingEnv2D``, then
       ``DistributedModelParallel.__init__`` and the sync-tensor caches.
    2. ``_remap_sharding_plan`` writes placements ``rank:r/cpu:local_rank``, which
       ShardedTensor rejects on CPU ("Local shard tensor device does not match"); they are
       rewritten to ``rank:r/cpu``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        plan: ShardingPlan,
        world_size: int,
        sharding_group_size: int,
        global_pg: dist.ProcessGroup,
        sharders: List,
        data_parallel_wrapper: Optional[DataParallelWrapper] = None,
        use_inter_host_allreduce: bool = False,
    ) -> None:
        self._device = device
        self._pg = global_pg
        self._global_rank = dist.get_rank(global_pg)
        self._custom_all_reduce = None
        self._sharder_map = {s.module_type: s for s in sharders}
        self._default_ctx = DMPCollectionContext(
            module=None,  # type: ignore[arg-type]
            plan=plan,
            sharding_group_size=sharding_group_size,
            use_inter_host_allreduce=use_inter_host_allreduce,
        )
        self._submodule_ctxs = []
        self._ctxs = [self._default_ctx]
        ctx = self._default_ctx
        ctx.device_mesh, ctx.sharding_pg, ctx.replica_pg = self._create_process_groups(
            global_rank=self._global_rank, world_size=world_size, local_size=sharding_group_size, use_inter_host_allreduce=use_inter_host_allreduce
        )
        self._remap_sharding_plan(
            plan=plan,
            rank=self._global_rank,
            step=world_size // sharding_group_size,
            sharding_group_size=sharding_group_size,
            use_inter_host_allreduce=use_inter_host_allreduce,
        )
        env = ShardingEnv2D(
            global_pg=global_pg,
            sharding_pg=ctx.sharding_pg,
            replica_pg=ctx.replica_pg,
            device_mesh=ctx.device_mesh,
            node_group_size=None,
            use_inter_host_allreduce=use_inter_host_allreduce,
            sharding_strategy=ShardingStrategy.DEFAULT,
        )
        self._use_sharded_relay = False
        self._sharded_relay_state = None
        DistributedModelParallel.__init__(self, module, env, device, plan, sharders, True, True, data_parallel_wrapper)
        self._group_sharded_modules(self._ctxs)
        self._cache_sync_tensors(self._ctxs)

    def _remap_sharding_plan(self, plan, rank, step, sharding_group_size, use_inter_host_allreduce=False) -> None:
        super()._remap_sharding_plan(plan, rank, step, sharding_group_size, use_inter_host_allreduce)
        for module_plan in plan.plan.values():
            for ps in module_plan.values():  # type: ignore[union-attr]
                spec = ps.sharding_spec
                if isinstance(spec, EnumerableShardingSpec) and spec.shards:
                    for shard in spec.shards:
                        shard.placement = _remote_device(f"rank:{shard.placement.rank()}/cpu")


def table_names(model: torch.nn.Module) -> List[str]:
    names = [c.name for c in model.ebc.embedding_bag_configs()]
    names += [c.name for c in model.ec.embedding_configs()]
    return names


def broadcast_replicas(dmp: DMPCollection) -> None:
    """Make every replica group start from the same tables: TorchRec initialises each
    replica independently (each replica group draws its own init), so replicas would start
    apart; copy replica-group rank 0's weights to the others."""
    with torch.no_grad():
        for ctx in dmp._ctxs:
            for tensors in ctx.weights_by_dtype.values():
                for t in tensors:
                    dist.broadcast(t, group=ctx.replica_pg, group_src=0)
            for tensors in ctx.optimizer_tensors_by_dtype.values():
                for t in tensors:
                    dist.broadcast(t, group=ctx.replica_pg, group_src=0)


def _has_bf16_tables(model: torch.nn.Module) -> bool:
    from torchrec.modules.embedding_configs import DataType

    configs = []
    for m in model.modules():
        if hasattr(m, "embedding_bag_configs"):
            configs += m.embedding_bag_configs()
        elif hasattr(m, "embedding_configs"):
            configs += m.embedding_configs()
    return any(c.data_type == DataType.BF16 for c in configs)


def shard_model(model: torch.nn.Module, parallel_cfg, optim_cfg, device: torch.device) -> ShardedModel:
    """Plan (collectively) and shard ``model``; embeddings may be on ``meta``."""
    world = dist.get_world_size()
    sp = parallel_cfg.sparse
    if sp.comm_precision == "fp8" and device.type != "cuda":
        # FBGEMM's fp8 row-wise quantisation kernels exist for CUDA only (on CPU the first
        # all-to-all fails inside the codec); fp16 and bf16 run on CPU/gloo.
        raise ConfigError(
            f"config key 'parallel.sparse.comm_precision' = 'fp8' is invalid on {device.type}: fp8 embedding communication needs CUDA; use bf16 or fp16 here",
            key="parallel.sparse.comm_precision",
        )
    if device.type != "cuda" and _has_bf16_tables(model):
        # FBGEMM's CPU TBE kernels train fp32 and fp16 tables only (bf16: NotImplementedError
        # inside the first forward).
        raise ConfigError(
            f"config key 'model.embedding_dtype' = 'bf16' is invalid on {device.type}: bf16 embedding tables need CUDA; use fp16 or fp32 here",
            key="model.embedding_dtype",
        )
    wrapper = FSDPDenseWrapper() if parallel_cfg.dense.strategy == "fsdp" else None
    if sp.strategy == "1d":
        layout = ParallelLayout(world, world, "1d")
        sharders = build_sharders(optim_cfg, comm_precision=parallel_cfg.sparse.comm_precision)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        plan = plan_sharding(
            model,
            sharders,
            table_names(model),
            list(sp.sharding_types),
            device,
            world_size=world,
            local_world_size=min(local_world, world),
            pg=dist.GroupMember.WORLD,
        )
        dmp = DistributedModelParallel(
            module=model,
            device=device,
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            plan=plan,
            sharders=sharders,
            data_parallel_wrapper=wrapper,
        )
        return ShardedModel(dmp=dmp, plan=plan, layout=layout)

    group = sp.sharding_group_size or world
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    layout = ParallelLayout(world, group, "2d", placement=sp.replica_placement, local_world_size=local_world)
    m = layout.num_replica_groups
    scale = math.sqrt(m) if sp.momentum_scaling else 1.0
    sharders = build_sharders(optim_cfg, lr_scale=scale, eps_scale=scale, comm_precision=parallel_cfg.sparse.comm_precision)
    # The plan is made for one sharding group (S ranks); DMPCollection remaps it per group.
    plan = plan_sharding(
        model,
        sharders,
        table_names(model),
        list(sp.sharding_types) or SHARDING_TYPES_2D,
        device,
        world_size=group,
        local_world_size=group,
        pg=dist.GroupMember.WORLD,
    )
    cls = CpuDMPCollection if device.type == "cpu" else DMPCollection
    kwargs = dict(
        module=model,
        device=device,
        plan=plan,
        world_size=world,
        sharding_group_size=group,
        global_pg=dist.GroupMember.WORLD,
        sharders=sharders,
        data_parallel_wrapper=wrapper,
        use_inter_host_allreduce=layout.inter_node,
    )
    dmp = cls(**kwargs)
    broadcast_replicas(dmp)
    log.info(
        "2D sparse: %d replica groups; momentum scaling %s (sparse lr and eps x %.4g); %s sync every %d step(s), replicas combined by %s",
        m,
        "on" if sp.momentum_scaling else "off",
        scale,
        sp.sync,
        sp.sync_every_n_steps,
        sp.sync_reduce,
    )
    sharded = ShardedModel(dmp=dmp, plan=plan, layout=layout, sparse_lr_scale=scale, sync_every_n_steps=sp.sync_every_n_steps)
    if sp.sync == "touched" and m > 1:
        if len(dmp._ctxs) != 1:
            raise ValueError("parallel.sparse.sync=touched supports one DMPCollection context (no submodule configs)")
        # Tracking starts now: the broadcast above made every replica identical.
        sharded.touched = TouchedRowsSync(sharded.tracked_sync_kernels(), dmp._ctxs[0].replica_pg, reduce=sp.sync_reduce)
    return sharded
