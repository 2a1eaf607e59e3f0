"""Readable PyTorch reference of GDPA on jagged tensors (pads per sample; O(B·Lq·Lkv) memory).

For sample ``b`` and head ``h``::

    out[i] = sum_j out_scale * act_h(qk_scale * <q_i, k_j>) * v_j

over the keys ``j`` of sample ``b`` (and ``|i - j| <= window`` when a window is given).
No softmax, no normalisation. This is the function every fast path is tested against.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from kunlun.model.ops.activations import torch_activation


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``values [T, ...]`` with ``offsets [B+1]`` → ``[B, max_len, ...]`` (zeros past each length)."""
    b = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    out = values.new_zeros((b, max_len) + tuple(values.shape[1:]))
    # No early return for T = 0 and sizes known from shapes (output_size): the same code
    # serves every length, so torch.export traces one graph with symbolic totals.
    total = values.shape[0]
    batch = torch.repeat_interleave(torch.arange(b, device=values.device), lengths, output_size=total)
    pos = torch.arange(total, device=values.device) - offsets[:-1].repeat_interleave(lengths, output_size=total)
    out[batch, pos] = values
    return out


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """``padded [B, L, ...]`` → ``[total, ...]``, the first ``lengths[b]`` rows of each sample."""
    b = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    batch = torch.repeat_interleave(torch.arange(b, device=padded.device), lengths, output_size=total)
    pos = torch.arange(total, device=padded.device) - offsets[:-1].repeat_interleave(lengths, output_size=total)
    return padded[batch, pos]


def gdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    activations: List[str],
    qk_scale: float = 1.0,
    out_scale: float = 1.0,
    window: Optional[int] = None,
    max_q_len: Optional[int] = None,
    max_kv_len: Optional[int] = None,
) -> torch.Tensor:
    """``q [Tq, H, Dh]``, ``k [Tkv, H, Dh]``, ``v [Tkv, H, Dv]`` → ``[Tq, H, Dv]`` (autograd-able)."""
    q_len = q_offsets[1:] - q_offsets[:-1]
    kv_len = kv_offsets[1:] - kv_offsets[:-1]
    lq = int(q_len.max()) if max_q_len is None and q_len.numel() else (max_q_len or 0)
    lk = int(kv_len.max()) if max_kv_len is None and kv_len.numel() else (max_kv_len or 0)
    if q.shape[0] == 0:  # keep the autograd graph: zero gradients, not "no grad_fn"
        return q.new_zeros((0, q.shape[1], v.shape[2])) + 0 * (q.sum() + k.sum() + v.sum())
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 accumulate in fp32, fp64 stays fp64
    qp = jagged_to_padded(q, q_offsets, lq).transpose(1, 2)  # [B, H, Lq, Dh]
    kp = jagged_to_padded(k, kv_offsets, lk).transpose(1, 2)  # [B, H, Lkv, Dh]
    vp = jagged_to_padded(v, kv_offsets, lk).transpose(1, 2)  # [B, H, Lkv, Dv]
    scores = qk_scale * torch.matmul(qp.to(acc), kp.to(acc).transpose(-1, -2))  # [B, H, Lq, Lkv]
    probs = torch.stack([torch_activation(a)(scores[:, h]) for h, a in enumerate(activations)], dim=1)
    mask = torch.arange(lk, device=q.device)[None, :] < kv_len[:, None]  # [B, Lkv] valid keys
    mask = mask[:, None, None, :]
    if window is not None:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = mask & ((i - j).abs() <= window)[None, None]
    probs = torch.where(mask, probs, torch.zeros((), dtype=probs.dtype, device=probs.device)) * out_scale
    out = torch.matmul(probs, vp.to(acc)).to(q.dtype)  # [B, H, Lq, Dv]
    return padded_to_jagged(out.transpose(1, 2), q_offsets, q.shape[0])
