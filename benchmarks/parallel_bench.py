"""Sparse parallelism, 1D vs 2D: per-rank embedding memory and communication bytes.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=4 benchmarks/parallel_bench.py [--out FILE]

For a few table mixes (config overrides of the synthetic source, ``MIXES``) and both
strategies — 1D (every table sharded over all ``T`` ranks) and 2D (sharding groups of
``S = 2``, ``M = T/S`` replica groups, replica sync every step) — it builds a real
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
``sync_bytes_per_rank``, ``ddp_bytes_per_rank``) is documented at each function; it is
fed with the plan the planner made (sharding type per table) and the mean ids per example
measured on the very batches trained, so measured vs predicted isolates the model. It also
projects 1D vs 2D to 1024-4096 GPUs (``project``).
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


def predict(
    strategy: str, t: int, s: int, b: float, feats, num_input_dists: int, table_bytes: float, optimizer_bytes: float, dense_bytes: float, sync_every: int = 1
) -> Dict[str, float]:
    """Per-rank, per-step bytes of one strategy (``s`` ignored for 1D; sync amortised over ``sync_every`` steps)."""
    n = t if strategy == "1d" else s
    m = t // n
    mem = embedding_bytes_per_rank(table_bytes, optimizer_bytes, n)
    a2a = a2a_bytes_per_rank(n, b, feats, num_input_dists)
    sync = sync_bytes_per_rank(mem, m) / max(sync_every, 1) if m > 1 and sync_every else 0.0
    ddp = ddp_bytes_per_rank(dense_bytes, t)
    return {
        "memory": mem,
        "a2a": a2a["total"],
        "a2a_parts": a2a,
        "sync": sync,
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


def prod_features(pooled_row_wise: bool) -> List[FeatureTraffic]:
    p = PROD
    return [FeatureTraffic(True, pooled_row_wise, p["pooling"], p["dim"])] * p["pooled_features"] + [FeatureTraffic(False, True, p["seq_len"], p["dim"])] * p[
        "seq_features"
    ]


def project(pooled_row_wise: bool = False) -> List[Dict]:
    """1D vs 2D at T = 1024..4096, S = 64..256 for ``PROD``: pooled tables TW/CW (or RW),
    sequence tables RW (item tables too large for one GPU), fp32 weights, row-wise AdaGrad."""
    p = PROD
    feats = prod_features(pooled_row_wise)
    opt_bytes = p["table_bytes"] / (p["dim"] * EMB_BYTES) * STATE_BYTES
    dense_bytes = p["dense_params"] * 4
    rows = []
    for t in (1024, 2048, 4096):
        one = predict("1d", t, t, p["b"], feats, 2, p["table_bytes"], opt_bytes, dense_bytes)
        for s in (64, 128, 256):
            two = predict("2d", t, s, p["b"], feats, 2, p["table_bytes"], opt_bytes, dense_bytes)
            # steps between syncs that keep 2D's total at or below 1D's
            saved = one["a2a"] - two["a2a"]
            full_sync = sync_bytes_per_rank(two["memory"], t // s)
            breakeven = max(1, math.ceil(full_sync / saved)) if saved > 0 else float("inf")
            rows.append(
                {
                    "T": t,
                    "S": s,
                    "M": t // s,
                    "1d": one,
                    "2d": two,
                    "a2a_ratio": one["a2a"] / two["a2a"],
                    "total_ratio": one["total"] / two["total"],
                    "breakeven_sync_every": breakeven,
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

    def add(self, category: str, nbytes: float) -> None:
        if self.active:
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
STRATEGIES = {
    "1d": ["parallel.sparse.strategy=1d"],
    "2d": ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2", "parallel.sparse.sync_every_n_steps=1"],
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


def run_one(mix: str, strategy: str, run_dir: str, warmup: int, steps: int) -> Dict:
    from kunlun.trainer.config import load_config
    from kunlun.trainer.trainer import Trainer

    overrides = COMMON + [f"run_dir={run_dir}/{mix}-{strategy}", f"trainer.max_steps={warmup + steps}"] + MIXES[mix] + STRATEGIES[strategy]
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

    _, loader = trainer._loader("train")
    it = iter(loader)
    ids = defaultdict(float)
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
                t0 = time.perf_counter()
                counter.active = measured
                trainer._set_lr(step)
                trainer.optimizer.zero_grad()
                counter.phase = "fwd"
                loss, _ = trainer.model(batch)
                counter.phase = "bwd"
                loss.backward()
                counter.phase = "opt"
                trainer.optimizer.step()
                counter.phase = "sync"
                trainer.sharded.maybe_sync(step + 1)
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
        "step_seconds": seconds[warmup:],
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
    pred = predict(strategy, world, n, b, feats, n_dists, table_bytes, opt_bytes, dense_bytes)

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


def print_tables(runs: List[Dict], projections: Dict[str, List[Dict]]) -> None:
    print("\nMeasured vs predicted, per rank per training step (KiB; measured = mean over ranks [min-max]):")
    hdr = (
        "| mix | strategy | plan | emb memory meas [min-max] | pred | a2a meas [min-max] | pred | meas/pred "
        "| sync meas | pred | DDP meas | pred | other | total meas | pred |"
    )
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in runs:
        s, p = r["summary"], r["predicted"]
        label = "1D (n=T=4)" if r["strategy"] == "1d" else f"2D (S={r['n']}, M={r['M']})"
        print(
            f"| {r['mix']} | {label} | {sharding_summary(r['plan'])} | {kib(s['memory'])} [{kib(s['memory_min'])}-{kib(s['memory_max'])}] "
            f"| {kib(p['memory'])} | {kib(s['a2a'])} [{kib(s['a2a_min'])}-{kib(s['a2a_max'])}] | {kib(p['a2a'])} "
            f"| {s['a2a'] / p['a2a']:.3f} | {kib(s['sync'])} | {kib(p['sync'])} | {kib(s['ddp'])} | {kib(p['ddp'])} "
            f"| {kib(s['other'])} | {kib(s['total'])} | {kib(p['total'])} |"
        )
    print("\nAll-to-all by component, measured / predicted (KiB per rank per step):")
    hdr = "| mix | strategy | splits | lengths | ids | embeddings fwd | gradients bwd |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in runs:
        s, p = r["summary"]["a2a_parts"], r["predicted"]["a2a_parts"]
        cells = " | ".join(f"{kib(s[k])} / {kib(p[k])}" for k in ("splits", "lengths", "ids", "emb_fwd", "emb_bwd"))
        print(f"| {r['mix']} | {r['strategy']} | {cells} |")
    print("\nSummary, 2D (S=2) relative to 1D (T=4), measured:")
    hdr = "| mix | emb memory 2D/1D | a2a 2D/1D | sync bytes 1D, 2D (KiB) | total 2D/1D |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    by = {(r["mix"], r["strategy"]): r["summary"] for r in runs}
    for mix in dict.fromkeys(r["mix"] for r in runs):
        if (mix, "1d") in by and (mix, "2d") in by:
            a, c = by[(mix, "1d")], by[(mix, "2d")]
            print(
                f"| {mix} | {c['memory'] / a['memory']:.2f} | {c['a2a'] / a['a2a']:.2f} | {kib(a['sync'])}, {kib(c['sync'])} | {c['total'] / a['total']:.2f} |"
            )
    p = PROD
    for name, rows in projections.items():
        print(
            f"\nProjection ({name}): b={p['b']}, {p['pooled_features']} pooled features x p={p['pooling']}, "
            f"{p['seq_features']} sequence features x L={p['seq_len']} (RW), D={p['dim']}, tables {human(p['table_bytes'])} fp32 "
            f"+ row-wise AdaGrad, dense {p['dense_params'] / 1e6:.0f}M params fp32, 2D sync every step:"
        )
        hdr = (
            "| T | S | M | emb memory/rank 1D | 2D | a2a/rank 1D | 2D | a2a 1D/2D | a2a per peer 1D | 2D | sync/rank 2D "
            "| DDP/rank | total 1D | 2D | total 1D/2D | sync every k ≥ for 2D total ≤ 1D |"
        )
        print(hdr)
        print("|" + "---|" * (hdr.count("|") - 1))
        for row in rows:
            one, two = row["1d"], row["2d"]
            be = row["breakeven_sync_every"]
            print(
                f"| {row['T']} | {row['S']} | {row['M']} | {human(one['memory'])} | {human(two['memory'])} | {human(one['a2a'])} "
                f"| {human(two['a2a'])} | {row['a2a_ratio']:.3f} | {human(one['a2a_per_peer'])} | {human(two['a2a_per_peer'])} "
                f"| {human(two['sync'])} | {human(one['ddp'])} | {human(one['total'])} | {human(two['total'])} "
                f"| {row['total_ratio']:.3f} | {'never' if be == float('inf') else f'{be:,.0f}'} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON output path (default: $OUT/parallel_bench.json when $OUT is set)")
    ap.add_argument("--mixes", nargs="*", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
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
            for strategy in STRATEGIES:
                if rank == 0:
                    print(f"[parallel_bench] {mix} / {strategy} ...", flush=True)
                r = run_one(mix, strategy, run_dir, args.warmup, args.steps)
                r["summary"] = summarise(r)
                runs.append(r)
        projections = {"pooled TW/CW, sequence RW": project(pooled_row_wise=False), "every table RW": project(pooled_row_wise=True)}
        if rank == 0:
            for r in runs:
                print(f"\nplan {r['mix']} / {r['strategy']} (n={r['n']}):\n{r['plan']}")
            print_tables(runs, projections)
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
