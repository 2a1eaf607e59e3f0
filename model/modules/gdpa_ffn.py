"""GDPA personalised FFN: a per-sample two-layer FFN whose weights come from the context.

Production data flow (docs/architecture.md §4.2)::

    ln_q = LayerNorm(q)                    # [T, d], over all heads (d = H·dh)
    o    = GDPA(ln_q; K, V) + ln_q         # K, V: [B, m, H, dh] generated from X_sum
    out  = RMSNorm(o) + q

GDPA with K := W1(x)ᵀ and V := W2(x) *is* ``act(s W1(x)) W2(x)`` per sample, so the FFN
runs as one fused attention-like kernel over the jagged sequence (Q long and jagged, K/V
short and dense). Scales: ``out_scale = 1/m`` (DEFAULT: 1 / configured number of keys, a
constant so outputs do not depend on the batch) and ``qk_scale = 1/√dh`` (our choice: keeps
the activation's input at unit variance at init, since ``ln_q`` is normalised).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.ops import gdpa_dense_kv
from kunlun.model.ops.select import UsesGDPA


class KVGenerator(nn.Module):
    """``X_sum [B, n_sum, d_ctx]`` → ``K, V [B, m, H, dh]`` through a rank-``r`` bottleneck."""

    def __init__(self, n_sum: int, d_ctx: int, m: int, heads: int, head_dim: int, rank: int):
        super().__init__()
        self.m, self.heads, self.head_dim = m, heads, head_dim
        self.down = nn.Linear(n_sum * d_ctx, rank)
        self.k = nn.Linear(rank, m * heads * head_dim)
        self.v = nn.Linear(rank, m * heads * head_dim)
        self.in_features, self.rank = n_sum * d_ctx, rank

    def forward(self, x_sum: torch.Tensor):
        z = torch.relu(self.down(x_sum.flatten(1)))
        shape = (x_sum.shape[0], self.m, self.heads, self.head_dim)
        return self.k(z).view(shape), self.v(z).view(shape)

    def flops_per_example(self) -> float:
        out = self.m * self.heads * self.head_dim
        return 2 * self.in_features * self.rank + 2 * 2 * self.rank * out


class GDPAFFN(UsesGDPA, nn.Module):
    """``seq [T, d]`` (jagged by ``offsets``) and ``X_sum`` → ``[T, d]``."""

    def __init__(self, dim: int, heads: int, n_sum: int, d_ctx: int, m: int, rank: int, activation: Union[str, Sequence[str]] = "gelu_tanh"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"GDPA-FFN: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim, self.m = dim, heads, dim // heads, m
        self.norm_in = nn.LayerNorm(dim)
        self.norm_out = nn.RMSNorm(dim)
        self.kv = KVGenerator(n_sum, d_ctx, m, heads, self.head_dim, rank)
        self.activation = activation

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, x_sum: torch.Tensor, max_len: int) -> torch.Tensor:
        ln_q = self.norm_in(seq)
        k, v = self.kv(x_sum)
        q = ln_q.view(-1, self.heads, self.head_dim)
        o = gdpa_dense_kv(
            q,
            offsets,
            k.to(q.dtype),
            v.to(q.dtype),
            activation=self.activation,
            qk_scale=self.head_dim**-0.5,
            out_scale=1.0 / self.m,
            impl=self.gdpa_impl,
            max_q_len=max_len,
        ).reshape(-1, self.dim)
        return self.norm_out(o + ln_q) + seq

    def flops_per_example(self, avg_len: LengthLike) -> float:
        """K/V generation plus ``m`` keys per event (linear in ``E[L]``)."""
        return self.kv.flops_per_example() + 4 * self.dim * self.m * LengthStats.of(avg_len).mean
