"""Small helpers for jagged sequences: ``values [T, ...]`` with ``offsets [B+1]``."""

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


def to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[T, ...]`` → ``[B, max_len, ...]`` with zeros past each length."""
    b = offsets.numel() - 1
    out = values.new_zeros((b, max_len) + tuple(values.shape[1:]))
    t = values.shape[0]
    if t:
        out[segment_ids(offsets, t), positions(offsets, t)] = values
    return out


def from_padded(padded: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    return padded[segment_ids(offsets, total), positions(offsets, total)]


def padding_mask(offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True on real rows."""
    return torch.arange(max_len, device=offsets.device)[None, :] < lengths_of(offsets)[:, None]
