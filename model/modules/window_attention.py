"""Sliding-window multi-head self-attention over a jagged sequence.

Pre-LayerNorm, softmax attention with scale ``1/√dh`` restricted to ``|i − j| ≤ window``
(symmetric, non-causal; DEFAULT w = 64, docs §4.2), output projection, residual. User
histories have a strong recency structure, so a window keeps most of the signal at
``O(L·w)`` instead of ``O(L²)`` work. ``window=None`` gives full attention (the ablation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.modules.attention import masked_softmax_attention
from kunlun.model.modules.jagged import from_padded, padding_mask, to_padded


class WindowSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: Optional[int]):
        super().__init__()
        if dim % heads:
            raise ValueError(f"self-attention: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim, self.window = dim, heads, dim // heads, window
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """``seq [T, d]`` → ``[T, d]``."""
        t = seq.shape[0]
        if t == 0:
            return seq
        qkv = to_padded(self.qkv(self.norm(seq)), offsets, max_len)  # [B, L, 3d]
        b = qkv.shape[0]
        q, k, v = qkv.view(b, max_len, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, L, dh] each
        att = masked_softmax_attention(q, k, v, padding_mask(offsets, max_len), self.window)
        att = att.transpose(1, 2).reshape(b, max_len, self.dim)
        return seq + self.out(from_padded(att, offsets, t))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        """Forward FLOPs per example: ``qkv`` + ``out`` projections (``8·d²`` per event, over
        ``E[L]``) and ``q kᵀ`` + ``A v`` (``4·d`` per (query, key) pair) over the exact mean
        number of pairs: ``E[L²]`` for full attention, the ``|i − j| ≤ w`` band otherwise."""
        stats = LengthStats.of(avg_len)
        return 2 * self.dim * 4 * self.dim * stats.mean + 4 * self.dim * stats.band(self.window)
