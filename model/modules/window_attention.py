"""Sliding-window multi-head self-attention over a jagged sequence.

Pre-LayerNorm, softmax attention with scale ``1/√dh`` restricted to ``|i − j| ≤ window``
(symmetric, non-causal; DEFAULT w = 64, docs §4.2), output projection, residual. User
histories have a strong recency structure, so a window keeps most of the signal at
``O(L·w)`` instead of ``O(L²)`` work. ``window=None`` gives full attention (the ablation).

The sequence stays jagged: the attention is :func:`kunlun.model.ops.jagged_attention`, whose
kernel (``gdpa_impl``: reference / Triton) is the model-wide choice of :class:`UsesGDPA`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.ops import jagged_attention
from kunlun.model.ops.select import UsesGDPA


class WindowSelfAttention(UsesGDPA, nn.Module):
    def __init__(self, dim: int, heads: int, window: Optional[int]):
        super().__init__()
        if dim % heads:
            raise ValueError(f"self-attention: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim, self.window = dim, heads, dim // heads, window
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """``seq [T, d]`` jagged by ``offsets [B+1]`` → ``[T, d]``; ``max_len`` (events) bounds
        every sample (a config constant, so the op needs no host sync)."""
        t = seq.shape[0]
        q, k, v = self.qkv(self.norm(seq)).view(t, 3, self.heads, self.head_dim).unbind(1)  # [T, H, dh] each
        att = jagged_attention(q, k, v, offsets, offsets, window=self.window, impl=self.gdpa_impl, max_q_len=max_len, max_kv_len=max_len)
        return seq + self.out(att.reshape(t, self.dim))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        """Forward FLOPs per example: ``qkv`` + ``out`` projections (``8·d²`` per event, over
        ``E[L]``) and ``q kᵀ`` + ``A v`` (``4·d`` per (query, key) pair) over the exact mean
        number of pairs: ``E[L²]`` for full attention, the ``|i − j| ≤ w`` band otherwise."""
        stats = LengthStats.of(avg_len)
        return 2 * self.dim * 4 * self.dim * stats.mean + 4 * self.dim * stats.band(self.window)
