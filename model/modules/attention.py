"""Softmax multi-head attention over jagged sequences (reference path: pads per sample).

Used by sliding-window self-attention and by seed pooling / PMA. Masks: padding keys
always; ``window`` keeps ``|i − j| ≤ w`` (symmetric, non-causal: DEFAULT, docs §4.2).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kunlun.model.modules.jagged import padding_mask


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """``q [B, H, Lq, dh]``, ``k/v [B, H, Lk, dh]``, ``key_valid [B, Lk]`` → ``[B, H, Lq, dh]``.

    Rows with no visible key get zeros (not NaN).
    """
    lq, lk = q.shape[2], k.shape[2]
    mask = key_valid[:, None, None, :].expand(-1, 1, lq, lk)
    if window is not None:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = mask & ((i - j).abs() <= window)
    any_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key)
    return out * any_key


def key_mask(offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    return padding_mask(offsets, max_len)
