"""Sparse parallelism, 1D vs 2D: per-rank embedding memory and communication bytes.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=4 benchmarks/parallel_bench.py [--out FILE]

For a few table mixes (config overrides of the synthetic source, ``MIXES``) and three
strategies — 1D (every table sharded over all ``T`` ranks), 2D (sharding groups of
``S = 2``, ``M = T/S`` replica groups, full replica sync every step) and 2D touched (the same
with ``parallel.sparse.sync=touched``: only the rows some replica looked up) — it builds a real
``Trainer``, trains ``--warmup`` + ``--steps`` steps with its own loop, and counts the bytes
each rank *sends to other ranks* during the measured steps. All on CPU / gloo. Bytes are
deterministic (same seed, same batches); times are not and are not reported.

What is counted, and how (a measurement harness; every patch is undone after each run):

* **Embedding all-to-all family.** ``torch.distributed.all_to_all_single``, ``all_to_all``,
  ``reduce_scatter``, ``reduce_scatter_tensor``, ``all_gather``, ``all_gather_into_tensor``
  and ``_functional_collectives.all_to_all_single`` (the entry points TorchRec's
  ``comm_ops.py`` / ``dist_data.py`` call, looked up as module attributes at call time) are
  wrapped. ``all_to_all_single`` counts the rows of ``input_split_sizes`` (equal splits when
  ``None``) that go to other ranks; ``reduce_scatter*`` the ``(n-1)/n`` of the input owned by
  others; ``all_gather*`` ``(n-1)`` copies of the input. Integer tensors are the KJT input
  dist (int64 without split sizes: the ``splits`` exchange; int32: ``lengths``; int64 with
  split sizes: the ids, ``values``), floating tensors the embeddings (forward) and their
  gradients (backward), told apart by the phase of the step.
* **DDP dense all-reduce.** It runs in C++ (the reducer), so a counting comm hook wrapping
  ``default_hooks.allreduce_hook`` is registered on the ``DistributedDataParallel`` inside
  the DMP (``dmp._dmp_wrapped_module``); every bucket counts ``2(T-1)/T x bucket bytes``
  (ring all-reduce). The hook's own ``dist.all_reduce`` is not counted a second time.
* **2D replica sync.** ``DMPCollection._allreduce_tensors`` (which calls
  ``replica_pg.allreduce_coalesced`` for the TBE weights and then the row-wise AdaGrad
  state) is wrapped on the instance; ``2(M-1)/M x tensor bytes`` (ring).
* **Touched-rows sync** (``parallel/touched_sync.py``). It all-gathers row ids with
  ``dist.all_gather`` (which the wrappers above would count as all-to-all traffic) and
  averages the rows with ``replica_pg.allreduce_coalesced`` on the process group object
  (which no wrapper sees). So the wrappers are muted during it (what they see is kept apart,
  ``gathered_in_sync``, as a cross-check of the id bytes) and the deltas of
  ``TouchedRowsSync.stats`` over the sync are counted: ``sync_ids`` (``bytes_ids``) and
  ``sync_values`` (``bytes_values``).
* Any other ``dist.all_reduce`` / ``broadcast`` in the measured steps lands in ``other``
  (expected: 0; the loop below leaves out ``Trainer.train``'s per-step 2-float
  non-finite/SIGTERM flag all-reduce, which is control traffic, not parallelism).

Per-rank embedding memory: bytes of the local shards of every table weight
(``model.state_dict()``: ``ShardedTensor.local_shards()`` in 1D, ``DTensor.to_local()``
→ ``local_shards()`` in 2D) plus the fused row-wise AdaGrad state
(``model.fused_optimizer.state_dict()``), per rank.

Why runs are not separated by ``Trainer.close()``: it calls
``dist.destroy_process_group()``, and re-initialising under torchrun does not work (tested
with torch 2.13 / ``--standalone``: the second ``Trainer``, built after ``close()``, hung
until the 2-minute timeout; a bare ``init_process_group`` → ``destroy`` →
``init_process_group`` returned on only some ranks and the next all-reduce failed with
"Connection reset by peer", presumably because the rendezvous store still holds the first
group's keys). So every run keeps the default group:
the benchmark calls ``trainer.monitor.close()`` (the only other resource ``close()`` frees;
the SIGTERM handler is only installed by ``train()``, which is not called), drops the
trainer, and destroys the process group once at the end. Each 2D run's sharding/replica
subgroups are destroyed after the run.

Sharding types: the planner chooses among table_wise, row_wise and column_wise (``COMMON``).
``table_column_wise`` is left out because TorchRec 1.8 cannot build a 2D model with it
whenever a rank of a sharding group holds no shard of a TWCW table (``DTensor.from_local``:
"Found shape:None"; ``create_global_tensor_shape_stride_from_metadata`` has no TWCW case),
and the planner picks TWCW at random among equal-cost candidates for single-shard tables.

Limits: T = 4 and S = 2 only (2 cores); bytes sent, not time (latency, overlap and gloo's
real all-reduce algorithms are not modelled: all-reduces count ring-equivalent bytes); the
model predicts the mean over ranks, not the per-rank spread of table-wise plans.

The analytic model (``a2a_bytes_per_rank``, ``embedding_bytes_per_rank``,
``sync_bytes_per_rank``, ``touched_sync_bytes_per_rank``, ``ddp_bytes_per_rank``) is
documented at each function; it is fed with the plan the planner made (sharding type per
table), the mean ids per example and, for the touched sync, the unique-id rate (unique rows /
ids) measured on the very batches trained, so measured vs predicted isolates the model. The
unique-id rate over sync periods of k = 1..256 steps is measured on the synthetic source's
training stream (``source_unique_curve``, no training). The model also projects 1D vs 2D,
full and touched sync, to 1024-4096 GPUs (``project``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

# --------------------------------------------------------------------------- model
ID_BYTES = 8  # KJT values: int64
LEN_BYTES = 4  # KJT lengths: int32 (data/batch.py)
EMB_BYTES = 4  # fp32 embeddings and gradients
STATE_BYTES = 4  # row-wise AdaGrad: one fp32 per row
SPLITS_PER_DIST = 3  # int64 sizes exchanged per destination rank before each KJT all-to-all


@dataclass(frozen=True)
class FeatureTraffic:
    """One KJT key (feature) as the communication model sees it."""

    pooled: bool  # EmbeddingBagCollection (pooled to [b, D]) or EmbeddingCollection (sequence)
    row_wise: bool  # RW sharding; else TW / CW / TWCW (every id goes to the owner of each column shard)
    ids_per_example: float  # pooling factor p (pooled) or mean sequence length L
    dim: int  # D (full row width; column shards add up to it)
    shards: int = 1  # column shards of a CW / TWCW table (ids and lengths go to each)


def a2a_bytes_per_rank(n: int, b: float, feats: Sequence[FeatureTraffic], num_input_dists: int) -> Dict[str, float]:
    """Bytes one rank sends to the other ranks of an ``n``-rank sharding group per training step
    (mean over the group's ranks), local batch ``b``:

    * KJT input dist, once per (module, sharding type): ``splits`` 3 int64 to each peer,
      ``(n-1)*3*8``;
    * TW/CW feature: its lengths and ids go to the table's owner(s):
      ``(n-1)/n * shards * b * (4 + p*8)`` (p: ids per example);
      RW feature: lengths go to *every* rank of the group (the bucketised KJT has stride b
      per bucket), ids to the row's owner: ``(n-1)*b*4 + (n-1)/n*b*p*8``;
    * embeddings forward, the same volume of gradients backward:
      pooled TW/CW ``(n-1)/n * b*D*4`` (the owner sends ``[b, D]`` to each peer);
      pooled RW ``(n-1) * b*D*4`` (reduce-scatter of the group's partial sums ``[n*b, D]``;
      backward all-gather); sequence (TW or RW) ``(n-1)/n * b*L*D*4`` (one row per id).

    With only TW/CW pooled features this is the symmetric ``(n-1)/n`` model (ids + lengths,
    embeddings, gradients); the RW terms grow with ``n``.
    """
    f = (n - 1) / n
    out = {"splits": num_input_dists * (n - 1) * SPLITS_PER_DIST * ID_BYTES, "lengths": 0.0, "ids": 0.0, "emb_fwd": 0.0, "emb_bwd": 0.0}
    for x in feats:
        if x.row_wise:
            out["lengths"] += (n - 1) * b * LEN_BYTES
            out["ids"] += f * b * x.ids_per_example * ID_BYTES
            emb = (n - 1) * b * x.dim * EMB_BYTES if x.pooled else f * b * x.ids_per_example * x.dim * EMB_BYTES
        else:
            out["lengths"] += f * x.shards * b * LEN_BYTES
            out["ids"] += f * x.shards * b * x.ids_per_example * ID_BYTES
            emb = f * b * x.dim * EMB_BYTES if x.pooled else f * b * x.ids_per_example * x.dim * EMB_BYTES
        out["emb_fwd"] += emb
        out["emb_bwd"] += emb
    out["total"] = sum(out.values())
    return out


def embedding_bytes_per_rank(table_bytes: float, optimizer_bytes: float, n: int) -> float:
    """Tables + fused optimizer state spread evenly over the ``n`` ranks holding one copy:
    ``n = T`` (1D) or ``S`` (2D, every sharding group holds a full copy)."""
    return (table_bytes + optimizer_bytes) / n


def sync_bytes_per_rank(shard_bytes: float, m: int) -> float:
    """2D replica sync (weights + AdaGrad row state of this rank's shard, all-reduced over the
    ``M`` replicas): ring all-reduce ``2(M-1)/M x shard bytes``; 0 for 1D (``M = 1``)."""
    return 2 * (m - 1) / m * shard_bytes


def ddp_bytes_per_rank(dense_bytes: float, t: int) -> float:
    """DDP gradient all-reduce over all ``T`` ranks (1D and 2D alike): ``2(T-1)/T x dense bytes``."""
    return 2 * (t - 1) / t * dense_bytes


def touched_sync_bytes_per_rank(m: int, union_rows: float, max_local_rows: float, dim: int, rows: Optional[float] = None) -> Dict[str, float]:
    """Touched-rows replica sync (``parallel.sparse.sync=touched``), bytes one rank sends per sync
    (ring-equivalent, as ``TouchedRowsSync.stats`` counts them):

    * ``ids``: the all-gather of the touched-row counts, ``(m-1) * 8``, then the row-set
      exchange ``kunlun.parallel.touched_sync.choose_exchange`` picks for this rank's ``rows``
      local rows: the padded ids ``(m-1) * 8 * max_r n_r`` (``max_local_rows`` is
      ``max_r n_r``, the most rows of this rank's shard any one replica touched), a bitmap
      ``2(m-1)/m * rows``, or none when every row is averaged; without ``rows``, always ids;
    * ``values``: AVG all-reduce of the union rows' weights (``dim`` fp32) and AdaGrad row state
      (one fp32), ``2(m-1)/m * U * (dim*4 + 4)``; ``union_rows`` is ``U``, the union over the
      replicas of this rank's shard rows touched in the sync period (``rows`` when all rows
      are averaged).

    0 for ``m = 1`` (1D, or a single replica group: there is no sync).
    """
    from kunlun.parallel.touched_sync import choose_exchange

    if m <= 1:
        return {"ids": 0.0, "values": 0.0, "total": 0.0}
    row_bytes = dim * EMB_BYTES + STATE_BYTES
    ring = 2 * (m - 1) / m
    plan = "ids" if rows is None else choose_exchange(m, int(rows), row_bytes, int(math.ceil(max_local_rows)))
    exchange = {"ids": (m - 1) * ID_BYTES * max_local_rows, "bitmap": ring * (rows or 0), "all": 0.0}[plan]
    ids = (m - 1) * ID_BYTES + exchange
    values = ring * (rows if plan == "all" else union_rows) * row_bytes
    return {"ids": ids, "values": values, "total": ids + values, "exchange": plan}


def unique_rows(rate: float, ids: float, rows: float) -> float:
    """Unique rows among ``ids`` looked-up ids at unique-id rate ``rate`` (unique rows / ids),
    capped at the ``rows`` that exist."""
    return min(rate * ids, rows)


def uniform_unique_rate(ids: float, rows: float) -> float:
    """Expected unique rows / ids when ``ids`` ids are drawn independently and uniformly from
    ``rows`` rows: ``rows * (1 - exp(-x)) / ids`` with ``x = ids / rows`` (ids per row).

    An upper bound for any popularity distribution: the expected number of distinct rows is
    largest for uniform draws, and, split over several tables, largest when every table gets
    the same ids per row (``(1 - e^-x)`` is concave). Real id streams are skewed (Zipf-like),
    so their rate is lower.
    """
    if ids <= 0:
        return 1.0
    x = ids / rows
    return -math.expm1(-x) / x


def unique_id_curve(batches: Sequence[Dict[str, "np.ndarray"]], ks: Sequence[int]) -> Dict[int, Dict]:
    """Unique rows over sync periods of ``k`` consecutive global batches.

    ``batches[i]`` maps a table to the row ids (any int array, repeats allowed) the ``i``-th
    global batch looks up in it. For each ``k`` (``k <= len(batches)``) the batches are cut
    into ``len(batches) // k`` disjoint windows of ``k`` batches from the start; returns per
    ``k`` the mean over windows of ``ids`` (ids looked up), ``unique`` (distinct (table, row)
    pairs) and per table ``{table: [ids, unique]}``, plus ``rate = unique / ids`` (a ratio of
    the means, unitless) and ``windows``.
    """
    out: Dict[int, Dict] = {}
    tables = sorted({t for b in batches for t in b})
    for k in ks:
        w = len(batches) // k
        if w == 0:
            continue
        per_table = {t: [0.0, 0.0] for t in tables}
        for i in range(w):
            for t in tables:
                parts = [b[t] for b in batches[i * k : (i + 1) * k] if t in b]
                ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
                per_table[t][0] += ids.size / w
                per_table[t][1] += np.unique(ids).size / w
        n = sum(v[0] for v in per_table.values())
        u = sum(v[1] for v in per_table.values())
        out[k] = {"ids": n, "unique": u, "rate": u / n if n else 0.0, "windows": w, "per_table": per_table}
    return out


def rate_at(curve: Dict[int, float], k: float) -> float:
    """Unique-id rate for a sync period of ``k`` steps from a measured ``{k: rate}``: piecewise
    linear in ``(log k, log rate)`` between measured periods, the end values outside them
    (constant beyond the longest period: an overestimate there, as the rate keeps falling)."""
    ks = sorted(curve)
    if k <= ks[0]:
        return curve[ks[0]]
    if k >= ks[-1]:
        return curve[ks[-1]]
    for lo, hi in zip(ks, ks[1:]):
        if lo <= k <= hi:
            f = (math.log(k) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return math.exp(math.log(curve[lo]) + f * (math.log(curve[hi]) - math.log(curve[lo])))
    raise AssertionError("unreachable")


def predict(
    strategy: str,
    t: int,
    s: int,
    b: float,
    feats,
    num_input_dists: int,
    table_bytes: float,
    optimizer_bytes: float,
    dense_bytes: float,
    sync_every: int = 1,
    touched_rows: Optional[tuple] = None,
    dim: int = 0,
) -> Dict[str, float]:
    """Per-rank, per-step bytes of one strategy: ``1d``, ``2d`` (full replica sync) or
    ``2d_touched`` (touched-rows sync; ``touched_rows = (U, max_r n_r)`` per rank per sync,
    rows of ``dim`` fp32, see :func:`touched_sync_bytes_per_rank`). ``s`` is ignored for 1D;
    the sync is amortised over ``sync_every`` steps."""
    n = t if strategy == "1d" else s
    m = t // n
    mem = embedding_bytes_per_rank(table_bytes, optimizer_bytes, n)
    a2a = a2a_bytes_per_rank(n, b, feats, num_input_dists)
    every = max(sync_every, 1)
    if strategy == "2d_touched":
        if touched_rows is None:
            raise ValueError("2d_touched needs touched_rows = (union rows, max local rows) per rank per sync")
        ts = touched_sync_bytes_per_rank(m, touched_rows[0], touched_rows[1], dim, rows=mem / (dim * EMB_BYTES + STATE_BYTES))
        sync_parts = {"ids": ts["ids"] / every, "values": ts["values"] / every}
    elif m > 1 and sync_every:
        sync_parts = {"full": sync_bytes_per_rank(mem, m) / every}
    else:
        sync_parts = {}
    sync = sum(sync_parts.values())
    ddp = ddp_bytes_per_rank(dense_bytes, t)
    return {
        "memory": mem,
        "a2a": a2a["total"],
        "a2a_parts": a2a,
        "sync": sync,
        "sync_parts": sync_parts,
        "ddp": ddp,
        "total": a2a["total"] + sync + ddp,
        "a2a_per_peer": a2a["total"] / max(n - 1, 1),
    }


# ------------------------------------------------------------------ projection
PROD = dict(
    b=512,
    pooled_features=500,
    pooling=20,
    seq_features=10,
    seq_len=500,
    dim=128,
    table_bytes=10e12,
    dense_params=164e6,  # the Kunlun tower of train_bench.py at production-like sizes
)
SYNC_PERIODS = (1, 4, 16, 64, 256)  # steps per sync, where the unique-id rate is measured and projected


def prod_features(pooled_row_wise: bool) -> List[FeatureTraffic]:
    p = PROD
    return [FeatureTraffic(True, pooled_row_wise, p["pooling"], p["dim"])] * p["pooled_features"] + [FeatureTraffic(False, True, p["seq_len"], p["dim"])] * p[
        "seq_features"
    ]


def prod_rows() -> float:
    """Rows of all ``PROD`` tables together (fp32 rows of ``dim``)."""
    return PROD["table_bytes"] / (PROD["dim"] * EMB_BYTES)


def prod_ids_per_example() -> float:
    """Ids one ``PROD`` example looks up, all features together."""
    p = PROD
    return p["pooled_features"] * p["pooling"] + p["seq_features"] * p["seq_len"]


def prod_touched_rows(t: int, s: int, k: int, rate: str, curve: Optional[Dict[int, float]] = None) -> tuple:
    """``(U, max_r n_r)`` per rank per sync for ``PROD`` with a sync every ``k`` steps.

    ``U``: unique rows among the ``T*b*k*P`` ids of the period's global batches (``P`` ids per
    example), capped at the table rows, spread over the ``S`` ranks holding a copy of the
    tables (mean per rank). ``n_r``: the same for one replica's sharding group, whose ``S``
    ranks look up ``S*b*k*P`` ids. ``rate``: ``"measured"`` takes the unique-id rate from
    ``curve`` (``{k: rate}`` measured on the synthetic source, period ``k`` steps → ``k`` steps;
    the group's period as ``k*S/T`` steps, at least the shortest measured); ``"uniform"`` the
    upper bound :func:`uniform_unique_rate` at the period's ids per row.
    """
    p, rows, ids_pe = PROD, prod_rows(), prod_ids_per_example()
    ids_all = t * p["b"] * k * ids_pe
    ids_group = s * p["b"] * k * ids_pe
    if rate == "measured":
        if not curve:
            raise ValueError("rate='measured' needs a measured curve")
        r_all, r_group = rate_at(curve, k), rate_at(curve, k * s / t)
    elif rate == "uniform":
        r_all, r_group = uniform_unique_rate(ids_all, rows), uniform_unique_rate(ids_group, rows)
    else:
        raise ValueError(f"rate {rate!r}: expected measured or uniform")
    return unique_rows(r_all, ids_all, rows) / s, unique_rows(r_group, ids_group, rows) / s


def smallest_period(total_at, limit: float, k_max: int = 1 << 24) -> Optional[int]:
    """Smallest integer ``k >= 1`` with ``total_at(k) <= limit``, for a ``total_at`` that does not
    increase with ``k`` (an amortised sync); ``None`` if even ``k_max`` does not reach it."""
    if total_at(k_max) > limit:
        return None
    lo, hi = 0, 1  # total_at(lo) > limit (or lo = 0), total_at(hi) <= limit
    while total_at(hi) > limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if total_at(mid) <= limit else (mid, hi)
    return hi


def largest_rate(total_at_rate, limit: float) -> float:
    """Largest unique-id rate ``r`` in ``[0, 1]`` with ``total_at_rate(r) <= limit``, for a
    ``total_at_rate`` that does not decrease with ``r``; 0 if even ``r = 0`` exceeds ``limit``."""
    if total_at_rate(0.0) > limit:
        return 0.0
    if total_at_rate(1.0) <= limit:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_at_rate(mid) <= limit else (lo, mid)
    return lo


def project(pooled_row_wise: bool = False, curve: Optional[Dict[int, float]] = None) -> List[Dict]:
    """1D vs 2D at T = 1024..4096, S = 64..256 for ``PROD``: pooled tables TW/CW (or RW),
    sequence tables RW (item tables too large for one GPU), fp32 weights, row-wise AdaGrad.

    2D is projected with the full sync and with the touched-rows sync, every ``k`` steps for
    ``k`` in ``SYNC_PERIODS``, with the unique-id rate ``"measured"`` (``curve``; skipped without
    one) and ``"uniform"`` (upper bound), and the smallest period ``k`` at which 2D's total per
    step is at most 1D's (``k_le_1d``) and at most half of it (``k_le_half``); ``None``: never.
    ``rate_needed``: the largest unique-id rate (the same for the whole period and for one
    replica's examples) at which a touched sync every step keeps 2D's total at most 1D's
    (``le_1d``) and at most half of it (``le_half``).
    """
    p = PROD
    feats = prod_features(pooled_row_wise)
    opt_bytes = prod_rows() * STATE_BYTES
    dense_bytes = p["dense_params"] * 4
    args = (p["b"], feats, 2, p["table_bytes"], opt_bytes, dense_bytes)
    rates = ["measured", "uniform"] if curve else ["uniform"]
    rows = []
    for t in (1024, 2048, 4096):
        one = predict("1d", t, t, *args)
        for s in (64, 128, 256):
            two = predict("2d", t, s, *args)

            def full_at(k, t=t, s=s):
                return predict("2d", t, s, *args, sync_every=k)["total"]

            sync_kinds = {"full": {"per_k": {}, "k_le_1d": smallest_period(full_at, one["total"]), "k_le_half": smallest_period(full_at, 0.5 * one["total"])}}
            for k in SYNC_PERIODS:
                d = predict("2d", t, s, *args, sync_every=k)
                sync_kinds["full"]["per_k"][k] = {"sync": d["sync"], "total": d["total"], "ratio": d["total"] / one["total"]}
            for rate in rates:

                def touched_at(k, t=t, s=s, rate=rate):
                    return predict("2d_touched", t, s, *args, sync_every=k, touched_rows=prod_touched_rows(t, s, k, rate, curve), dim=p["dim"])

                per_k = {}
                for k in SYNC_PERIODS:
                    d = touched_at(k)
                    u, n_r = prod_touched_rows(t, s, k, rate, curve)
                    per_k[k] = {
                        "union_rows": u,
                        "max_local_rows": n_r,
                        "sync": d["sync"],
                        "sync_parts": d["sync_parts"],
                        "total": d["total"],
                        "ratio": d["total"] / one["total"],
                    }
                sync_kinds[f"touched_{rate}"] = {
                    "per_k": per_k,
                    "k_le_1d": smallest_period(lambda k: touched_at(k)["total"], one["total"]),
                    "k_le_half": smallest_period(lambda k: touched_at(k)["total"], 0.5 * one["total"]),
                }

            def touched_at_rate(r, t=t, s=s):
                return predict("2d_touched", t, s, *args, touched_rows=prod_touched_rows(t, s, 1, "measured", {1: r}), dim=p["dim"])["total"]

            rate_needed = {"le_1d": largest_rate(touched_at_rate, one["total"]), "le_half": largest_rate(touched_at_rate, 0.5 * one["total"])}
            rows.append(
                {
                    "T": t,
                    "S": s,
                    "M": t // s,
                    "1d": one,
                    "2d": two,
                    "a2a_ratio": one["a2a"] / two["a2a"],
                    "total_ratio": one["total"] / two["total"],
                    "breakeven_sync_every": sync_kinds["full"]["k_le_1d"] or float("inf"),
                    "sync_kinds": sync_kinds,
                    "rate_needed": rate_needed,
                }
            )
    return rows


# ------------------------------------------------------------------- counting
class CommCounter:
    """Bytes this rank sends to other ranks, by (phase, category)."""

    def __init__(self) -> None:
        self.bytes: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self.phase = "idle"
        self.active = False
        self.suspended = 0  # >0 inside our DDP hook: its dist.all_reduce is counted by the hook
        # >0 inside a touched-rows sync: what the torch.distributed wrappers see there (its id
        # all-gathers) is kept apart in ``muted_bytes``; the sync's bytes come from its own stats
        self.muted = 0
        self.muted_bytes = 0.0

    def add(self, category: str, nbytes: float, direct: bool = False) -> None:
        """Count ``nbytes`` sent; ``direct``: counted by the harness itself, never muted."""
        if not self.active:
            return
        if self.muted and not direct:
            self.muted_bytes += nbytes
            return
        key = f"{self.phase}/{category}"
        self.bytes[key] += nbytes
        self.calls[key] += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_info(group) -> tuple:
    if isinstance(group, str):  # functional collectives take a group name
        group = dist.distributed_c10d._resolve_process_group(group)
    return dist.get_rank(group), dist.get_world_size(group)


def _a2a_single_sent(inp: torch.Tensor, input_split_sizes, rank: int, n: int) -> int:
    if inp.numel() == 0 or n == 1:
        return 0
    rows = inp.size(0)
    row_bytes = _nbytes(inp) // rows
    splits = list(input_split_sizes) if input_split_sizes else [rows // n] * n
    return (rows - int(splits[rank])) * row_bytes


def _a2a_category(t: torch.Tensor, has_splits: bool) -> str:
    if t.is_floating_point():
        return "emb"
    if not has_splits:
        return "splits"
    return "lengths" if t.dtype == torch.int32 else "ids"


@contextmanager
def counting(counter: CommCounter):
    """Wrap the torch.distributed entry points TorchRec uses; restore them on exit."""
    saved = {}

    def patch(mod, name, make):
        orig = getattr(mod, name)
        saved[(mod, name)] = orig
        setattr(mod, name, functools.wraps(orig)(make(orig)))

    def a2a_single(orig):
        def f(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rank, n = _group_info(group)
            counter.add(_a2a_category(input, input_split_sizes is not None), _a2a_single_sent(input, input_split_sizes, rank, n))
            return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        return f

    def a2a_list(orig):
        def f(output_tensor_list, input_tensor_list, group=None, async_op=False):
            rank, _ = _group_info(group)
            sent = sum(_nbytes(x) for i, x in enumerate(input_tensor_list) if i != rank)
            counter.add(_a2a_category(input_tensor_list[0], True), sent)
            return orig(output_tensor_list, input_tensor_list, group=group, async_op=async_op)

        return f

    def reduce_scatter(orig):
        def f(output, input_list, *a, group=None, **k):
            rank, _ = _group_info(group)
            counter.add("emb", sum(_nbytes(x) for i, x in enumerate(input_list) if i != rank))
            return orig(output, input_list, *a, group=group, **k)

        return f

    def reduce_scatter_tensor(orig):
        def f(output, input, *a, group=None, **k):
            _, n = _group_info(group)
            counter.add("emb", _nbytes(input) * (n - 1) / n)
            return orig(output, input, *a, group=group, **k)

        return f

    def all_gather(orig):
        def f(tensor_list, tensor, group=None, async_op=False):
            _, n = _group_info(group)
            counter.add("emb", _nbytes(tensor) * (n - 1))
            return orig(tensor_list, tensor, group=group, async_op=async_op)

        return f

    def all_gather_into_tensor(orig):
        def f(output_tensor, input_tensor, group=None, async_op=False):
            _, n = _group_info(group)
            counter.add("emb", _nbytes(input_tensor) * (n - 1))
            return orig(output_tensor, input_tensor, group=group, async_op=async_op)

        return f

    def all_reduce(orig):
        def f(tensor, *a, group=None, **k):
            if not counter.suspended:
                _, n = _group_info(group)
                counter.add("other", 2 * (n - 1) / n * _nbytes(tensor))
            return orig(tensor, *a, group=group, **k)

        return f

    def broadcast(orig):
        def f(tensor, *a, group=None, **k):
            _, n = _group_info(group)
            counter.add("other", _nbytes(tensor) * (n - 1) / n)
            return orig(tensor, *a, group=group, **k)

        return f

    def funcol_a2a(orig):
        def f(self, output_split_sizes, input_split_sizes, group, tag=""):
            rank, n = _group_info(group)
            counter.add(_a2a_category(self, input_split_sizes is not None), _a2a_single_sent(self, input_split_sizes, rank, n))
            return orig(self, output_split_sizes, input_split_sizes, group, tag)

        return f

    for name, make in [
        ("all_to_all_single", a2a_single),
        ("all_to_all", a2a_list),
        ("reduce_scatter", reduce_scatter),
        ("reduce_scatter_tensor", reduce_scatter_tensor),
        ("all_gather", all_gather),
        ("all_gather_into_tensor", all_gather_into_tensor),
        ("all_reduce", all_reduce),
        ("broadcast", broadcast),
    ]:
        patch(dist, name, make)
    patch(funcol, "all_to_all_single", funcol_a2a)
    try:
        yield counter
    finally:
        for (mod, name), orig in saved.items():
            setattr(mod, name, orig)


def find_ddp(dmp: torch.nn.Module) -> Optional[DistributedDataParallel]:
    m = getattr(dmp, "_dmp_wrapped_module", None)
    if isinstance(m, DistributedDataParallel):
        return m
    return next((x for x in dmp.modules() if isinstance(x, DistributedDataParallel)), None)


def install_ddp_hook(ddp: DistributedDataParallel, counter: CommCounter) -> None:
    pg = ddp.process_group
    n = dist.get_world_size(pg)

    def hook(state, bucket):
        counter.add("ddp", 2 * (n - 1) / n * _nbytes(bucket.buffer()))
        counter.suspended += 1
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            counter.suspended -= 1

    ddp.register_comm_hook(pg, hook)


def install_sync_counter(dmp, counter: CommCounter) -> bool:
    """Wrap ``DMPCollection._allreduce_tensors`` on the instance (2D only)."""
    if not hasattr(dmp, "_allreduce_tensors"):
        return False
    orig = dmp._allreduce_tensors

    def wrapped(ctx, tensors_dict, annotation, opts=None):
        m = dist.get_world_size(ctx.replica_pg)
        nbytes = sum(_nbytes(t) for ts in tensors_dict.values() for t in ts)
        counter.add("sync_opt" if "optimizer" in annotation else "sync_weights", 2 * (m - 1) / m * nbytes)
        return orig(ctx, tensors_dict, annotation, opts)

    dmp._allreduce_tensors = wrapped
    return True


# --------------------------------------------------------------------- memory
def _local_tensors(v) -> List[torch.Tensor]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(v, ShardedTensor):
        return [s.tensor for s in v.local_shards()]
    if isinstance(v, DTensor):
        loc = v.to_local()
        return list(loc.local_shards()) if hasattr(loc, "local_shards") else [loc]
    return [v] if isinstance(v, torch.Tensor) else []


def embedding_memory(trainer, tables: List[str]) -> Dict[str, int]:
    sd = trainer.model.state_dict()
    weights = sum(_nbytes(t) for k, v in sd.items() if any(f".{name}.weight" in k for name in tables) for t in _local_tensors(v))
    osd = trainer.model.fused_optimizer.state_dict()["state"]
    state = sum(_nbytes(t) for per_param in osd.values() for v in per_param.values() for t in _local_tensors(v))
    return {"weights": weights, "optimizer": state, "total": weights + state}


# ------------------------------------------------------------------------ runs
MIXES: Dict[str, List[str]] = {
    # six tiny tables (the tiny preset): communication is ids + small embeddings, memory trivial
    "small": ["data.batch_size=64"],
    # large id tables dominate memory (user 400k rows; item and seq_item 200k rows each), D = 32
    "large": [
        "data.synthetic.num_users=400000",
        "data.synthetic.num_items=200000",
        "data.synthetic.num_categories=200",
        "model.embedding_dim=32",
        "data.batch_size=128",
    ],
    # long histories, wider rows: the sequence embeddings dominate the all-to-all
    "long-seq": [
        "data.synthetic.num_users=20000",
        "data.synthetic.num_items=50000",
        "data.synthetic.num_categories=100",
        "data.synthetic.max_seq_len=128",
        "model.embedding_dim=64",
        "data.batch_size=128",
    ],
    # "large" with every table row-wise in both strategies: same sharding type, only n differs
    "large-rw": [
        "data.synthetic.num_users=400000",
        "data.synthetic.num_items=200000",
        "data.synthetic.num_categories=200",
        "model.embedding_dim=32",
        "data.batch_size=128",
        "parallel.sparse.sharding_types=[row_wise]",
    ],
}
CURVE_MIXES = ("large", "large-rw")  # whose unique-id rate the projection uses (first found)
STRATEGIES = {
    "1d": ["parallel.sparse.strategy=1d"],
    "2d": ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2", "parallel.sparse.sync_every_n_steps=1", "parallel.sparse.sync=full"],
    "2d_touched": [
        "parallel.sparse.strategy=2d",
        "parallel.sparse.sharding_group_size=2",
        "parallel.sparse.sync_every_n_steps=1",
        "parallel.sparse.sync=touched",
    ],
}
# No table_column_wise: for a TWCW table TorchRec 1.8's create_global_tensor_shape_stride_from_metadata
# returns no shape, and 2D (DTensor state) then fails in DTensor.from_local on a rank of the
# sharding group that holds no shard of it ("Found shape:None ..."). The planner picks TWCW
# at random among equal-cost candidates for single-shard tables (where it equals TW).
COMMON = [
    "parallel.sparse.sharding_types=[table_wise,row_wise,column_wise]",
    "checkpoint.every_n_steps=0",
    "checkpoint.resume=never",
    "trainer.eval_every_n_steps=0",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.level=WARNING",
    "trainer.device=cpu",
]


def table_configs(trainer) -> tuple:
    """The (unsharded) TorchRec table configs of the trainer's model: pooled, sequence."""
    from kunlun.model.embeddings import context_table_configs, sequence_table_configs

    dim = trainer.cfg.model.embedding_dim
    return context_table_configs(trainer.schema, dim), sequence_table_configs(trainer.schema, dim)


def plan_features(trainer, ids_per_example: Dict[str, float]) -> tuple:
    """``FeatureTraffic`` per KJT key from the sharding plan, and the number of KJT input dists."""
    feats, dists = [], set()
    pooled_cfgs, seq_cfgs = table_configs(trainer)
    tables = {c.name: (True, c) for c in pooled_cfgs}
    tables.update({c.name: (False, c) for c in seq_cfgs})
    unmodelled = []
    for module_path, module_plan in trainer.plan.plan.items():
        for table, ps in module_plan.items():
            pooled, cfg = tables[table]
            st = ps.sharding_type
            dists.add((module_path, st))
            if st not in ("table_wise", "row_wise", "column_wise", "table_column_wise"):
                unmodelled.append(f"{table}:{st}")
            rw = st == "row_wise"
            shards = 1 if rw else len(ps.sharding_spec.shards) if ps.sharding_spec is not None else 1
            for fname in cfg.feature_names:
                feats.append(FeatureTraffic(pooled, rw, ids_per_example[fname], cfg.embedding_dim, shards))
    return feats, len(dists), unmodelled


def batch_table_ids(batch, table_of_key: Dict[str, str]) -> Dict[str, np.ndarray]:
    """Row ids (int64, repeats kept) each table is looked up with by ``batch``, all the
    features that read the table together."""
    out: Dict[str, List[np.ndarray]] = defaultdict(list)
    for kjt in (batch.context, batch.sequences):
        values = kjt.values().cpu().numpy()
        at = 0
        for key, count in zip(kjt.keys(), kjt.length_per_key()):
            if key in table_of_key:
                out[table_of_key[key]].append(values[at : at + count].astype(np.int64))
            at += count
    return {t: np.concatenate(v) for t, v in out.items()}


def trained_unique(step_rows_per_rank: List[List[Dict[str, List[int]]]], step_ids_per_rank: List[List[int]], groups: List[List[int]]) -> Dict[str, float]:
    """Unique rows of the trained batches, per step (means over the measured steps).

    ``step_rows_per_rank[r][i]``: table -> rank ``r``'s distinct ids at measured step ``i``;
    ``step_ids_per_rank[r][i]``: ids (with repeats) rank ``r`` looked up then, all tables.
    ``ids``: ids the global batch looks up; ``unique``: distinct (table, row) pairs among them
    (the rows a touched sync every step averages, summed over the shards of one copy);
    ``rate = unique / ids``. ``group_*``: the same over one sharding group's examples (ranks of
    ``groups``), mean (``group_unique``) and max (``group_unique_max``) over the groups;
    ``group_rate = sum over groups of unique / ids``.
    """
    steps = len(step_rows_per_rank[0])
    tot = defaultdict(float)
    for i in range(steps):
        tables = {t for r in step_rows_per_rank for t in r[i]}
        tot["ids"] += sum(r[i] for r in step_ids_per_rank)
        tot["unique"] += sum(len(set().union(*(r[i].get(t, []) for r in step_rows_per_rank))) for t in tables)
        g_unique = [sum(len(set().union(*(step_rows_per_rank[r][i].get(t, []) for r in g))) for t in tables) for g in groups]
        tot["group_unique"] += sum(g_unique) / len(groups)
        tot["group_unique_max"] += max(g_unique)
    out = {k: v / steps for k, v in tot.items()}
    out["rate"] = out["unique"] / out["ids"]
    out["group_rate"] = out["group_unique"] * len(groups) / out["ids"]
    return out


def table_column_shards(trainer) -> Dict[str, int]:
    """Column shards per table of the plan (1 for TW and RW)."""
    out = {}
    for module_plan in trainer.plan.plan.values():
        for table, ps in module_plan.items():
            cw = ps.sharding_type in ("column_wise", "table_column_wise") and ps.sharding_spec is not None
            out[table] = len(ps.sharding_spec.shards) if cw else 1
    return out


def source_unique_curve(trainer, table_of_key: Dict[str, str], ks: Sequence[int]) -> Dict[int, Dict]:
    """:func:`unique_id_curve` on the first ``max(ks)`` global batches of the trainer's train
    stream (read from its source in training order, without training)."""
    from kunlun.data.loader import ShardedBatches

    d = trainer.cfg.data
    ds = ShardedBatches(trainer.source, "train", d.batch_size, rank=0, world_size=1, seed=trainer.cfg.seed, shuffle=d.shuffle, id_policy=d.id_policy)
    batches = [batch_table_ids(ds.batch(i), table_of_key) for i in range(max(ks))]
    curve = unique_id_curve(batches, ks)
    for k, v in curve.items():
        v["examples"] = d.batch_size * k
    return curve


def run_one(mix: str, strategy: str, run_dir: str, warmup: int, steps: int, extra: Sequence[str] = ()) -> Dict:
    from kunlun.trainer.config import load_config
    from kunlun.trainer.trainer import Trainer

    overrides = COMMON + [f"run_dir={run_dir}/{mix}-{strategy}", f"trainer.max_steps={warmup + steps}"] + MIXES[mix] + STRATEGIES[strategy] + list(extra)
    cfg = load_config("tiny", overrides)
    trainer = Trainer(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = trainer.sharded.layout
    n = world if strategy == "1d" else layout.sharding_group_size
    m = world // n
    pooled_cfgs, seq_cfgs = table_configs(trainer)
    table_cfgs = list(pooled_cfgs) + list(seq_cfgs)
    tables = [c.name for c in table_cfgs]
    table_bytes = sum(c.num_embeddings * c.embedding_dim * EMB_BYTES for c in table_cfgs)
    opt_bytes = sum(c.num_embeddings * STATE_BYTES for c in table_cfgs)
    dense_bytes = sum(_nbytes(p) for name, p in trainer.model.named_parameters() if "tower" in name)

    counter = CommCounter()
    ddp = find_ddp(trainer.model)
    if ddp is None:
        raise RuntimeError("no DistributedDataParallel inside the DMP: cannot count the dense all-reduce")
    install_ddp_hook(ddp, counter)
    has_sync = install_sync_counter(trainer.model, counter)

    table_of_key = {f: c.name for c in table_cfgs for f in c.feature_names}
    touched = trainer.sharded.touched
    _, loader = trainer._loader("train")
    it = iter(loader)
    ids = defaultdict(float)
    step_rows: List[Dict[str, List[int]]] = []  # per measured step: table -> this rank's distinct ids
    step_ids: List[int] = []  # per measured step: ids this rank looked up (repeats counted)
    examples = 0
    seconds = []
    try:
        with counting(counter):
            for step in range(warmup + steps):
                measured = step >= warmup
                batch = next(it).to(trainer.info.device)
                if measured:
                    examples += batch.dense.size(0)
                    for kjt in (batch.context, batch.sequences):
                        for key, count in zip(kjt.keys(), kjt.length_per_key()):
                            ids[key] += count
                    looked_up = batch_table_ids(batch, table_of_key)
                    step_rows.append({t: np.unique(v).tolist() for t, v in looked_up.items()})
                    step_ids.append(int(sum(v.size for v in looked_up.values())))
                t0 = time.perf_counter()
                counter.active = measured
                trainer.optimizer.zero_grad()
                counter.phase = "fwd"
                loss, _ = trainer.model(batch)
                counter.phase = "bwd"
                loss.backward()
                counter.phase = "opt"
                trainer.optimizer.step()
                trainer.lr_scheduler.step()
                counter.phase = "sync"
                if touched is None:
                    trainer.sharded.maybe_sync(step + 1)
                else:  # its all-gathers are not all-to-all traffic: count its own stats instead
                    before = (touched.stats.bytes_ids, touched.stats.bytes_values)
                    counter.muted += 1
                    try:
                        trainer.sharded.maybe_sync(step + 1)
                    finally:
                        counter.muted -= 1
                    counter.add("sync_ids", touched.stats.bytes_ids - before[0], direct=True)
                    counter.add("sync_values", touched.stats.bytes_values - before[1], direct=True)
                counter.active = False
                seconds.append(time.perf_counter() - t0)
    finally:
        if has_sync:
            del trainer.model._allreduce_tensors  # back to the class method
    mem = embedding_memory(trainer, tables)
    if has_sync:  # cross-check: the tensors the sync all-reduces are exactly the local shards + state
        ctx = trainer.model._ctxs[0]
        synced = sum(_nbytes(t) for d in (ctx.weights_by_dtype, ctx.optimizer_tensors_by_dtype) for ts in d.values() for t in ts)
        mem["synced_tensors"] = synced
    local = {
        "rank": rank,
        "bytes": {k: v / steps for k, v in counter.bytes.items()},
        "calls": {k: v / steps for k, v in counter.calls.items()},
        "memory": mem,
        "ids": dict(ids),
        "examples": examples,
        "step_rows": step_rows,
        "step_ids": step_ids,
        "step_seconds": seconds[warmup:],
        "muted_bytes": counter.muted_bytes / steps,
        "touched": None
        if touched is None
        else {"rows_total": touched.stats.rows_total, "per_sync_union": touched.stats.per_sync_union[warmup:], "syncs": touched.stats.syncs},
    }
    gathered: List[Dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    from kunlun.parallel.planner import describe_plan

    plan_text = describe_plan(trainer.plan)
    # mean ids per example over every rank's measured batches
    total_examples = sum(g["examples"] for g in gathered)
    ids_pe = {k: sum(g["ids"].get(k, 0) for g in gathered) / total_examples for k in gathered[0]["ids"]}
    feats, n_dists, unmodelled = plan_features(trainer, ids_pe)
    b = total_examples / world / steps
    groups = layout.sharding_groups() if strategy != "1d" else [list(range(world))]
    uniq = trained_unique([g["step_rows"] for g in gathered], [g["step_ids"] for g in gathered], groups)
    for g in gathered:
        del g["step_rows"]  # ids, not needed in the output
    dim = trainer.cfg.model.embedding_dim
    touched_rows = None
    if strategy == "2d_touched":
        multi = [f"{t}:{c} column shards" for t, c in table_column_shards(trainer).items() if c > 1]
        if multi:  # each column shard has its own rows and state: U counts (rows x shards) of D/shards
            unmodelled += multi
        # mean over ranks: each of the S ranks of a sharding group holds 1/S of the union rows;
        # max_r n_r ~ the most rows one sharding group (one replica) touched, / S
        touched_rows = (uniq["rate"] * uniq["ids"] / n, uniq["group_unique_max"] / n)
    pred = predict(strategy, world, n, b, feats, n_dists, table_bytes, opt_bytes, dense_bytes, touched_rows=touched_rows, dim=dim)
    curve = source_unique_curve(trainer, table_of_key, SYNC_PERIODS) if strategy == "2d_touched" and rank == 0 else None

    # free this run's resources but keep the default process group (see the module docstring)
    trainer.monitor.close()
    if has_sync:
        ctx = trainer.model._ctxs[0]
        pgs = {ctx.sharding_pg, ctx.replica_pg}
    else:
        pgs = set()
    del trainer, ddp, loader, it
    gc.collect()
    dist.barrier()
    for pg in pgs:
        if pg is not None and pg is not dist.GroupMember.WORLD:
            try:
                dist.destroy_process_group(pg)
            except Exception as e:  # noqa: BLE001 - best effort; leaking a subgroup is harmless here
                print(f"[parallel_bench] rank {rank}: could not destroy a 2D subgroup: {e}", file=sys.stderr)
    return {
        "mix": mix,
        "strategy": strategy,
        "overrides": overrides,
        "T": world,
        "n": n,
        "M": m,
        "local_batch": b,
        "table_bytes": table_bytes,
        "optimizer_bytes": opt_bytes,
        "dense_bytes": dense_bytes,
        "ids_per_example": ids_pe,
        "plan": plan_text,
        "input_dists": n_dists,
        "unmodelled_sharding": unmodelled,
        "predicted": pred,
        "touched_rows_model": touched_rows,
        "trained_unique": uniq,
        "unique_curve": curve,
        "per_rank": gathered,
    }


# ----------------------------------------------------------------- summaries
def summarise(run: Dict) -> Dict:
    """Measured per-rank means (and spread) in the model's categories."""
    per_rank = run["per_rank"]

    def cat(g, pred):
        return sum(v for k, v in g["bytes"].items() if pred(k))

    parts = {
        "splits": lambda k: k.endswith("/splits"),
        "lengths": lambda k: k.endswith("/lengths"),
        "ids": lambda k: k.endswith("/ids"),
        "emb_fwd": lambda k: k == "fwd/emb",
        "emb_bwd": lambda k: k == "bwd/emb",
    }
    meas = {name: sum(cat(g, p) for g in per_rank) / len(per_rank) for name, p in parts.items()}
    a2a = [sum(cat(g, p) for p in parts.values()) for g in per_rank]
    emb_other = sum(cat(g, lambda k: k.endswith("/emb") and k not in ("fwd/emb", "bwd/emb")) for g in per_rank) / len(per_rank)
    sync = [cat(g, lambda k: "/sync_" in k) for g in per_rank]
    sync_parts = {
        name: sum(cat(g, lambda k, name=name: k.endswith(f"/sync_{name}")) for g in per_rank) / len(per_rank) for name in ("weights", "opt", "ids", "values")
    }
    ddp = [cat(g, lambda k: k.endswith("/ddp")) for g in per_rank]
    other = [cat(g, lambda k: k.endswith("/other")) for g in per_rank]
    mem = [g["memory"]["total"] for g in per_rank]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    total = [a + s + d + o for a, s, d, o in zip(a2a, sync, ddp, other)]
    return {
        "a2a_parts": meas,
        "a2a": mean(a2a),
        "a2a_min": min(a2a),
        "a2a_max": max(a2a),
        "emb_other": emb_other,
        "sync": mean(sync),
        "sync_min": min(sync),
        "sync_max": max(sync),
        "sync_parts": sync_parts,
        "gathered_in_sync": mean([g.get("muted_bytes", 0.0) for g in per_rank]),
        "ddp": mean(ddp),
        "other": mean(other),
        "total": mean(total),
        "memory": mean(mem),
        "memory_min": min(mem),
        "memory_max": max(mem),
        "synced_tensors": mean([g["memory"].get("synced_tensors", 0) for g in per_rank]),
    }


def kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def human(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f} B"


def sharding_summary(plan_text: str) -> str:
    """``"4TW 2RW"`` from ``describe_plan`` text. A CW / TWCW table with one shard is counted as
    TW: same placement and traffic, and the planner labels such equal-cost candidates
    differently from run to run."""
    counts: Dict[str, int] = defaultdict(int)
    abbrev = {"table_wise": "TW", "row_wise": "RW", "column_wise": "CW", "table_column_wise": "TWCW", "table_row_wise": "TWRW"}
    for line in plan_text.splitlines()[1:]:
        parts = line.split(None, 4)
        if len(parts) == 5:
            kind = abbrev.get(parts[2], parts[2])
            if kind in ("CW", "TWCW") and len(json.loads(parts[4])) == 1:
                kind = "TW"
            counts[kind] += 1
    return " ".join(f"{v}{k}" for k, v in sorted(counts.items(), key=lambda kv: kv[0] != "TW"))


LABELS = {"1d": "1D", "2d": "2D full", "2d_touched": "2D touched"}


def _table(hdr: str) -> None:
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))


def _period(k: Optional[int]) -> str:
    return "never" if k is None else f"{k:,}"


def print_tables(runs: List[Dict], projections: Dict[str, List[Dict]], curve_mix: Optional[str]) -> None:
    print("\nMeasured vs predicted, per rank per training step (KiB; measured = mean over ranks [min-max]):")
    _table(
        "| mix | strategy | plan | emb memory meas [min-max] | pred | a2a meas [min-max] | pred | meas/pred "
        "| sync meas [min-max] | pred | DDP meas | pred | other | total meas | pred |"
    )
    for r in runs:
        s, p = r["summary"], r["predicted"]
        label = "1D (n=T=4)" if r["strategy"] == "1d" else f"{LABELS[r['strategy']]} (S={r['n']}, M={r['M']})"
        sync = kib(s["sync"]) if s["sync_min"] == s["sync_max"] else f"{kib(s['sync'])} [{kib(s['sync_min'])}-{kib(s['sync_max'])}]"
        print(
            f"| {r['mix']} | {label} | {sharding_summary(r['plan'])} | {kib(s['memory'])} [{kib(s['memory_min'])}-{kib(s['memory_max'])}] "
            f"| {kib(p['memory'])} | {kib(s['a2a'])} [{kib(s['a2a_min'])}-{kib(s['a2a_max'])}] | {kib(p['a2a'])} "
            f"| {s['a2a'] / p['a2a']:.3f} | {sync} | {kib(p['sync'])} | {kib(s['ddp'])} | {kib(p['ddp'])} "
            f"| {kib(s['other'])} | {kib(s['total'])} | {kib(p['total'])} |"
        )
    print("\nAll-to-all by component, measured / predicted (KiB per rank per step):")
    _table("| mix | strategy | splits | lengths | ids | embeddings fwd | gradients bwd |")
    for r in runs:
        s, p = r["summary"]["a2a_parts"], r["predicted"]["a2a_parts"]
        cells = " | ".join(f"{kib(s[k])} / {kib(p[k])}" for k in ("splits", "lengths", "ids", "emb_fwd", "emb_bwd"))
        print(f"| {r['mix']} | {r['strategy']} | {cells} |")

    touched = [r for r in runs if r["strategy"] == "2d_touched"]
    if touched:
        print("\nTouched-rows sync every step (S=2, M=2), per rank per step: unique-id rate of the trained batches, rows, bytes (KiB):")
        _table(
            "| mix | plan | ids/step (global) | unique rows/step | rate | group rate | U/rank pred | U/rank meas "
            "| n_r pred | ids meas / pred | values meas / pred | sync meas / pred | all-gathered in sync (muted) | full sync (2D full run) | touched/full |"
        )
        full = {r["mix"]: r["summary"]["sync"] for r in runs if r["strategy"] == "2d"}
        for r in touched:
            s, p, u = r["summary"], r["predicted"], r["trained_unique"]
            union = [x for g in r["per_rank"] for x in (g["touched"] or {}).get("per_sync_union", [])]
            meas_u = sum(union) / len(union) if union else 0.0
            fs = full.get(r["mix"])
            ratio = f"{s['sync'] / fs:.4f}" if fs else "-"
            print(
                f"| {r['mix']} | {sharding_summary(r['plan'])} | {u['ids']:,.0f} | {u['unique']:,.0f} | {u['rate']:.3f} | {u['group_rate']:.3f} "
                f"| {r['touched_rows_model'][0]:,.1f} | {meas_u:,.1f} | {r['touched_rows_model'][1]:,.1f} "
                f"| {kib(s['sync_parts']['ids'])} / {kib(p['sync_parts']['ids'])} | {kib(s['sync_parts']['values'])} / {kib(p['sync_parts']['values'])} "
                f"| {kib(s['sync'])} / {kib(p['sync'])} | {kib(s['gathered_in_sync'])} "
                f"| {'-' if fs is None else kib(fs)} | {ratio} |"
            )
        print("\nUnique-id rate of the synthetic source over a sync period of k global batches (training order, first 256 batches; means over windows):")
        _table("| mix | k | examples | ids | unique rows | rate = unique/ids | ids per table row |")
        for r in touched:
            if not r.get("unique_curve"):
                continue
            rows = r["optimizer_bytes"] / STATE_BYTES  # one AdaGrad state per table row
            for k, v in sorted(r["unique_curve"].items(), key=lambda kv: int(kv[0])):
                print(f"| {r['mix']} | {k} | {v['examples']:,} | {v['ids']:,.0f} | {v['unique']:,.0f} | {v['rate']:.4f} | {v['ids'] / rows:.3g} |")

    print("\nSummary, 2D (S=2) relative to 1D (T=4), measured:")
    _table("| mix | emb memory 2D/1D | a2a 2D/1D | sync KiB: 2D full, 2D touched | total 2D full/1D | total 2D touched/1D |")
    by = {(r["mix"], r["strategy"]): r["summary"] for r in runs}
    for mix in dict.fromkeys(r["mix"] for r in runs):
        a, c, d = by.get((mix, "1d")), by.get((mix, "2d")), by.get((mix, "2d_touched"))
        if a is None or c is None:
            continue
        touched_ratio = "-" if d is None else f"{d['total'] / a['total']:.2f}"
        print(
            f"| {mix} | {c['memory'] / a['memory']:.2f} | {c['a2a'] / a['a2a']:.2f} | {kib(c['sync'])}, {'-' if d is None else kib(d['sync'])} "
            f"| {c['total'] / a['total']:.2f} | {touched_ratio} |"
        )
    p = PROD
    for name, rows in projections.items():
        print(
            f"\nProjection ({name}): b={p['b']}, {p['pooled_features']} pooled features x p={p['pooling']}, "
            f"{p['seq_features']} sequence features x L={p['seq_len']} (RW), D={p['dim']}, tables {human(p['table_bytes'])} fp32 "
            f"+ row-wise AdaGrad, dense {p['dense_params'] / 1e6:.0f}M params fp32, 2D full sync every step:"
        )
        _table(
            "| T | S | M | emb memory/rank 1D | 2D | a2a/rank 1D | 2D | a2a 1D/2D | a2a per peer 1D | 2D | sync/rank 2D "
            "| DDP/rank | total 1D | 2D | total 1D/2D | full sync every k ≥ for 2D total ≤ 1D |"
        )
        for row in rows:
            one, two = row["1d"], row["2d"]
            print(
                f"| {row['T']} | {row['S']} | {row['M']} | {human(one['memory'])} | {human(two['memory'])} | {human(one['a2a'])} "
                f"| {human(two['a2a'])} | {row['a2a_ratio']:.3f} | {human(one['a2a_per_peer'])} | {human(two['a2a_per_peer'])} "
                f"| {human(two['sync'])} | {human(one['ddp'])} | {human(one['total'])} | {human(two['total'])} "
                f"| {row['total_ratio']:.3f} | {_period(row['sync_kinds']['full']['k_le_1d'])} |"
            )
        for kind, what in (
            ("full", "full sync"),
            ("touched_measured", f"touched sync, unique-id rate measured on the synthetic source ({curve_mix}), k steps -> k steps"),
            ("touched_uniform", "touched sync, unique-id rate of uniform ids (upper bound)"),
        ):
            if kind not in rows[0]["sync_kinds"]:
                continue
            print(f"\n  {name}, {what}: total 2D / 1D per step with a sync every k steps; smallest k for 2D total ≤ 1D, ≤ 0.5x 1D")
            ks = " | ".join(f"k={k}" for k in SYNC_PERIODS)
            _table(f"| T | S | M | total 1D | {ks} | k for ≤ 1D | k for ≤ 0.5x |")
            for row in rows:
                sk = row["sync_kinds"][kind]
                cells = " | ".join(f"{sk['per_k'][k]['ratio']:.3g}" for k in SYNC_PERIODS)
                print(
                    f"| {row['T']} | {row['S']} | {row['M']} | {human(row['1d']['total'])} | {cells} | {_period(sk['k_le_1d'])} | {_period(sk['k_le_half'])} |"
                )
        print(f"\n  {name}: largest unique-id rate (unique rows / ids, per step) at which a touched sync every step keeps 2D's total ≤ 1D, ≤ 0.5x 1D")
        _table("| T | S | M | rate for ≤ 1D | rate for ≤ 0.5x |")
        for row in rows:
            need = row["rate_needed"]
            print(f"| {row['T']} | {row['S']} | {row['M']} | {need['le_1d']:.3g} | {need['le_half']:.3g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON output path (default: $OUT/parallel_bench.json when $OUT is set)")
    ap.add_argument("--mixes", nargs="*", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every job, e.g. parallel.sparse.comm_precision=fp16")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=4 benchmarks/parallel_bench.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % 2:
        sys.exit("needs an even world size (2D uses sharding groups of 2)")
    box = [tempfile.mkdtemp(prefix="parallel-bench-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    run_dir = box[0]
    t_start = time.time()
    runs = []
    try:
        for mix in args.mixes:
            for strategy in args.strategies:
                if rank == 0:
                    print(f"[parallel_bench] {mix} / {strategy} ...", flush=True)
                r = run_one(mix, strategy, run_dir, args.warmup, args.steps, args.extra)
                r["summary"] = summarise(r)
                runs.append(r)
        if rank == 0:
            # the PROD unique-id rate: the mix with the largest tables (most like production's
            # ids per row), else the first one measured
            curves = {r["mix"]: r["unique_curve"] for r in runs if r.get("unique_curve")}
            curve_mix = next((m for m in CURVE_MIXES if m in curves), next(iter(curves), None))
            curve = {k: v["rate"] for k, v in curves[curve_mix].items()} if curve_mix else None
            projections = {
                "pooled TW/CW, sequence RW": project(pooled_row_wise=False, curve=curve),
                "every table RW": project(pooled_row_wise=True, curve=curve),
            }
            for r in runs:
                print(f"\nplan {r['mix']} / {r['strategy']} (n={r['n']}):\n{r['plan']}")
            print_tables(runs, projections, curve_mix)
            print(f"\nwall time {time.time() - t_start:.0f} s (world {world}, gloo, CPU)")
            out = args.out or (os.path.join(os.environ["OUT"], "parallel_bench.json") if os.environ.get("OUT") else None)
            if out:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                doc = {
                    "world_size": world,
                    "torch": torch.__version__,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "runs": runs,
                    "projection_assumptions": PROD,
                    "projection_unique_rate": {"mix": curve_mix, "rate_by_period": curve},
                    "projections": projections,
                    "model_constants": {
                        "id_bytes": ID_BYTES,
                        "len_bytes": LEN_BYTES,
                        "emb_bytes": EMB_BYTES,
                        "state_bytes": STATE_BYTES,
                        "splits_per_dist": SPLITS_PER_DIST,
                    },
                }
                with open(out, "w") as f:
                    json.dump(doc, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
                print(f"wrote {out}")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
