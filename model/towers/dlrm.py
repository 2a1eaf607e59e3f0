"""DLRM-style baseline tower (Naumov et al., 2019).

Bottom MLP on dense features → one ``[B, D]`` vector; each context feature gives one
``[B, D]`` vector; each event type gives the mean of its item + action embeddings
(zeros without history). Pairwise dot products of all F vectors (``F(F-1)/2``), concatenated
with the bottom output, feed the top MLP → ``[B, num_labels]`` logits.
"""

from __future__ import annotations

from typing import Dict

import torch

from kunlun.data.schema import FeatureSchema
from kunlun.model.flops import LengthLike
from kunlun.model.modules.jagged import jagged_pool
from kunlun.model.modules.mlp import mlp, mlp_flops
from kunlun.model.towers.base import DenseTower, TowerInputs


class DLRMTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = embedding_dim
        self.bottom = mlp([schema.num_dense, *cfg.bottom_mlp, d]) if schema.num_dense else None
        num_vectors = len(schema.context_features) + len(schema.event_types) + (1 if self.bottom is not None else 0)
        self.num_pairs = num_vectors * (num_vectors - 1) // 2
        top_in = self.num_pairs + (d if self.bottom is not None else 0)
        self.top = mlp([top_in, *cfg.top_mlp, num_labels], final_activation=False)
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        # Flat index of each pair (i < j) in the row-major [F, F] Gram matrix: one index_select.
        self.register_buffer("_pairs", rows * num_vectors + cols, persistent=False)
        self.bottom_sizes = [schema.num_dense, *cfg.bottom_mlp, d]
        self.top_sizes = [top_in, *cfg.top_mlp, num_labels]
        self.num_vectors = num_vectors

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        b, d = inputs.dense.shape[0], self.embedding_dim
        vectors = []  # F tensors [B, D]: bottom output, context features, pooled event types
        bottom = None
        if self.bottom is not None:
            bottom = self.bottom(inputs.dense)
            vectors.append(bottom)
        vectors += [inputs.context[k] for k in self.schema.context_keys]
        for e in self.schema.event_types:
            seq = inputs.events[e.name]
            vectors.append(jagged_pool(seq.item + seq.action, seq.lengths))
        feats = torch.cat(vectors, dim=1).view(b, self.num_vectors, d)  # [B, F, D]: one copy
        gram = torch.bmm(feats, feats.transpose(1, 2))  # [B, F, F]
        pairs = gram.flatten(1).index_select(1, self._pairs)  # [B, F(F-1)/2], pairs i < j
        top_in = torch.cat([bottom, pairs], dim=1) if bottom is not None else pairs
        return self.top(top_in)

    def flops_per_example(self, avg_seq_len: Dict[str, LengthLike]) -> float:
        d = self.embedding_dim
        pooling = sum(2 * d * avg_seq_len.get(e.name, 0.0) for e in self.schema.event_types)
        interaction = 2 * self.num_vectors * self.num_vectors * d
        return (mlp_flops(self.bottom_sizes) if self.bottom is not None else 0) + pooling + interaction + mlp_flops(self.top_sizes)
