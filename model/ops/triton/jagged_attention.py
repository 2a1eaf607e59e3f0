"""Fused Triton softmax attention on jagged tensors (FlashAttention-2 style), forward + backward.

Grid: axis 0 folds the sample and the tile index (``pid = b · n_tiles + tile``, with
``n_tiles = cdiv(max_len, BLOCK)``), axis 1 is the head. The batch is never on axis 1 or 2,
whose size CUDA caps at 65,535. Tiles past a sample's length exit at once.

Forward, one program per (query tile, sample, head): online softmax over the key tiles
(running row max ``m``, running sum ``l``, rescaled accumulator), in base 2 (``exp2`` with
the scale folded into ``log2 e``). It stores the output and the row log-sum-exp
``lse = m + log2 l`` (base 2, ``+inf`` for a row that sees no key, so its probabilities
recompute to 0 in the backward instead of NaN).

Backward (nothing but q, k, v, out and lse is saved; the probabilities are recomputed):

* ``delta = rowsum(dO ⊙ O)`` (one PyTorch reduction);
* ``dkv`` kernel, one program per (key tile, sample, head), loops over query tiles:
  ``dV += Pᵀ dO``, ``dK += dSᵀ Q · scale`` with ``dS = P ⊙ (dO Vᵀ − delta)``;
* ``dq`` kernel, one program per (query tile, sample, head), loops over key tiles:
  ``dQ += dS K · scale``.

Two kernels instead of atomics keep the gradients deterministic. With a window
(``|i − j| ≤ w``) each loop runs only over the tiles that intersect the band of its tile
(tiles outside it are skipped, not masked), so the cost is ``O(total · w)``.
All accumulation is fp32; inputs may be fp32, bf16 or fp16.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kunlun.model.ops.triton.tiles import _load_tile, _loop_bounds, _segment, _split_pid, _store_tile, _valid

_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    q_off,
    kv_off,
    n_tiles,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_ot,
    stride_lt,
    scale_log2,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    m0 = tile * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    if m0 >= lq:
        return
    kv_start, lk = _segment(kv_off, b)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * D, offs_d, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _loop_bounds(m0, BLOCK_M, window, lk, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * D, offs_d, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(_valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead so that
        # exp2(-inf - (-inf)) never produces NaN (its p and alpha are then exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * DV, offs_dv, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows with no visible key: acc = 0 → zeros
    _store_tile(Out, out, q_start, offs_m, lq, stride_ot, h * DV, offs_dv, DV)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + (q_start + offs_m) * stride_lt + h, lse, mask=offs_m < lq)


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, lq, lk, scale_log2, window, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed softmax probabilities ``[BM, BN]`` (0 where not visible)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    ok = _valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW)
    return tl.where(ok, tl.exp2(tl.where(ok, s, 0.0) - lse[:, None]), 0.0)


@triton.jit
def _bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV_,
    q_off,
    kv_off,
    n_tiles,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_ot,
    stride_lt,
    scale,
    scale_log2,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    n0 = tile * BLOCK_N
    h = tl.program_id(1).to(tl.int64)
    kv_start, lk = _segment(kv_off, b)
    if n0 >= lk:
        return
    q_start, lq = _segment(q_off, b)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * D, offs_d, D)
    v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * DV, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, hi = _loop_bounds(n0, BLOCK_N, window, lq, BLOCK_M, HAS_WINDOW)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * D, offs_d, D)
        do = _load_tile(DO, q_start, offs_m, lq, stride_ot, h * DV, offs_dv, DV)
        row_ok = offs_m < lq
        lse = tl.load(LSE + (q_start + offs_m) * stride_lt + h, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (q_start + offs_m) * stride_lt + h, mask=row_ok, other=0.0)
        p = _probs(q, k, lse, offs_m, offs_n, lq, lk, scale_log2, window, HAS_WINDOW, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_tile(DK, dk * scale, kv_start, offs_n, lk, stride_kt, h * D, offs_d, D)
    _store_tile(DV_, dv, kv_start, offs_n, lk, stride_vt, h * DV, offs_dv, DV)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    q_off,
    kv_off,
    n_tiles,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_ot,
    stride_lt,
    scale,
    scale_log2,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    m0 = tile * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    if m0 >= lq:
        return
    kv_start, lk = _segment(kv_off, b)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < lq
    q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * D, offs_d, D)
    do = _load_tile(DO, q_start, offs_m, lq, stride_ot, h * DV, offs_dv, DV)
    lse = tl.load(LSE + (q_start + offs_m) * stride_lt + h, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (q_start + offs_m) * stride_lt + h, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _loop_bounds(m0, BLOCK_M, window, lk, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * D, offs_d, D)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * DV, offs_dv, DV)
        p = _probs(q, k, lse, offs_m, offs_n, lq, lk, scale_log2, window, HAS_WINDOW, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ, dq * scale, q_start, offs_m, lq, stride_qt, h * D, offs_d, D)


# --------------------------------------------------------------------------- launch
def _config(d: int, dv: int, dtype: torch.dtype, block: Optional[dict], backward: bool) -> dict:
    """Tile sizes and launch options; ``block`` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides.

    Defaults are untuned starting points: fp32 (and head dims > 128) use 32x32 tiles to
    stay within registers; bf16/fp16 use 64-row tiles.
    """
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    if dtype == torch.float32 or max(bd, bdv) > 128:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    elif backward:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    cfg.update(block or {})
    cfg.update(BLOCK_D=bd, BLOCK_DV=bdv)
    return cfg


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact (ieee) dots, as the reference computes; bf16/fp16 dots are native.
    return "ieee" if dtype == torch.float32 else "tf32"


def jagged_attention_forward(q, k, v, q_offsets, kv_offsets, scale, window, max_q_len, block=None):
    """``q [Tq, H, Dh]`` etc. (contiguous) → ``out [Tq, H, Dv]`` and ``lse [Tq, H]`` (fp32, base 2)."""
    tq, h, d = q.shape
    dv = v.shape[2]
    out = torch.empty((tq, h, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((tq, h), dtype=torch.float32, device=q.device)
    b = q_offsets.numel() - 1
    if tq == 0 or b == 0:
        return out, lse.fill_(float("inf"))
    cfg = _config(d, dv, q.dtype, block, backward=False)
    n_tiles = triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"])
    _fwd_kernel[(b * n_tiles, h)](
        q,
        k,
        v,
        out,
        lse,
        q_offsets,
        kv_offsets,
        n_tiles,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        out.stride(0),
        lse.stride(0),
        float(scale) * _LOG2E,
        int(window or 0),
        D=d,
        DV=dv,
        HAS_WINDOW=window is not None,
        PRECISION=_precision(q.dtype),
        **cfg,
    )
    return out, lse


def jagged_attention_backward(do, q, k, v, out, lse, q_offsets, kv_offsets, scale, window, max_q_len, max_kv_len, block=None):
    """Gradients ``(dq, dk, dv)`` of :func:`jagged_attention_forward` for ``do [Tq, H, Dv]``."""
    tq, h, d = q.shape
    dv = v.shape[2]
    b = q_offsets.numel() - 1
    if tq == 0 or k.shape[0] == 0 or b == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1)  # [Tq, H] = rowsum(dO ⊙ O), same layout as lse
    cfg = _config(d, dv, q.dtype, block, backward=True)
    meta = dict(D=d, DV=dv, HAS_WINDOW=window is not None, PRECISION=_precision(q.dtype), **cfg)
    strides = (q.stride(0), k.stride(0), v.stride(0), do.stride(0), lse.stride(0), float(scale), float(scale) * _LOG2E, int(window or 0))
    n_kv_tiles = triton.cdiv(max(max_kv_len, 1), cfg["BLOCK_N"])
    _bwd_dkv_kernel[(b * n_kv_tiles, h)](q, k, v, do, lse, delta, dk, dvv, q_offsets, kv_offsets, n_kv_tiles, *strides, **meta)
    n_q_tiles = triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"])
    _bwd_dq_kernel[(b * n_q_tiles, h)](q, k, v, do, lse, delta, dq, q_offsets, kv_offsets, n_q_tiles, *strides, **meta)
    return dq, dk, dvv


class JaggedAttentionTritonFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, q_offsets, kv_offsets, scale, window, max_q_len, max_kv_len, block):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = jagged_attention_forward(q, k, v, q_offsets, kv_offsets, scale, window, max_q_len, block)
        ctx.save_for_backward(q, k, v, out, lse, q_offsets, kv_offsets)
        ctx.args = (scale, window, max_q_len, max_kv_len, block)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, q_offsets, kv_offsets = ctx.saved_tensors
        scale, window, max_q_len, max_kv_len, block = ctx.args
        dq, dk, dv = jagged_attention_backward(do, q, k, v, out, lse, q_offsets, kv_offsets, scale, window, max_q_len, max_kv_len, block)
        return dq, dk, dv, None, None, None, None, None, None, None


def jagged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    scale: float,
    window: Optional[int],
    max_q_len: int,
    max_kv_len: int,
    block: Optional[dict] = None,
) -> torch.Tensor:
    """Fused softmax attention; ``max_q_len`` / ``max_kv_len`` must be ≥ the longest sample
    (they size the grid; checked by the caller)."""
    return JaggedAttentionTritonFunction.apply(q, k, v, q_offsets, kv_offsets, scale, window, max_q_len, max_kv_len, block)
