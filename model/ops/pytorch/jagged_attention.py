"""PyTorch reference of softmax attention on jagged tensors.

For sample ``b``, head ``h`` and query row ``i`` of that sample::

    out[i] = Σ_j softmax_j(scale · ⟨q_i, k_j⟩) · v_j

over the keys ``j`` of sample ``b`` (and only ``|i − j| ≤ window`` when a window is given).
A query with no visible key (a sample with no keys) gives zeros.

The op pads *inside itself*, to the given longest lengths (``max_q_len`` / ``max_kv_len``,
config constants in the towers), and runs masked ``scaled_dot_product_attention``; the real
rows are gathered back at the end. Both paths are plain differentiable PyTorch with no
Python loop and no host read of a tensor value: every size is a constant or a multiple of
the batch size, so ``torch.export`` / ``torch.compile`` trace one graph for every total
length. Both compute in fp32 (fp64 stays fp64):

* full attention: ``[B, H, Lq, Lkv]`` scores, memory ``B·H·Lq·Lkv``;
* windowed self-attention: each sample's padded rows are cut into chunks of ``c`` queries,
  each attending only to its chunk widened by ``w`` keys on both sides, so scores are
  ``B·H·L·(c + 2w)`` instead of ``B·H·L²`` (used when that is at least 4x fewer; else
  the full path with a band mask).

This is what the Triton kernels are tested against; it is itself tested against an
independent per-sample loop (``tests/model/test_jagged_attention.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kunlun.model.ops.pytorch.gdpa import jagged_to_padded, padded_to_jagged


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 → fp32, fp64 stays fp64


def _empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Keep the autograd graph for empty inputs: zero gradients rather than "no grad_fn".
    return q.new_zeros((q.shape[0], q.shape[1], v.shape[2])) + 0 * (q.sum() + k.sum() + v.sum())


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [N, H, Lq, Dh]``, ``k [N, H, Lk, Dh]``, ``v [N, H, Lk, Dv]``, ``visible [N, 1, Lq, Lk]``
    bool → ``[N, H, Lq, Dv]``. A row with no visible key (a padding query, or a sample
    without keys) sees every key instead: finite, and only ever dropped or multiplied by the
    zero padding values (an all-masked softmax row would be NaN and poison the gradients)."""
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def _full(q, k, v, q_offsets, kv_offsets, scale: float, max_q_len: int, max_kv_len: int, window: Optional[int]) -> torch.Tensor:
    """Padded ``[B, H, Lq, Lkv]`` masked attention (``|i − j| ≤ window`` too when given).

    A sample without keys sees only its zero padding keys, so its output is exactly zero
    with zero gradients; padding queries are dropped by the final gather (no gradient).
    """
    acc = _compute_dtype(q.dtype)
    lq, lk = max(int(max_q_len), 1), max(int(max_kv_len), 1)  # ≥ 1: no softmax over an empty axis
    qp = jagged_to_padded(q.to(acc), q_offsets, lq).transpose(1, 2)  # [B, H, Lq, Dh]
    kp = jagged_to_padded(k.to(acc), kv_offsets, lk).transpose(1, 2)  # [B, H, Lkv, Dh]
    vp = jagged_to_padded(v.to(acc), kv_offsets, lk).transpose(1, 2)  # [B, H, Lkv, Dv]
    kv_len = kv_offsets[1:] - kv_offsets[:-1]
    j = torch.arange(lk, device=q.device)
    visible = (j[None, :] < kv_len[:, None])[:, None, None, :]  # [B, 1, 1, Lkv]
    if window is not None:
        i = torch.arange(lq, device=q.device)
        visible = visible & ((i[:, None] - j[None, :]).abs() <= window)  # [B, 1, Lq, Lkv]
    else:
        visible = visible.expand(-1, -1, lq, -1)
    out = _attend(qp, kp, vp, visible, scale)  # [B, H, Lq, Dv]
    return padded_to_jagged(out.transpose(1, 2), q_offsets, q.shape[0]).to(q.dtype)


# Fewest queries per chunk, and how many times fewer scores the band must compute than the
# full square before it is used: on CPU (1 thread, fwd + bwd, B = 128, random lengths) the
# band's gathers and small SDPA batches made it no faster than the band-masked square up
# to L = 200, w = 16, and 3x faster at L = 512, w = 16; chunks of 32 beat 16 and 64 there.
_CHUNK = 32
_BAND_MIN_SAVING = 4


def _chunking(max_len: int, window: int):
    """``(c, n)``: queries per chunk and chunks per sample for the banded path."""
    c = min(max(_CHUNK, window), max_len)
    return c, -(-max_len // c)


def _banded(q, k, v, offsets, scale: float, window: int, max_len: int) -> torch.Tensor:
    """Windowed self-attention (identical query/key offsets) in ``O(B·L·(c + 2w))``.

    Each sample, padded to ``n·c`` rows, is cut into ``n`` chunks of ``c`` queries; chunk
    ``m`` can only see keys ``m·c − w … m·c + c − 1 + w``, so each (sample, chunk, head) is
    one small ``[c, c + 2w]`` masked softmax, all batched in one SDPA call. Key slots
    outside ``[0, length)`` are masked. No ``L × L`` matrix, no Python loop; ``c`` and ``n``
    are constants (from ``max_len``), so only the batch size is symbolic when traced.
    """
    acc = _compute_dtype(q.dtype)
    b, h, dh, dv, device, w = offsets.numel() - 1, q.shape[1], q.shape[2], v.shape[2], q.device, window
    c, n = _chunking(max_len, w)
    width = c + 2 * w
    qp = jagged_to_padded(q.to(acc), offsets, n * c)  # [B, n·c, H, Dh]
    kp = F.pad(jagged_to_padded(k.to(acc), offsets, n * c), (0, 0, 0, 0, w, w))  # [B, w + n·c + w, H, Dh]
    vp = F.pad(jagged_to_padded(v.to(acc), offsets, n * c), (0, 0, 0, 0, w, w))
    # Key slot s of chunk m is position m·c − w + s: row m·c + s of the w-padded keys.
    slots = (torch.arange(n, device=device)[:, None] * c + torch.arange(width, device=device)[None, :]).reshape(-1)  # [n·width]
    qc = qp.view(b, n, c, h, dh).permute(0, 1, 3, 2, 4).reshape(b * n, h, c, dh)
    kc = kp.index_select(1, slots).view(b, n, width, h, dh).permute(0, 1, 3, 2, 4).reshape(b * n, h, width, dh)
    vc = vp.index_select(1, slots).view(b, n, width, h, dv).permute(0, 1, 3, 2, 4).reshape(b * n, h, width, dv)
    pos_q = torch.arange(n * c, device=device).view(n, c)
    pos_k = slots.view(n, width) - w
    band = (pos_q[:, :, None] - pos_k[:, None, :]).abs() <= w  # [n, c, width]
    lengths = offsets[1:] - offsets[:-1]
    key_ok = (pos_k >= 0)[None] & (pos_k[None] < lengths[:, None, None])  # [B, n, width]
    visible = (band[None] & key_ok[:, :, None, :]).view(b * n, 1, c, width)
    out = _attend(qc, kc, vc, visible, scale)  # [B·n, H, c, Dv]
    out = out.view(b, n, h, c, dv).permute(0, 1, 3, 2, 4).reshape(b, n * c, h, dv)
    return padded_to_jagged(out, offsets, q.shape[0]).to(q.dtype)


def jagged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    scale: float,
    window: Optional[int],
    max_q_len: int,
    max_kv_len: int,
) -> torch.Tensor:
    """``q [Tq, H, Dh]``, ``k [Tkv, H, Dh]``, ``v [Tkv, H, Dv]``, offsets ``[B+1]`` → ``[Tq, H, Dv]``.

    Arguments are assumed checked (:func:`kunlun.model.ops.jagged_attention.jagged_attention`):
    ``max_q_len`` / ``max_kv_len`` (rows) bound every sample, and with a window the query
    and key offsets are equal (self-attention).
    """
    # Eager shortcut only: traced with symbolic sizes this is decided as "not empty" (0/1
    # are not specialised), and the general paths below are also exact for zero rows.
    if q.shape[0] == 0 or q_offsets.numel() <= 1:
        return _empty_output(q, k, v)
    if window is not None and window >= max_q_len - 1:  # the band covers every sample
        window = None
    if window is not None:
        c, n = _chunking(max_q_len, window)
        if _BAND_MIN_SAVING * n * c * (c + 2 * window) <= max_q_len * max_q_len:
            return _banded(q, k, v, q_offsets, scale, int(window), max_q_len)
    return _full(q, k, v, q_offsets, kv_offsets, scale, max_q_len, max_kv_len, window)
