"""HSTU-style baseline tower (Zhai et al., 2024; docs/architecture.md §7.3).

Sequence tower, one per event type ``e`` (own parameters), on the jagged history::

    S_e = Linear([item ‖ action]) + TemporalEncoding            # [T_e, d], d = cfg.dim
    for l in 1..cfg.num_layers:                                  # HSTU layer
        u, v, q, k = split(LN(S) W + b);  u = SiLU(u)            # [T_e, d] each
        A v = gdpa(q, k, v; silu, qk_scale = 1/√dh, out_scale = 1/max_len_e)
        S   = S + (u ⊙ LN(A v)) W_o

``A = SiLU(q kᵀ/√dh) / max_len`` runs over each user's whole history, **non-causal and
unwindowed**: every history event happened before the request being scored, so no event
can leak the label and no causal mask is needed (HSTU's causal mask matters when every
position is a training target, which is not the case here). The paper's relative
position/time bias rab^{p,t} inside the activation is replaced by the additive
:class:`TemporalEncoding` that every tower in this package uses.

Head: each event sequence is summarised by ``PMA(d, heads, cfg.num_summary_tokens, max_len_e)``
(softmax seed attention) → ``[B, n_sum, d]``; the tokens ``[ctx_1 … ctx_F ‖ dense ‖ summaries_e …]``
(context embeddings ``[B, D]`` each through their own ``D → d`` map, dense features through
``Linear(num_dense → d)``) are flattened into ``MLP(cfg.head_mlp) → [B, num_labels]`` logits.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.modules.head import PredictionHead
from kunlun.model.modules.seed_pooling import PMA
from kunlun.model.modules.temporal import TemporalEncoding
from kunlun.model.modules.tokenizer import ContextTokenizer
from kunlun.model.ops import gdpa
from kunlun.model.ops.select import UsesGDPA
from kunlun.model.towers.base import DenseTower, TowerInputs


class HSTULayer(UsesGDPA, nn.Module):
    """One HSTU layer: ``seq [T, d]`` (jagged by ``offsets``) → ``[T, d]``."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"HSTU: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim, self.max_len = dim, heads, dim // heads, max_len
        self.norm_in = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        t = seq.shape[0]
        u, v, q, k = self.uvqk(self.norm_in(seq)).split(self.dim, dim=1)
        u = F.silu(u)
        shape = (t, self.heads, self.head_dim)
        av = gdpa(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            offsets,
            offsets,
            activation="silu",
            qk_scale=self.head_dim**-0.5,
            out_scale=1.0 / self.max_len,
            window=None,
            impl=self.gdpa_impl,
            max_q_len=self.max_len,
            max_kv_len=self.max_len,
        ).reshape(t, self.dim)
        return seq + self.out(u * self.norm_attn(av))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        """``uvqk`` and ``W_o`` per event (over ``E[L]``), plus ``q kᵀ`` and ``A v`` over every
        (query, key) pair of the sample: ``E[L²]`` (a jagged batch does ``E[L²] ≥ E[L]²``)."""
        stats = LengthStats.of(avg_len)
        return 2 * self.dim * 5 * self.dim * stats.mean + 4 * self.dim * stats.mean_sq


class HSTUSequence(nn.Module):
    """One event type: tokens + temporal encoding, HSTU layers, PMA summary → ``[B, n_sum, d]``."""

    def __init__(self, emb_dim: int, max_len: int, cfg):
        super().__init__()
        self.dim, self.max_len = cfg.dim, max_len
        self.token = nn.Linear(2 * emb_dim, cfg.dim)
        self.temporal = TemporalEncoding(cfg.dim, cfg.temporal_buckets)
        self.layers = nn.ModuleList(HSTULayer(cfg.dim, cfg.heads, max_len) for _ in range(cfg.num_layers))
        self.summary = PMA(cfg.dim, cfg.heads, cfg.num_summary_tokens, max_len, "softmax")

    def forward(self, ev, request_time: torch.Tensor) -> torch.Tensor:
        seq = self.temporal(self.token(torch.cat([ev.item, ev.action], dim=1)), ev.timestamps, ev.offsets, request_time)
        for layer in self.layers:
            seq = layer(seq, ev.offsets)
        return self.summary(seq, ev.offsets, self.max_len)

    def flops_per_example(self, avg_len: LengthLike) -> float:
        total = 2 * self.token.in_features * self.dim * LengthStats.of(avg_len).mean
        total += sum(layer.flops_per_example(avg_len) for layer in self.layers)
        return total + self.summary.flops_per_example(avg_len)

    def fixed_flops(self) -> float:
        return self.summary.fixed_flops()


class HSTUTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = cfg.dim
        self.cfg = cfg
        self.tokenizer = ContextTokenizer(len(schema.context_features), embedding_dim, d, schema.num_dense)
        self.n_ns = self.tokenizer.n_tokens
        self.events = nn.ModuleDict({e.name: HSTUSequence(embedding_dim, e.max_len, cfg) for e in schema.event_types})
        n_tokens = self.n_ns + len(self.events) * cfg.num_summary_tokens
        self.head = PredictionHead(n_tokens * d, cfg.head_mlp, num_labels)

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        tokens = [self.tokenizer([inputs.context[k] for k in self.schema.context_keys], inputs.dense)]  # [B, n_ns, d]
        for name, seq in self.events.items():
            tokens.append(seq(inputs.events[name], inputs.request_time))  # [B, n_sum, d]
        return self.head(torch.cat(tokens, dim=1))

    def flops_per_example(self, avg_seq_len: Dict[str, LengthLike]) -> float:
        total = self.tokenizer.flops_per_example()
        for name, seq in self.events.items():
            total += seq.flops_per_example(avg_seq_len.get(name, 0.0))
        return total + self.head.flops_per_example()

    def fixed_flops(self) -> float:
        """Per-batch FLOPs that do not scale with the batch (PMA seed projections)."""
        return sum(seq.fixed_flops() for seq in self.events.values())
