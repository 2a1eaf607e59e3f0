"""DCNv2 baseline tower (Wang et al., 2021; docs/architecture.md §7.4), stacked structure.

Input vector (per example)::

    x0 = [dense ‖ ctx_1 ‖ … ‖ ctx_F ‖ mean_1 ‖ … ‖ mean_E]     # [B, n0]
    n0 = num_dense + (F + E) · D

``ctx_f`` is the pooled context embedding ``[B, D]``; ``mean_e`` is the jagged mean of
``item + action`` over event type ``e``'s history (zeros without history): histories enter
as pooled bags, the non-sequence floor.

Cross layers (``num_cross_layers``)::

    x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l          # W_l ∈ R^{n0×n0}, or U_l V_lᵀ of rank r

then the deep MLP (``deep_mlp``, ReLU) on ``x_L`` and a final Linear → ``[B, num_labels]`` logits.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.modules.jagged import jagged_pool
from kunlun.model.modules.mlp import mlp, mlp_flops
from kunlun.model.towers.base import DenseTower, TowerInputs


class CrossLayer(nn.Module):
    """``x0, x [B, n]`` → ``x0 ⊙ (W x + b) + x``; ``W`` full rank, or ``U Vᵀ`` when ``rank > 0``."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        self.dim, self.rank = dim, rank
        if rank > 0:
            self.v = nn.Linear(dim, rank, bias=False)  # Vᵀ x
            self.u = nn.Linear(rank, dim)  # U (Vᵀ x) + b
        else:
            self.w = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        wx = self.u(self.v(x)) if self.rank > 0 else self.w(x)
        return x0 * wx + x

    def flops_per_example(self) -> float:
        return 2 * 2 * self.dim * self.rank if self.rank > 0 else 2 * self.dim * self.dim


class DCNv2Tower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        self.cfg = cfg
        self.input_dim = schema.num_dense + (len(schema.context_features) + len(schema.event_types)) * embedding_dim
        self.cross = nn.ModuleList(CrossLayer(self.input_dim, cfg.low_rank) for _ in range(cfg.num_cross_layers))
        self.deep_sizes: List[int] = [self.input_dim, *cfg.deep_mlp]
        self.deep = mlp(self.deep_sizes)  # ReLU after every layer (empty when deep_mlp = [])
        self.out = nn.Linear(self.deep_sizes[-1], num_labels)

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        parts = [inputs.dense] if self.schema.num_dense else []
        parts += [inputs.context[k] for k in self.schema.context_keys]
        for e in self.schema.event_types:
            seq = inputs.events[e.name]
            parts.append(jagged_pool(seq.item + seq.action, seq.lengths))
        x0 = torch.cat(parts, dim=1)  # [B, n0]
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(self.deep(x))

    def flops_per_example(self, avg_seq_len: Dict[str, float]) -> float:
        """Cross layers + deep MLP + output Linear. Pooling the histories (sums) is not counted."""
        total = sum(layer.flops_per_example() for layer in self.cross)
        total += mlp_flops(self.deep_sizes)
        return total + 2 * self.deep_sizes[-1] * self.num_labels

    def fixed_flops(self) -> float:
        return 0.0
