"""InterFormer-style context summary: ``X_sum = Gating(LCE(X))``.

LCE is a learned linear map over the token axis (``n_ns → n_sum``), Gating is
``Z ⊙ σ(MLP(Z))`` per token (docs §4.1, §7.1).
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.model.modules.wukong import TokenLinear


class Gating(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, dim)
        self.dim = dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(self.gate(z))

    def flops_per_token(self) -> float:
        return 2 * self.dim * self.dim


class ContextSummary(nn.Module):
    """``X [B, n_ns, d]`` → ``X_sum [B, n_sum, d]``."""

    def __init__(self, n_ns: int, n_sum: int, dim: int):
        super().__init__()
        self.lce = TokenLinear(n_ns, n_sum)
        self.gating = Gating(dim)
        self.n_sum, self.dim = n_sum, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gating(self.lce(x))

    def flops_per_example(self) -> float:
        return self.lce.flops_per_example(self.dim) + self.n_sum * self.gating.flops_per_token()
