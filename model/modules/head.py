"""Prediction head shared by the token towers: flattened tokens → MLP → logits."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from kunlun.model.modules.mlp import mlp, mlp_flops


class PredictionHead(nn.Module):
    """``tokens [B, n_tokens, d]`` → ``flatten`` → ``MLP(hidden)`` → ``[B, num_labels]`` logits.

    ``in_features = n_tokens · d``; ReLU between layers, none after the last (logits).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_labels: int):
        super().__init__()
        self.sizes: List[int] = [in_features, *hidden, num_labels]
        self.mlp = mlp(self.sizes, final_activation=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.flatten(1))

    def flops_per_example(self) -> int:
        return mlp_flops(self.sizes)
