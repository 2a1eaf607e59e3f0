"""2D replica sync of only the rows that changed: ``parallel.sparse.sync=touched``.

A 2D replica sync (``DMPCollection.sync``) averages every local shard and its row-wise
AdaGrad state across the replica group. After a sync all replicas are identical, and a row
changes afterwards only if some replica's update touched it, that is if the row was looked
up by that replica's sharding group in a training step (the fused TBE update writes only
looked-up rows). So a sync only needs the union of the rows the replicas looked up since
the last sync; every other row is already equal on all replicas.

How: a forward pre-hook on every TBE kernel (``SplitTableBatchedEmbeddingBagsCodegen``,
the same kernels ``DMPCollection`` syncs) marks, per local table shard, the rows in its
``indices`` (local row ids after TorchRec's input distribution) while grad is enabled. At a
sync each rank all-gathers its marked row ids within the replica group (counts, then the
padded ids), forms the sorted union, gathers those rows of the weights and of the AdaGrad
``sum`` state into one buffer per dtype, and averages it with the very collective the full
sync uses (``replica_pg.allreduce_coalesced`` with ``ReduceOp.AVG``). Averaging is
elementwise, so the synced rows are bitwise what a full sync gives them; the other rows are
equal on all replicas, which a full sync leaves unchanged as long as the average of equal
values is exact (always for M = 2 replicas; for other M the full sync can move an
untouched row by rounding, and the touched sync, which leaves it alone, is the exact one).

The row set is exchanged the cheapest way, decided identically on every replica from the
all-gathered counts ``n_r`` (replicas of a shard have the same ``R`` local rows, ``b``
bytes per row of weights + state):

* ids: all-gather the padded ids, ``(M-1) * 8 * max_r n_r`` bytes;
* a bitmap: one byte per local row, all-reduced with MAX, ``2(M-1)/M * R`` — cheaper once
  a replica touched more than ``R / (4M)`` rows;
* no exchange, all rows averaged (a full sync) when even the cheaper exchange plus the
  fewest rows the union can hold, ``max_r n_r``, cost at least the full sync's
  ``2(M-1)/M * R * b``. Many touched rows (small tables, long periods) end here. The
  rule sees only the busiest replica's count, a lower limit of the union: when the bitmap
  was chosen and the union turns out to be every row, the sync costs a full sync plus one
  byte per row (+0.2% at D = 128, ~1.5% at D = 16) and the counts.

``reduce="sum_delta"`` (``parallel.sparse.sync_reduce=sum_delta``) replaces the average by
the sum of every replica's change since the last sync, ``w ← w₀ + Σ_r (w_r − w₀)`` for the
weights and the AdaGrad state alike (``w₀``, the value at the last sync, is saved when a
replica first looks a row up in a period). Why: TorchRec's embedding gradient is a sum over
the sharding group's examples, so a row seen by one replica only gets 1/M of its 1D update
and accumulator increment from an average; with the summed change it gets all of it, as in
1D, and rows seen by several replicas get the sum of their updates (1D would take one step
with the summed gradient). Replicas still end identical: they add the same sum to the same
``w₀``. Not bitwise a full sync (that averages).

Bytes per sync and rank (ring-equivalent, what ``benchmarks/parallel_bench.py`` counts):
``(M-1) * 8`` for the counts, the exchange above, and ``2(M-1)/M * U * b`` for the ``U``
union rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen


def choose_exchange(m: int, rows: int, row_bytes: float, widest: int) -> str:
    """How ``m`` replicas with ``rows`` local rows of ``row_bytes`` bytes (weights + state)
    exchange their touched-row sets when the busiest replica touched ``widest`` rows:
    ``"ids"``, ``"bitmap"`` or ``"all"`` (no exchange, every row averaged). The cheapest in
    bytes sent per rank, counting for ids and bitmap the fewest value bytes they can lead
    to (the union holds at least ``widest`` rows); see the module docstring."""
    if widest == 0:
        return "ids"  # nothing touched: the counts were all that was sent
    ring = 2 * (m - 1) / m
    ids, bitmap = (m - 1) * 8 * widest, ring * rows
    if min(ids, bitmap) + ring * widest * row_bytes >= ring * rows * row_bytes:
        return "all"
    return "bitmap" if bitmap < ids else "ids"


@dataclass
class _Table:
    """One local table shard of a TBE kernel: weight rows ``[R, D]``, AdaGrad state ``[R]``
    (or ``[R, 1]``), and the rows touched since the last sync ``[R]`` (bool)."""

    weight: torch.Tensor
    state: torch.Tensor
    touched: torch.Tensor
    # sum_delta only: rows first touched in this period and their values then (= at the last
    # sync: a row is updated only after it was looked up), appended per lookup
    base_rows: List[torch.Tensor] = field(default_factory=list)
    base_weight: List[torch.Tensor] = field(default_factory=list)
    base_state: List[torch.Tensor] = field(default_factory=list)


@dataclass
class SyncStats:
    """Counters since construction (rows and bytes this rank sent, ring-equivalent)."""

    syncs: int = 0
    rows_total: int = 0  # local rows across all table shards (a full sync's rows per sync)
    rows_synced: int = 0  # union rows averaged, summed over syncs
    bytes_ids: int = 0  # counts and the row-set exchange (ids or bitmap)
    bytes_values: int = 0
    exchanges: Dict[str, int] = field(default_factory=lambda: {"ids": 0, "bitmap": 0, "all": 0})
    per_sync_union: List[int] = field(default_factory=list)


class TouchedRowsSync:
    """Track looked-up rows of every TBE kernel in ``kernels`` and average only those rows
    across ``replica_pg`` in :meth:`sync`. Build it after the replicas were made identical
    (the start-up broadcast or a full sync): rows are tracked from then on."""

    def __init__(self, kernels: List[torch.nn.Module], replica_pg: dist.ProcessGroup, reduce: str = "mean") -> None:
        if reduce not in ("mean", "sum_delta"):
            raise ValueError(f"reduce {reduce!r}: expected mean or sum_delta")
        self.reduce = reduce
        self.replica_pg = replica_pg
        self.num_replicas = dist.get_world_size(replica_pg)
        self._tables: List[_Table] = []
        self._hooks = []
        for kernel in kernels:
            if not isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen):
                raise TypeError(f"touched-rows sync supports TBE kernels only, not {type(kernel).__name__}")
            weights = kernel.split_embedding_weights()
            states = [s["sum"] for s in kernel.get_optimizer_state()]
            if len(states) != len(weights):
                raise ValueError(f"expected one row-wise AdaGrad state per table, got {len(states)} for {len(weights)} tables")
            first = len(self._tables)
            for w, s in zip(weights, states):
                if s.shape[0] != w.shape[0]:
                    raise ValueError(f"AdaGrad state has {s.shape[0]} rows for a table shard of {w.shape[0]} rows (row-wise state expected)")
                self._tables.append(_Table(w, s, torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)))
            table_of_feature = [first + int(t) for t in kernel.feature_table_map]
            self._hooks.append(kernel.register_forward_pre_hook(self._recorder(table_of_feature), with_kwargs=True))
        self.stats = SyncStats(rows_total=sum(t.weight.shape[0] for t in self._tables))
        # One flag vector over all local rows (table i's rows at _starts[i]); each table's
        # `touched` is a view of it, so one scatter per lookup marks rows of any table.
        device = self._tables[0].weight.device if self._tables else torch.device("cpu")
        self._touched = torch.zeros(self.stats.rows_total, dtype=torch.bool, device=device)
        self._starts = torch.zeros(len(self._tables), dtype=torch.int64, device=device)
        at = 0
        for i, t in enumerate(self._tables):
            t.touched = self._touched[at : at + t.weight.shape[0]]
            self._starts[i] = at
            at += t.weight.shape[0]

    def _recorder(self, table_of_feature: List[int]):
        num_features = len(table_of_feature)
        tables = torch.tensor(table_of_feature, dtype=torch.int64)

        def record(module, args, kwargs) -> None:
            if not torch.is_grad_enabled():
                return  # evaluation: no update follows
            indices = kwargs["indices"] if "indices" in kwargs else args[0]
            offsets = kwargs["offsets"] if "offsets" in kwargs else args[1]
            per_rank = kwargs.get("batch_size_per_feature_per_rank")
            if per_rank is None:
                batch = (offsets.numel() - 1) // num_features
                bounds = [f * batch for f in range(num_features + 1)]
            else:  # variable batch per feature: feature f owns sum(per_rank[f]) bags
                bounds = [0]
                for sizes in per_rank:
                    bounds.append(bounds[-1] + sum(sizes))
            if self.reduce == "mean":
                # No host sync on the training step's path: every index shifted by its
                # feature's table start, then one scatter into the flag vector.
                cuts = offsets[torch.tensor(bounds, device=offsets.device)]
                start = self._starts[tables.to(self._starts.device)].to(indices.device)
                shift = torch.repeat_interleave(start, cuts[1:] - cuts[:-1], output_size=indices.numel())
                self._touched[shift + indices.long()] = True
                return
            cuts = offsets[bounds].tolist()  # sum_delta saves base values per table: host cuts
            for f, table in enumerate(table_of_feature):
                if cuts[f + 1] > cuts[f]:
                    t = self._tables[table]
                    rows = indices[cuts[f] : cuts[f + 1]].long()
                    if self.reduce == "sum_delta":
                        first = torch.unique(rows[~t.touched[rows]])
                        if first.numel():
                            t.base_rows.append(first)
                            t.base_weight.append(t.weight[first].clone())
                            t.base_state.append(t.state[first].clone())
                    t.touched[rows] = True

        return record

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def reset(self) -> None:
        """Forget tracked rows (after the replicas were made identical some other way)."""
        for t in self._tables:
            t.touched.zero_()
            t.base_rows.clear()
            t.base_weight.clear()
            t.base_state.clear()

    @torch.no_grad()
    def sync(self) -> int:
        """Reduce the union of the replicas' touched rows (``mean``: average them; ``sum_delta``:
        add every replica's change since the last sync); returns the union size (rows)."""
        if not self._tables:
            return 0
        sizes = [t.weight.shape[0] for t in self._tables]
        base = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
        device = self._tables[0].touched.device
        # Local touched rows as ids into the concatenation of all local table shards.
        local = torch.cat([t.touched.nonzero().flatten() + base[i].to(device) for i, t in enumerate(self._tables)])
        union = self._union(local)
        self.stats.syncs += 1
        self.stats.rows_synced += int(union.numel())
        self.stats.per_sync_union.append(int(union.numel()))
        if union.numel():
            table_of_row = torch.searchsorted(base[1:].to(device), union, right=True)
            rows_of: Dict[int, torch.Tensor] = {}
            for i in torch.unique(table_of_row).tolist():
                rows_of[i] = union[table_of_row == i] - base[i].to(device)
            self._average(rows_of)
        self.reset()
        return int(union.numel())

    def _row_bytes(self) -> float:
        """Mean bytes per local row of weights + AdaGrad state."""
        total = sum(t.weight.numel() * t.weight.element_size() + t.state.numel() * t.state.element_size() for t in self._tables)
        return total / max(self.stats.rows_total, 1)

    def _union(self, local: torch.Tensor) -> torch.Tensor:
        """Sorted union of every replica's ``local`` row ids ``[n_r]`` (int64)."""
        m = self.num_replicas
        count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
        counts = [torch.empty_like(count) for _ in range(m)]
        dist.all_gather(counts, count, group=self.replica_pg)
        n = [int(c) for c in counts]
        self.stats.bytes_ids += (m - 1) * 8
        width = max(n)
        plan = choose_exchange(m, self.stats.rows_total, self._row_bytes(), max(n))
        self.stats.exchanges[plan] += 1
        if width == 0:
            return local
        if plan == "all":
            return torch.arange(self.stats.rows_total, dtype=torch.int64, device=local.device)
        if plan == "bitmap":
            bits = torch.zeros(self.stats.rows_total, dtype=torch.uint8, device=local.device)
            bits[local] = 1
            dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=self.replica_pg)
            self.stats.bytes_ids += int(2 * (m - 1) * bits.numel() // m)
            return bits.nonzero().flatten()
        padded = torch.zeros(width, dtype=torch.int64, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(m)]
        dist.all_gather(parts, padded, group=self.replica_pg)
        self.stats.bytes_ids += (m - 1) * 8 * width
        return torch.unique(torch.cat([p[:k] for p, k in zip(parts, n)]))

    def _base_values(self, t: _Table, rows: torch.Tensor) -> tuple:
        """``sum_delta``: weights and state of ``rows`` (sorted) as of the last sync: the saved
        values for rows this replica touched, the current ones (unchanged) for the others."""
        w, s = t.weight[rows].clone(), t.state[rows].clone()
        if t.base_rows:
            saved = torch.cat(t.base_rows)
            pos = torch.searchsorted(rows, saved)  # saved ⊆ local touched ⊆ rows
            w[pos] = torch.cat(t.base_weight)
            s[pos] = torch.cat(t.base_state)
        return w, s

    def _average(self, rows_of: Dict[int, torch.Tensor]) -> None:
        """Gather the rows' weights and states (``sum_delta``: their changes since the last
        sync), one all-reduce per dtype (AVG / SUM), write back."""
        groups: Dict[torch.dtype, List[tuple]] = defaultdict(list)
        for i, rows in rows_of.items():
            t = self._tables[i]
            base_w, base_s = self._base_values(t, rows) if self.reduce == "sum_delta" else (None, None)
            groups[t.weight.dtype].append((t.weight, rows, base_w))
            groups[t.state.dtype].append((t.state, rows, base_s))
        opts = dist.AllreduceCoalescedOptions()
        opts.reduceOp = dist.ReduceOp.AVG if self.reduce == "mean" else dist.ReduceOp.SUM
        m = self.num_replicas
        for items in groups.values():
            buf = torch.cat([(tensor[rows] if base is None else tensor[rows] - base).reshape(-1) for tensor, rows, base in items])
            self.replica_pg.allreduce_coalesced([buf], opts=opts).wait()
            self.stats.bytes_values += int(2 * (m - 1) * buf.numel() * buf.element_size() // m)
            at = 0
            for tensor, rows, base in items:
                n = rows.numel() * (tensor[0].numel() if tensor.dim() > 1 else 1)
                value = buf[at : at + n].view_as(tensor[rows])
                tensor[rows] = value if base is None else base + value
                at += n
