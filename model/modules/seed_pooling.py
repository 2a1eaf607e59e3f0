"""Sequence summarisation: PMA and Hierarchical Seed Pooling (HSP).

PMA (InterFormer): ``n_tokens`` learned queries attend to the sequence → ``[B, n_tokens, d]``.

HSP (Kunlun, docs §4.1): an *over-complete* set of ``n_seeds > n_tokens`` learned seeds
attends to the sequence (pre-LN on seeds and sequence; softmax by default, or a GDPA
activation), then a rank-``k`` **SumKronLinear** compresses seeds to tokens::

    Y_b = Σ_{i=1..k} Z_iᵀ X_b W_i,   Z_i ∈ R^{n_seeds × n_tokens},  W_i ∈ R^{d × d}

— ``k(n_seeds·n_tokens + d²)`` parameters instead of ``n_seeds·d·n_tokens·d`` for a dense
map. DEFAULT n_seeds 64, n_tokens 16, k 8 (scaled down in small presets).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.ops import gdpa_shared_q, jagged_attention_shared_q
from kunlun.model.ops.select import UsesGDPA


class SumKronLinear(nn.Module):
    """``[B, n_in, d]`` → ``[B, n_out, d]``: ``Σ_i Z_iᵀ X W_i``."""

    def __init__(self, n_in: int, n_out: int, dim: int, rank: int):
        super().__init__()
        self.z = nn.Parameter(torch.randn(rank, n_in, n_out) / math.sqrt(n_in * rank))
        self.w = nn.Parameter(torch.randn(rank, dim, dim) / math.sqrt(dim))
        self.n_in, self.n_out, self.dim, self.rank = n_in, n_out, dim, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("kst,bsd->bktd", self.z, x)
        return torch.einsum("bktd,kde->bte", y, self.w)

    def flops_per_example(self) -> float:
        return 2 * self.rank * self.n_in * self.n_out * self.dim + 2 * self.rank * self.n_out * self.dim * self.dim


class SeedAttention(UsesGDPA, nn.Module):
    """Learned queries over a jagged sequence: ``seq [T, d]`` → ``[B, n_seeds, d]``.

    ``attention``: ``softmax`` (scale ``1/√dh``; :func:`kunlun.model.ops.jagged_attention_shared_q`)
    or a GDPA activation name (``silu``, ``gelu``, ...; :func:`kunlun.model.ops.gdpa_shared_q`),
    which sums over keys without normalising, scaled by ``1 / max_len`` (a config constant).
    Both ops run on the jagged sequence with the model-wide kernel choice ``gdpa_impl``.
    A sample without events gets zeros before ``out`` (its bias only).
    """

    def __init__(self, dim: int, heads: int, n_seeds: int, max_len: int, attention: str = "softmax"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"seed attention: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.head_dim, self.n_seeds = dim, heads, dim // heads, n_seeds
        self.max_len, self.attention = max_len, attention
        self.seeds = nn.Parameter(torch.randn(n_seeds, dim) * 0.02)
        self.norm_seeds = nn.LayerNorm(dim)
        self.norm_seq = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        """``seq [T, d]`` jagged by ``offsets [B+1]`` → ``[B, n_seeds, d]``; ``max_len`` (events)
        bounds every sample."""
        b = offsets.numel() - 1
        k, v = self.kv(self.norm_seq(seq)).view(-1, 2, self.heads, self.head_dim).unbind(1)  # [T, H, dh] each
        q = self.q(self.norm_seeds(self.seeds)).view(self.n_seeds, self.heads, self.head_dim).to(k.dtype)  # [n, H, dh]
        if self.attention == "softmax":
            att = jagged_attention_shared_q(q, k, v, offsets, impl=self.gdpa_impl, max_kv_len=max_len)
        else:
            att = gdpa_shared_q(
                q,
                k.contiguous(),
                v.contiguous(),
                offsets,
                activation=self.attention,
                qk_scale=self.head_dim**-0.5,
                out_scale=1.0 / self.max_len,
                impl=self.gdpa_impl,
                max_kv_len=max_len,
            )
        return self.out(att.reshape(b, self.n_seeds, self.dim))  # att: [B, n_seeds, H, dh]

    def flops_per_example(self, avg_len: LengthLike) -> float:
        """``kv`` projection per event and ``n_seeds`` queries × ``L`` keys: linear in ``E[L]``."""
        n = LengthStats.of(avg_len).mean
        return 2 * self.dim * 2 * self.dim * n + 4 * self.dim * self.n_seeds * n + 2 * self.dim * self.dim * self.n_seeds

    def fixed_flops(self) -> float:
        """Per batch, not per example: projecting the shared seeds."""
        return 2 * self.dim * self.dim * self.n_seeds


class HierarchicalSeedPooling(nn.Module):
    """HSP: ``n_seeds`` seeds → SumKronLinear → ``[B, n_tokens, d]``."""

    def __init__(self, dim: int, heads: int, n_seeds: int, n_tokens: int, rank: int, max_len: int, attention: str = "softmax"):
        super().__init__()
        self.seed_attention = SeedAttention(dim, heads, n_seeds, max_len, attention)
        self.compress = SumKronLinear(n_seeds, n_tokens, dim, rank)
        self.norm = nn.LayerNorm(dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        return self.norm(self.compress(self.seed_attention(seq, offsets, max_len)))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        return self.seed_attention.flops_per_example(avg_len) + self.compress.flops_per_example()

    def fixed_flops(self) -> float:
        return self.seed_attention.fixed_flops()


class PMA(nn.Module):
    """Pooling by multi-head attention: ``n_tokens`` seeds, no compression (InterFormer, HSP ablation)."""

    def __init__(self, dim: int, heads: int, n_tokens: int, max_len: int, attention: str = "softmax"):
        super().__init__()
        self.seed_attention = SeedAttention(dim, heads, n_tokens, max_len, attention)
        self.norm = nn.LayerNorm(dim)

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
        return self.norm(self.seed_attention(seq, offsets, max_len))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        return self.seed_attention.flops_per_example(avg_len)

    def fixed_flops(self) -> float:
        return self.seed_attention.fixed_flops()
