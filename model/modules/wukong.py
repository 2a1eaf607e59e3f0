"""Wukong layers (Zhang et al., 2024) and the Mixture of Wukong Experts.

Wukong layer on tokens ``X [B, n, d]``::

    FMB(X) = reshape(MLP(LN(flatten(X (Xᵀ Y)))))   # low-rank FM: Y ∈ R^{n×k}, → [B, n_F, d]
    LCB(X) = W_L X                                  # linear compress, W_L ∈ R^{n_L×n}
    X'     = LN([FMB(X) ‖ LCB(X)] + residual(X))   # residual projected if n_F + n_L ≠ n

Mixture of Wukong Experts (Kunlun, docs §4.1; DEFAULT): the tokens are split into
``num_experts`` static, contiguous groups (no router: the paper's gate is unknown); each
expert is a stack of Wukong layers on its group; outputs are concatenated and mapped
back to ``n_out`` tokens by a linear map over the token axis.
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn


class TokenLinear(nn.Module):
    """Linear map over the token axis: ``[B, n_in, d]`` → ``[B, n_out, d]``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.n_in, self.n_out = n_in, n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("on,bnd->bod", self.weight, x)

    def flops_per_example(self, dim: int) -> float:
        return 2 * self.n_in * self.n_out * dim


class WukongLayer(nn.Module):
    def __init__(self, n_tokens: int, dim: int, fm_rank: int, n_fmb: int, n_lcb: int, mlp_hidden: int):
        super().__init__()
        self.n, self.dim, self.k, self.n_fmb, self.n_lcb, self.hidden = n_tokens, dim, fm_rank, n_fmb, n_lcb, mlp_hidden
        self.y = nn.Parameter(torch.randn(n_tokens, fm_rank) / math.sqrt(n_tokens))
        self.fm_norm = nn.LayerNorm(n_tokens * fm_rank)
        self.fm_mlp = nn.Sequential(nn.Linear(n_tokens * fm_rank, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, n_fmb * dim))
        self.lcb = TokenLinear(n_tokens, n_lcb)
        self.residual = TokenLinear(n_tokens, n_fmb + n_lcb) if n_fmb + n_lcb != n_tokens else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xty = torch.einsum("bnd,nk->bdk", x, self.y)  # [B, d, k]
        fm = torch.bmm(x, xty).flatten(1)  # [B, n·k]
        fmb = self.fm_mlp(self.fm_norm(fm)).view(b, self.n_fmb, self.dim)
        out = torch.cat([fmb, self.lcb(x)], dim=1)
        res = x if self.residual is None else self.residual(x)
        return self.norm(out + res)

    def flops_per_example(self) -> float:
        n, d, k = self.n, self.dim, self.k
        fm = 2 * n * d * k + 2 * n * d * k
        mlp = 2 * n * k * self.hidden + 2 * self.hidden * self.n_fmb * d
        lcb = self.lcb.flops_per_example(d)
        res = self.residual.flops_per_example(d) if self.residual is not None else 0
        return fm + mlp + lcb + res


class WukongStack(nn.Module):
    """``layers`` Wukong layers keeping ``n_tokens`` tokens (n_F = n_L = n/2 by DEFAULT)."""

    def __init__(self, n_tokens: int, dim: int, layers: int, fm_rank: int, mlp_hidden: int):
        super().__init__()
        n_fmb = max(1, n_tokens // 2)
        n_lcb = max(1, n_tokens - n_fmb)
        self.layers = nn.ModuleList(WukongLayer(n_tokens, dim, fm_rank, n_fmb, n_lcb, mlp_hidden) for _ in range(layers))
        self.n_out = n_fmb + n_lcb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def flops_per_example(self) -> float:
        return sum(layer.flops_per_example() for layer in self.layers)


class MixtureOfWukongExperts(nn.Module):
    """``[B, n_in, d]`` → ``[B, n_out, d]``; experts on static token groups, then a token map."""

    def __init__(self, n_in: int, n_out: int, dim: int, num_experts: int, layers: int, fm_rank: int, mlp_hidden: int):
        super().__init__()
        num_experts = max(1, min(num_experts, n_in))
        sizes = [n_in // num_experts + (1 if i < n_in % num_experts else 0) for i in range(num_experts)]
        self.sizes: List[int] = sizes
        self.experts = nn.ModuleList(WukongStack(s, dim, layers, fm_rank, mlp_hidden) for s in sizes)
        self.combine = TokenLinear(sum(e.n_out for e in self.experts), n_out)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.sizes, dim=1)
        return self.combine(torch.cat([e(p) for e, p in zip(self.experts, parts)], dim=1))

    def flops_per_example(self) -> float:
        return sum(e.flops_per_example() for e in self.experts) + self.combine.flops_per_example(self.dim)
