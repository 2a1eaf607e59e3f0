"""Run under torchrun: train with the given config, then compare every embedding shard
with its copies in the other replica groups (2D). Writes ``run_dir/replicas_rank<r>.json``."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kunlun.trainer.config import load_config
from kunlun.trainer.trainer import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    try:
        trainer.train()
        ctx = trainer.model._ctxs[0]
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
        rank = dist.get_rank()
        out = {"rank": rank, "identical": bool(identical), "max_diff": max_diff, "numel": numel, "replicas": n}
        Path(cfg.run_dir, f"replicas_rank{rank}.json").write_text(json.dumps(out))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
