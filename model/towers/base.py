"""The dense-tower interface every architecture implements (each architecture in its own
module) and the inputs it sees."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.flops import LengthLike


@dataclass
class EventSequence:
    """One event type's embedded history for a batch of B examples (jagged, never padded).

    Attributes:
        item: ``[T, D]`` item embeddings, ``T = sum(lengths)``, oldest event first per example.
        action: ``[T, D]`` action embeddings (rating, dwell bucket, ...).
        timestamps: ``[T]`` int64 seconds.
        lengths: ``[B]`` int64 events per example (0 allowed).
        offsets: ``[B + 1]`` int64 exclusive prefix sum of ``lengths``.
    """

    item: torch.Tensor
    action: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor


@dataclass
class TowerInputs:
    """What a dense tower sees.

    Attributes:
        dense: ``[B, num_dense]`` float.
        context: feature name → pooled embedding ``[B, D]`` (ordered as ``schema.context_keys``).
        events: event type → :class:`EventSequence`.
        request_time: ``[B]`` int64 seconds.
        domain: ``[B]`` int64 domain ids (rows of ``model.multitask.domain_feature``'s table;
            0 = missing), or None without a domain feature.
    """

    dense: torch.Tensor
    context: Dict[str, torch.Tensor]
    events: Dict[str, EventSequence]
    request_time: torch.Tensor
    domain: Optional[torch.Tensor] = None


class DenseTower(nn.Module):
    """Base class: ``forward(TowerInputs) -> logits [B, num_labels]``.

    Towers are plain modules: they never touch ``torch.distributed`` (``parallel/`` wraps them).
    """

    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int):
        super().__init__()
        self.schema = schema
        self.embedding_dim = embedding_dim
        self.num_labels = num_labels

    def forward(self, inputs: TowerInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def flops_per_example(self, avg_seq_len: Dict[str, LengthLike]) -> float:
        """Forward FLOPs per example (multiply-add = 2), given per-event-type history length
        statistics (:class:`kunlun.model.flops.LengthStats`; a plain number means every
        example has that length)."""
        raise NotImplementedError
