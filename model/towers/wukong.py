"""Wukong baseline tower (Zhang et al., 2024; docs/architecture.md §7.2): stacked
factorization machines on feature tokens.

Tokens ``X [B, n, d]`` (``d = cfg.dim``), ``n = F + (1 if num_dense) + E``:

* one per context feature: its pooled embedding ``[B, D]`` through its own ``D → d`` map;
* one for the dense features: ``Linear(num_dense → d)``;
* one per event type: the jagged mean of ``item + action`` embeddings ``[B, D]`` (zeros
  without history) through its own ``D → d`` map — histories enter as pooled bags.

``cfg.num_layers`` Wukong layers (:class:`~kunlun.model.modules.wukong.WukongStack`, n_F = n_L =
n/2, FM rank ``cfg.fm_rank``, FMB MLP hidden ``cfg.mlp_hidden``) keep ``n`` tokens; the head is
``MLP(flatten(X)) → [B, num_labels]`` logits (``cfg.head_mlp``).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.modules.wukong import WukongStack
from kunlun.model.towers.base import DenseTower, TowerInputs, jagged_mean, mlp


class WukongTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = cfg.dim
        self.cfg = cfg
        # One D → d map per sparse token: F context features, then E event types.
        self.n_sparse = len(schema.context_features) + len(schema.event_types)
        self.token_proj = nn.Parameter(torch.randn(self.n_sparse, embedding_dim, d) / embedding_dim**0.5)
        self.dense_proj = nn.Linear(schema.num_dense, d) if schema.num_dense else None
        self.n_tokens = self.n_sparse + (1 if self.dense_proj is not None else 0)
        self.stack = WukongStack(self.n_tokens, d, cfg.num_layers, cfg.fm_rank, cfg.mlp_hidden)
        self.head_sizes: List[int] = [self.stack.n_out * d, *cfg.head_mlp, num_labels]
        self.head = mlp(self.head_sizes, final_activation=False)

    def tokens(self, inputs: TowerInputs) -> torch.Tensor:
        """``[B, n, d]`` feature tokens."""
        vecs = [inputs.context[k] for k in self.schema.context_keys]
        for e in self.schema.event_types:
            seq = inputs.events[e.name]
            vecs.append(jagged_mean(seq.item + seq.action, seq.lengths))
        x = torch.einsum("bfe,fed->bfd", torch.stack(vecs, dim=1), self.token_proj)  # [B, F + E, d]
        if self.dense_proj is not None:
            x = torch.cat([x, self.dense_proj(inputs.dense).unsqueeze(1)], dim=1)
        return x

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        return self.head(self.stack(self.tokens(inputs)).flatten(1))

    def flops_per_example(self, avg_seq_len: Dict[str, float]) -> float:
        """Token maps + Wukong layers + head. Pooling the histories (sums) is not counted."""
        d = self.cfg.dim
        total = 2 * self.n_sparse * self.embedding_dim * d
        if self.dense_proj is not None:
            total += 2 * self.schema.num_dense * d
        total += self.stack.flops_per_example()
        return total + sum(2 * a * b for a, b in zip(self.head_sizes[:-1], self.head_sizes[1:]))

    def fixed_flops(self) -> float:
        return 0.0
