"""Run under torchrun: build a Trainer and train with the given config, observing the 2D
replicas and the fused sparse optimizer. Writes ``run_dir/replicas_rank<r>.json`` with

- ``pre_broadcast`` / ``after_construction``: replica comparison (every embedding shard and
  its AdaGrad state against its copies in the other replica groups) just before the
  start-up broadcast and once the model is built. Each rank reseeds torch with its own seed
  right before ``shard_model`` so replicas draw different initial tables: only the
  broadcast can make them equal;
- ``steps``: the comparison after every training step (after the trainer's sync call);
- ``fused_at_construction`` / ``fused_after_training``: ``[lr, eps]`` of every FBGEMM
  table-batched embedding module in the model (what the fused row-wise AdaGrad applies).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import kunlun.parallel.sparse as sparse_mod
import kunlun.trainer.trainer as trainer_mod
from kunlun.trainer.config import load_config


def compare_replicas(dmp) -> dict:
    ctx = dmp._ctxs[0]
    n = dist.get_world_size(ctx.replica_pg)
    identical, max_diff, numel = True, 0.0, 0
    for group in (ctx.weights_by_dtype, ctx.optimizer_tensors_by_dtype):
        for tensors in group.values():
            for w in tensors:
                w = w.detach().contiguous()
                copies = [torch.empty_like(w) for _ in range(n)]
                dist.all_gather(copies, w, group=ctx.replica_pg)
                numel += w.numel()
                for c in copies[1:]:
                    identical &= torch.equal(c, copies[0])
                    max_diff = max(max_diff, float((c.float() - copies[0].float()).abs().max()) if c.numel() else 0.0)
    return {"identical": bool(identical), "max_diff": max_diff, "numel": numel, "replicas": n}


def fused_settings(dmp) -> list:
    """[lr, eps] of each FBGEMM TBE (the kernels that run the fused optimizer). TorchRec's
    sharded collections keep their lookups in a plain list, so those are walked too."""
    found, seen = [], set()

    def visit(m) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if hasattr(m, "get_learning_rate") and hasattr(m, "optimizer_args"):
            found.append([m.get_learning_rate(), float(m.optimizer_args.eps)])
        for child in [*m.children(), *(getattr(m, "_lookups", None) or [])]:
            visit(child)

    visit(dmp)
    return found


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    rank = int(os.environ["RANK"])
    out: dict = {"rank": rank}
    real_shard, real_broadcast = trainer_mod.shard_model, sparse_mod.broadcast_replicas

    def shard_model_rank_seeded(*args, **kwargs):
        torch.manual_seed(1000 + rank)
        return real_shard(*args, **kwargs)

    def observed_broadcast(dmp) -> None:
        out["pre_broadcast"] = compare_replicas(dmp)
        real_broadcast(dmp)

    trainer_mod.shard_model = shard_model_rank_seeded
    sparse_mod.broadcast_replicas = observed_broadcast
    trainer = trainer_mod.Trainer(cfg)
    try:
        is_2d = trainer.sharded.is_2d
        out["fused_at_construction"] = fused_settings(trainer.model)
        out["sparse_lr_scale"] = trainer.sharded.sparse_lr_scale
        if is_2d:
            out["after_construction"] = compare_replicas(trainer.model)
            out["steps"] = []
            real_sync = trainer.sharded.maybe_sync

            def observed_sync(step: int) -> bool:
                synced = real_sync(step)
                out["steps"].append({"step": step, **compare_replicas(trainer.model)})
                return synced

            trainer.sharded.maybe_sync = observed_sync
        trainer.train()
        out["fused_after_training"] = fused_settings(trainer.model)
        Path(cfg.run_dir, f"replicas_rank{rank}.json").write_text(json.dumps(out))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
