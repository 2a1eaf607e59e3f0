"""PyTorch reference of softmax attention on jagged tensors (no padding to ``[B, L, L]``).

For sample ``b``, head ``h`` and query row ``i`` of that sample::

    out[i] = Σ_j softmax_j(scale · ⟨q_i, k_j⟩) · v_j

over the keys ``j`` of sample ``b`` (and only ``|i − j| ≤ window`` when a window is given).
A query with no visible key (a sample with no keys) gives zeros.

Two paths, both plain differentiable PyTorch and both computing in fp32 (fp64 stays fp64):

* full attention: one dense ``[H, Lq_b, Lkv_b]`` softmax per sample (a Python loop over the
  samples), so memory is ``max_b Lq_b·Lkv_b`` per head instead of ``B·Lq_max·Lkv_max``;
* windowed attention: a banded computation without any loop: the rows are cut into chunks
  of ``max(16, w)`` queries, each attending only to its chunk widened by ``w`` keys on both
  sides, so time and memory are ``O(total·w)`` instead of ``O(Σ L_b²)``.

This is what the Triton kernels are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 → fp32, fp64 stays fp64


def _empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Keep the autograd graph for empty inputs: zero gradients rather than "no grad_fn".
    return q.new_zeros((q.shape[0], q.shape[1], v.shape[2])) + 0 * (q.sum() + k.sum() + v.sum())


def _full(q, k, v, q_offsets, kv_offsets, scale: float) -> torch.Tensor:
    acc = _compute_dtype(q.dtype)
    qo, ko = q_offsets.tolist(), kv_offsets.tolist()  # one host sync: the loop needs the lengths
    pieces = []
    for b in range(len(qo) - 1):
        qb = q[qo[b] : qo[b + 1]].to(acc).transpose(0, 1)  # [H, Lq, Dh]
        kb = k[ko[b] : ko[b + 1]].to(acc).transpose(0, 1)  # [H, Lkv, Dh]
        vb = v[ko[b] : ko[b + 1]].to(acc).transpose(0, 1)  # [H, Lkv, Dv]
        # With Lkv = 0 the softmax is over an empty axis and the product with an empty V is
        # exactly zero, so a sample without keys gives zeros (and zero gradients) by itself.
        p = torch.softmax(torch.matmul(qb, kb.transpose(1, 2)) * scale, dim=-1)  # [H, Lq, Lkv]
        pieces.append(torch.matmul(p, vb).transpose(0, 1))  # [Lq, H, Dv]
    return torch.cat(pieces).to(q.dtype)


# Fewest queries per chunk: smaller chunks make the batched matmuls tiny (8, 16 and 32 measured
# on CPU at L = 256, w = 8: 16 was fastest).
_CHUNK = 16


def _banded(q, k, v, q_offsets, scale: float, window: int) -> torch.Tensor:
    """Windowed self-attention (identical query/key offsets) in ``O(total·(chunk + 2w))``.

    The rows (all samples back to back) are cut into chunks of ``chunk`` queries; a chunk can
    only see the keys from ``w`` rows before it to ``w`` rows after it, so each (chunk, head)
    is one small dense ``[chunk, chunk + 2w]`` softmax, batched over chunks and heads. A key
    is visible when it is in the query's sample and ``|i − j| ≤ w`` (inside one sample the
    global row distance is the position distance). No ``L × L`` matrix, no Python loop.
    """
    acc = _compute_dtype(q.dtype)
    total, h, device = q.shape[0], q.shape[1], q.device
    w = window
    chunk = max(_CHUNK, w)
    n = -(-total // chunk)
    pad = n * chunk - total
    width = chunk + 2 * w
    # Head-major layout once, so every matmul below runs on contiguous [H·n, rows, D] batches.
    qh = F.pad(q.to(acc).transpose(0, 1), (0, 0, 0, pad)).view(h * n, chunk, -1)  # [H·n, chunk, Dh]
    # Key slot s of chunk c is global row c·chunk − w + s: rows of the w-padded keys, gathered
    # with index_select (its backward is one index_add, cheaper than unfold's on CPU).
    slots = (torch.arange(n, device=device)[:, None] * chunk + torch.arange(width, device=device)[None, :]).reshape(-1)
    kh = F.pad(k.to(acc).transpose(0, 1), (0, 0, w, pad + w)).index_select(1, slots).view(h * n, width, -1)
    vh = F.pad(v.to(acc).transpose(0, 1), (0, 0, w, pad + w)).index_select(1, slots).view(h * n, width, -1)
    lengths = q_offsets[1:] - q_offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
    # Padding rows get sample id -1: padding queries then see padding keys (a finite softmax,
    # discarded), real queries never see them.
    sq = F.pad(sample, (0, pad), value=-1).view(n, chunk)
    sk = F.pad(sample, (w, pad + w), value=-1)[slots].view(n, width)
    q_row = torch.arange(n * chunk, device=device).view(n, chunk)
    key_row = slots.view(n, width) - w
    visible = (sq[:, :, None] == sk[:, None, :]) & ((q_row[:, :, None] - key_row[:, None, :]).abs() <= w)  # [n, chunk, width]
    scores = torch.bmm(qh, kh.transpose(1, 2)).view(h, n, chunk, width) * scale
    # Every query sees at least itself (|i − i| = 0 ≤ w), so no row is all -inf: no NaN.
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.bmm(p.view(h * n, chunk, width), vh).view(h, n * chunk, -1)[:, :total]  # [H, T, Dv]
    return out.transpose(0, 1).to(q.dtype)


def jagged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    scale: float,
    window: Optional[int] = None,
    max_len: Optional[int] = None,
) -> torch.Tensor:
    """``q [Tq, H, Dh]``, ``k [Tkv, H, Dh]``, ``v [Tkv, H, Dv]``, offsets ``[B+1]`` → ``[Tq, H, Dv]``.

    Arguments are assumed checked (:func:`kunlun.model.ops.jagged_attention.jagged_attention`);
    with a window the query and key offsets are identical (self-attention). ``max_len``
    (the longest sample, windowed path only) avoids a device sync when given.
    """
    if q.shape[0] == 0 or q_offsets.numel() <= 1:
        return _empty_output(q, k, v)
    if window is None:
        return _full(q, k, v, q_offsets, kv_offsets, scale)
    if max_len is None:
        max_len = int((q_offsets[1:] - q_offsets[:-1]).max())
    if window >= max_len - 1:  # the band covers every sample: plain full attention
        return _full(q, k, v, q_offsets, kv_offsets, scale)
    return _banded(q, k, v, q_offsets, scale, int(window))
