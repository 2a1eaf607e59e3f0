"""Run under torchrun with ``parallel.sparse.sync=touched``: train, and at every replica
sync check the touched-rows sync against a full sync from the same state. Writes
``run_dir/touched_rank<r>.json``.

At each sync: snapshot every local shard and AdaGrad state, run the touched sync (result
T) and compare it bitwise with the reference: with ``sync_reduce=mean``, restore the snapshot
and run ``DMPCollection.sync`` (result F; training continues from F); with ``sum_delta``,
``w0 + Σ_r (w_r − w0)`` computed here from every replica's pre-sync state and the previous
post-sync state ``w0``, for every row. Finally one replica (rank 0's sharding group) takes
an embedding-only step while the other trains on nothing, and that sync is checked too. Also recorded per sync: the union rows sent,
the rows that actually differ from the previous post-sync state on some replica (they must
all be in the union: the union is what the replicas looked up), and the local rows. After
training, a second sync in a row must send no rows and leave everything unchanged.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kunlun.parallel.sparse import ShardedModel
from kunlun.trainer.config import load_config
from kunlun.trainer.trainer import Trainer


def tensors(sharded: ShardedModel):
    return [t for table in sharded.touched._tables for t in (table.weight, table.state)]


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    rank = int(os.environ["RANK"])
    trainer = Trainer(cfg)
    sharded = trainer.sharded
    assert sharded.touched is not None, "parallel.sparse.sync=touched expected"
    touched = sharded.touched
    pg = touched.replica_pg
    report = {"rank": rank, "syncs": []}
    previous = [t.clone() for t in tensors(sharded)]  # replicas identical after construction

    def checked_sync() -> None:
        live = tensors(sharded)
        before = [t.clone() for t in live]
        # Rows that changed on this replica since the last sync, OR-ed over the replica group.
        changed = []
        for i in range(len(touched._tables)):
            w, s = before[2 * i], before[2 * i + 1]
            diff = (w != previous[2 * i]).reshape(w.shape[0], -1).any(1) | (s != previous[2 * i + 1]).reshape(s.shape[0], -1).any(1)
            changed.append(diff.to(torch.uint8))
            dist.all_reduce(changed[i], op=dist.ReduceOp.MAX, group=pg)
        marked = [tb.touched.clone() for tb in touched._tables]
        union_marks = [m.to(torch.uint8) for m in marked]
        for u in union_marks:
            dist.all_reduce(u, op=dist.ReduceOp.MAX, group=pg)
        bytes_before = touched.stats.bytes_values
        sent = touched.sync()
        if touched.reduce == "mean":  # reference: DMPCollection.sync from the same state
            result_touched = [t.clone() for t in live]
            for t, b in zip(live, before):
                t.copy_(b)
            sharded.dmp.sync(include_optimizer_state=True)
            equal = all(torch.equal(a, b) for a, b in zip(result_touched, live))
        else:  # reference: w0 + sum over replicas of (w_r - w0), w0 = the previous sync's state
            equal = True
            for t, b, p in zip(live, before, previous):
                copies = [torch.empty_like(b) for _ in range(touched.num_replicas)]
                dist.all_gather(copies, b.contiguous(), group=pg)
                delta = copies[0] - p
                for c in copies[1:]:
                    delta = delta + (c - p)
                equal &= torch.equal(t, p + delta)
        report["syncs"].append(
            {
                "step": trainer.step + 1,
                "bitwise_equal_to_reference": equal,
                "rows_sent": sent,
                "rows_marked_union": int(sum(int(u.sum()) for u in union_marks)),
                "rows_changed": int(sum(int(c.sum()) for c in changed)),
                "changed_outside_union": int(sum(int((c.bool() & ~u.bool()).sum()) for c, u in zip(changed, union_marks))),
                "rows_total": touched.stats.rows_total,
                "value_bytes": touched.stats.bytes_values - bytes_before,
            }
        )
        previous[:] = [t.clone() for t in live]

    sharded.sync = checked_sync  # what the trainer calls every sync_every_n_steps
    try:
        trainer.train()
        snapshot = [t.clone() for t in tensors(sharded)]
        report["second_sync_rows"] = touched.sync()
        report["second_sync_unchanged"] = all(torch.equal(a, b) for a, b in zip(snapshot, tensors(sharded)))
        # One replica (the sharding group of rank 0) takes an embedding-only step, the other
        # trains on nothing: the sync must still match the reference and leave replicas equal.
        idle = rank not in sharded.layout.sharding_groups()[0]
        if not idle:
            _, loader = trainer._loader("train")
            batch = next(iter(loader)).to(trainer.info.device)
            inputs = sharded.dmp.module.tower_inputs(batch)  # sharded lookups, no dense tower / DDP
            loss = sum(v.sum() for v in inputs.context.values()) + sum(e.item.sum() + e.action.sum() for e in inputs.events.values())
            loss.backward()  # the fused row-wise AdaGrad updates the looked-up rows here
        local_rows = int(sum(int(t.touched.sum()) for t in touched._tables))
        sharded.sync()  # checked_sync: compared with the reference, appended to syncs
        identical = True
        for t in tensors(sharded):
            copies = [torch.empty_like(t) for _ in range(touched.num_replicas)]
            dist.all_gather(copies, t.contiguous(), group=pg)
            identical &= all(torch.equal(c, copies[0]) for c in copies[1:])
        report["idle_replica"] = {"idle": idle, "local_rows": local_rows, "sync": report["syncs"][-1], "replicas_identical": identical}
        report["exchanges"] = touched.stats.exchanges
        Path(cfg.run_dir, f"touched_rank{rank}.json").write_text(json.dumps(report))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
