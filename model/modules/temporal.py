"""Temporal encoding of history events.

DEFAULT (docs/architecture.md §3): add learned embeddings of
``bucket_log(request_time − t_i)`` (event age), ``bucket_log(t_i − t_{i−1})`` (gap to the
previous event; 0 for the first) and a clipped recency position (0 = newest) to every
sequence token before layer 1. Log buckets: ``floor(log2(1 + Δt / 60 s))`` clipped to
``num_buckets − 1``, so one bucket per doubling from a minute up — recency matters at
every scale from minutes to years. Chosen over ROTE (rotary on log time) because it needs
no change to the attention ops and is what the public GDPA kernel adds to Q in-kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.model.modules.jagged import positions, segment_ids


def log_bucket(seconds: torch.Tensor, num_buckets: int, unit_seconds: float = 60.0) -> torch.Tensor:
    x = torch.log2(1.0 + seconds.clamp(min=0).double() / unit_seconds)
    return x.floor().long().clamp(max=num_buckets - 1)


class TemporalEncoding(nn.Module):
    """``tokens [T, d]`` + age/gap/position embeddings → ``[T, d]``."""

    def __init__(self, dim: int, num_buckets: int = 64):
        super().__init__()
        self.num_buckets = num_buckets
        self.age = nn.Embedding(num_buckets, dim)
        self.gap = nn.Embedding(num_buckets, dim)
        self.position = nn.Embedding(num_buckets, dim)
        for e in (self.age, self.gap, self.position):
            nn.init.normal_(e.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, timestamps: torch.Tensor, offsets: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[0]  # no branch on t (0 works): one traced graph for torch.export
        seg = segment_ids(offsets, t)
        pos = positions(offsets, t)
        age = request_time[seg] - timestamps
        prev = timestamps[(torch.arange(t, device=timestamps.device) - 1).clamp(min=0)]  # row i-1 (row 0: itself)
        gap = torch.where(pos > 0, timestamps - prev, torch.zeros_like(timestamps))
        lengths = offsets[1:] - offsets[:-1]
        recency = (lengths[seg] - 1 - pos).clamp(max=self.num_buckets - 1)
        return tokens + self.age(log_bucket(age, self.num_buckets)) + self.gap(log_bucket(gap, self.num_buckets)) + self.position(recency)
