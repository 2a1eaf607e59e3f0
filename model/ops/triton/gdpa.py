"""Fused Triton GDPA kernels on jagged tensors: forward, and backward as two kernels.

Forward, one program per (query tile, sample, head): the ``[BLOCK_M, BLOCK_N]`` score tile
``act(qk_scale · Q Kᵀ) · out_scale`` lives only in registers and is multiplied into V
straight away, so no ``[T, n_kv]`` intermediate ever reaches global memory. No softmax
means no running max and no rescaling: the KV loop is a plain accumulation, which for the
short-KV personalised FFN (n_kv 128–256) is one or two iterations.

Backward recomputes the scores (nothing but the inputs is saved):

* ``dkv`` kernel, one program per (key tile, sample, head), loops over query tiles and
  accumulates ``dV = Pᵀ dO`` and ``dK = dSᵀ Q``;
* ``dq`` kernel, one program per (query tile, sample, head), loops over key tiles and
  accumulates ``dQ = dS K``;

with ``dS = (dO Vᵀ) ⊙ act'(S) · out_scale · qk_scale``. Two kernels instead of one with
atomics keep the gradients deterministic.

Jagged tiles: the grid covers the longest sample; tiles past a sample's length exit at
once, and a window (``|i − j| ≤ w``) restricts each tile's loop to the keys it can see.
Per-head activations launch the kernels once per activation, over that activation's heads.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kunlun.model.ops.activations import ACTIVATIONS


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    # On GPUs one MUFU instruction (tanh.approx.f32, rel. error ~2^-11, well under bf16's
    # 2^-8) instead of exp + a precise division; the interpreter cannot run inline PTX.
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return t


@triton.jit
def _act(s, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 0:
        out = s
    elif ACT == 1:
        out = tl.maximum(s, 0.0)
    elif ACT == 2:
        out = 0.5 * s * (1.0 + _tanh(0.5 * s, FAST))  # s·sigmoid(s)
    elif ACT == 3:
        out = 0.5 * s * (1.0 + tl.erf(s * 0.7071067811865476))
    else:
        out = 0.5 * s * (1.0 + _tanh(0.7978845608028654 * (s + 0.044715 * s * s * s), FAST))
    return out


@triton.jit
def _act_grad(s, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 0:
        g = tl.full(s.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(s > 0, 1.0, 0.0)
    elif ACT == 2:
        sig = 0.5 + 0.5 * _tanh(0.5 * s, FAST)
        g = sig * (1.0 + s * (1.0 - sig))
    elif ACT == 3:
        g = 0.5 * (1.0 + tl.erf(s * 0.7071067811865476)) + s * 0.3989422804014327 * tl.exp(-0.5 * s * s)
    else:
        t = _tanh(0.7978845608028654 * (s + 0.044715 * s * s * s), FAST)
        g = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
    return g


@triton.jit
def _segment(offsets, b):
    """Start row and length of sample ``b`` in a jagged tensor with ``offsets [B+1]``."""
    start = tl.load(offsets + b).to(tl.int64)
    return start, tl.load(offsets + b + 1).to(tl.int64) - start


@triton.jit
def _load_tile(base, row0, offs, n_valid, stride_t, head_off, offs_d, D: tl.constexpr):
    """Rows ``row0 + offs`` (masked to ``n_valid``) of one head, ``D`` columns (padded to the block)."""
    return tl.load(
        base + (row0 + offs)[:, None] * stride_t + head_off + offs_d[None, :],
        mask=(offs < n_valid)[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def _store_tile(base, value, row0, offs, n_valid, stride_t, head_off, offs_d, D: tl.constexpr):
    tl.store(
        base + (row0 + offs)[:, None] * stride_t + head_off + offs_d[None, :],
        value.to(base.dtype.element_ty),
        mask=(offs < n_valid)[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _loop_bounds(start, BLOCK: tl.constexpr, window, length, OTHER_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Range of the other axis a tile ``[start, start + BLOCK)`` can see (aligned to OTHER_BLOCK)."""
    if HAS_WINDOW:
        lo = tl.maximum(start - window, 0)
        lo = (lo // OTHER_BLOCK) * OTHER_BLOCK
        hi = tl.minimum(start + BLOCK + window, length)
    else:
        lo = 0
        hi = length
    return lo, hi


@triton.jit
def _valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW: tl.constexpr):
    """``[BM, BN]`` mask of (query, key) pairs inside both samples (and the window)."""
    valid = (offs_m < lq)[:, None] & (offs_n < lk)[None, :]
    if HAS_WINDOW:
        diff = offs_m[:, None] - offs_n[None, :]
        valid = valid & (diff <= window) & (diff >= -window)
    return valid


@triton.jit
def _gdpa_fwd_kernel(
    Q,
    K,
    V,
    Out,
    q_off,
    kv_off,
    heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    out_scale,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.load(heads + tl.program_id(2)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    kv_start, lk = _segment(kv_off, b)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _loop_bounds(m0, BLOCK_M, window, lk, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(_valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW), _act(s, ACT, FAST) * out_scale, 0.0)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    _store_tile(Out, acc, q_start, offs_m, lq, stride_ot, h * stride_oh, offs_dv, DV)


@triton.jit
def _gdpa_bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV_,
    q_off,
    kv_off,
    heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    out_scale,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.load(heads + tl.program_id(2)).to(tl.int64)
    kv_start, lk = _segment(kv_off, b)
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    q_start, lq = _segment(q_off, b)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
    v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo, hi = _loop_bounds(n0, BLOCK_N, window, lq, BLOCK_M, HAS_WINDOW)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
        do = _load_tile(DO, q_start, offs_m, lq, stride_ot, h * stride_oh, offs_dv, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
        valid = _valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW)
        p = tl.where(valid, _act(s, ACT, FAST) * out_scale, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(valid, dp * _act_grad(s, ACT, FAST) * (out_scale * qk_scale), 0.0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_tile(DK, dk, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
    _store_tile(DV_, dv, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)


@triton.jit
def _gdpa_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    q_off,
    kv_off,
    heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    out_scale,
    window,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.load(heads + tl.program_id(2)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    kv_start, lk = _segment(kv_off, b)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
    do = _load_tile(DO, q_start, offs_m, lq, stride_ot, h * stride_oh, offs_dv, DV)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _loop_bounds(m0, BLOCK_M, window, lk, BLOCK_N, HAS_WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(_valid(offs_m, offs_n, lq, lk, window, HAS_WINDOW), dp * _act_grad(s, ACT, FAST) * (out_scale * qk_scale), 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ, dq, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)


# --------------------------------------------------------------------------- launch
def _head_groups(activations: Sequence[str], device: torch.device) -> List[Tuple[int, torch.Tensor]]:
    """``[(activation code, int32 head indices)]``, one launch per distinct activation."""
    groups: dict = {}
    for h, a in enumerate(activations):
        groups.setdefault(ACTIVATIONS[a], []).append(h)
    return [(code, torch.tensor(hs, dtype=torch.int32, device=device)) for code, hs in sorted(groups.items())]


def _launch_config(d: int, dv: int, dtype: torch.dtype, tune: Optional[dict], backward: bool = False) -> dict:
    """Tile sizes and launch options; ``tune`` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides.

    bf16 defaults come from an H100 sweep (``benchmarks/gdpa_tune.py``, BENCHMARKS.md) at
    H=4, Dh=128, n_kv=256: forward 128x32 tiles, 3 stages; backward 64x64, 2 stages.
    """
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    if dtype == torch.float32 or max(bd, bdv) > 128:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    elif backward:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
    cfg.update(tune or {})
    cfg.update(BLOCK_D=bd, BLOCK_DV=bdv)
    # Fast tanh only for bf16/fp16 (its error is below their rounding) on a real GPU.
    cfg.update(FAST=dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1")
    return cfg


def _common(q, k, v, o_like, qk_scale, out_scale, window):
    return (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o_like.stride(0),
        o_like.stride(1),
        float(qk_scale),
        float(out_scale),
        int(window or 0),
    )


def gdpa_forward(q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block=None):
    tq, h, d = q.shape
    dv = v.shape[2]
    out = torch.empty((tq, h, dv), dtype=q.dtype, device=q.device)
    b = q_offsets.numel() - 1
    if tq == 0 or b == 0:
        return out.zero_()
    cfg = _launch_config(d, dv, q.dtype, block)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for code, heads in _head_groups(activations, q.device):
        grid = (triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"]), b, heads.numel())
        _gdpa_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            q_offsets,
            kv_offsets,
            heads,
            *_common(q, k, v, out, qk_scale, out_scale, window),
            D=d,
            DV=dv,
            ACT=code,
            HAS_WINDOW=window is not None,
            PRECISION=precision,
            **cfg,
        )
    return out


def gdpa_backward(do, q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block=None):
    tq, h, d = q.shape
    dv = v.shape[2]
    dq, dk, dvv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    b = q_offsets.numel() - 1
    if tq == 0 or k.shape[0] == 0 or b == 0:
        return dq, dk, dvv
    do = do.contiguous()
    cfg = _launch_config(d, dv, q.dtype, block, backward=True)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for code, heads in _head_groups(activations, q.device):
        meta = dict(D=d, DV=dv, ACT=code, HAS_WINDOW=window is not None, PRECISION=precision, **cfg)
        common = _common(q, k, v, do, qk_scale, out_scale, window)
        _gdpa_bwd_dkv_kernel[(triton.cdiv(max(max_kv_len, 1), cfg["BLOCK_N"]), b, heads.numel())](
            q, k, v, do, dk, dvv, q_offsets, kv_offsets, heads, *common, **meta
        )
        _gdpa_bwd_dq_kernel[(triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"]), b, heads.numel())](q, k, v, do, dq, q_offsets, kv_offsets, heads, *common, **meta)
    return dq, dk, dvv


class GDPATritonFunction(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs; backward recomputes the scores in-kernel."""

    @staticmethod
    def forward(ctx, q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = gdpa_forward(q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block)
        ctx.save_for_backward(q, k, v, q_offsets, kv_offsets)
        ctx.args = (activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_offsets, kv_offsets = ctx.saved_tensors
        dq, dk, dv = gdpa_backward(do, q, k, v, q_offsets, kv_offsets, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def gdpa_triton(
    q,
    k,
    v,
    q_offsets,
    kv_offsets,
    activations: Sequence[str],
    qk_scale: float,
    out_scale: float,
    window: Optional[int],
    max_q_len: int,
    max_kv_len: int,
    block: Optional[dict] = None,
) -> torch.Tensor:
    return GDPATritonFunction.apply(q, k, v, q_offsets, kv_offsets, tuple(activations), qk_scale, out_scale, window, max_q_len, max_kv_len, block)
