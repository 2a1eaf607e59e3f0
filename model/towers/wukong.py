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

from typing import Dict

import torch

from kunlun.data.schema import FeatureSchema
from kunlun.model.modules.head import PredictionHead
from kunlun.model.modules.jagged import jagged_pool
from kunlun.model.modules.tokenizer import ContextTokenizer
from kunlun.model.modules.wukong import WukongStack
from kunlun.model.towers.base import DenseTower, TowerInputs


class WukongTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = cfg.dim
        self.cfg = cfg
        # One D → d map per sparse token: F context features, then E pooled event histories.
        self.tokenizer = ContextTokenizer(len(schema.context_features) + len(schema.event_types), embedding_dim, d, schema.num_dense)
        self.n_tokens = self.tokenizer.n_tokens
        self.stack = WukongStack(self.n_tokens, d, cfg.num_layers, cfg.fm_rank, cfg.mlp_hidden)
        self.head = PredictionHead(self.stack.n_out * d, cfg.head_mlp, num_labels)

    def tokens(self, inputs: TowerInputs) -> torch.Tensor:
        """``[B, n, d]`` feature tokens."""
        vecs = [inputs.context[k] for k in self.schema.context_keys]
        for e in self.schema.event_types:
            seq = inputs.events[e.name]
            vecs.append(jagged_pool(seq.item + seq.action, seq.lengths))
        return self.tokenizer(vecs, inputs.dense)

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        return self.head(self.stack(self.tokens(inputs)))

    def flops_per_example(self, avg_seq_len: Dict[str, float]) -> float:
        """Token maps + Wukong layers + head. Pooling the histories (sums) is not counted."""
        return self.tokenizer.flops_per_example() + self.stack.flops_per_example() + self.head.flops_per_example()

    def fixed_flops(self) -> float:
        return 0.0
