"""Small helpers for jagged sequences: ``values [T, ...]`` with ``offsets [B+1]`` (or ``lengths [B]``).

No padding helpers: the towers keep sequences jagged end to end, and an op that needs a
padded layout pads inside itself (``kunlun.model.ops.pytorch``)."""

from __future__ import annotations

import torch


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` sample index of every row."""
    b = offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(b, device=offsets.device), lengths_of(offsets), output_size=total)


def positions(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` index of every row within its sample (0 = oldest)."""
    seg = segment_ids(offsets, total)
    return torch.arange(total, device=offsets.device) - offsets[:-1][seg]


def jagged_pool(values: torch.Tensor, lengths: torch.Tensor, mean: bool = True) -> torch.Tensor:
    """Per-example pooling: ``values [T, D]`` with ``lengths [B]`` → ``[B, D]``.

    Sums each example's rows, or (``mean=True``) averages them; an empty example gives zeros.
    """
    b = lengths.shape[0]
    seg = torch.repeat_interleave(torch.arange(b, device=values.device), lengths.long(), output_size=values.shape[0])
    out = torch.zeros(b, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    if mean:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)  # clamp: 0 / 1 = 0 for empty rows
    return out
