"""Context tokenizer shared by the token towers: pooled feature embeddings + dense features → tokens."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ContextTokenizer(nn.Module):
    """``n_sparse`` pooled vectors ``[B, D]`` and ``dense [B, num_dense]`` → ``tokens [B, n_tokens, d]``.

    Each sparse vector goes through its own ``D → d`` map (one ``[n_sparse, D, d]`` weight, no
    bias); the dense features, when ``num_dense > 0``, through ``Linear(num_dense → d)`` into one
    last token, so ``n_tokens = n_sparse + (1 if num_dense else 0)``.
    """

    def __init__(self, n_sparse: int, embedding_dim: int, dim: int, num_dense: int):
        super().__init__()
        self.n_sparse, self.embedding_dim, self.dim, self.num_dense = n_sparse, embedding_dim, dim, num_dense
        # Created before the dense Linear: towers rely on this order for seeded inits.
        self.sparse_proj = nn.Parameter(torch.randn(n_sparse, embedding_dim, dim) / embedding_dim**0.5)
        self.dense_proj = nn.Linear(num_dense, dim) if num_dense else None
        self.n_tokens = n_sparse + (1 if self.dense_proj is not None else 0)

    def forward(self, vectors: Sequence[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """``vectors``: ``n_sparse`` tensors ``[B, D]`` in feature order; ``dense [B, num_dense]``."""
        tokens = [torch.einsum("bfe,fed->bfd", torch.stack(list(vectors), dim=1), self.sparse_proj)]
        if self.dense_proj is not None:
            tokens.append(self.dense_proj(dense).unsqueeze(1))
        return torch.cat(tokens, dim=1)

    def flops_per_example(self) -> int:
        total = 2 * self.n_sparse * self.embedding_dim * self.dim
        if self.dense_proj is not None:
            total += 2 * self.num_dense * self.dim
        return total
