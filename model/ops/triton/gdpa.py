"""Fused Triton GDPA kernels on jagged tensors, forward and backward, in two schedules.

Two schedules, chosen per call by :func:`schedule` (window and ``max_kv_len``).

**Tiled** (long keys, self-attention, windows). Forward, one program per (query tile,
sample, head): the ``[BLOCK_M, BLOCK_N]`` score tile ``act(qk_scale · Q Kᵀ) · out_scale``
lives only in registers and is multiplied into V straight away, so no ``[T, n_kv]``
intermediate ever reaches global memory. No softmax means no running max and no
rescaling: the KV loop is a plain accumulation, which for the personalised FFN
(n_kv 128–256) is one or two iterations.

Backward recomputes the scores (nothing but the inputs is saved):

* ``dkv`` kernel, one program per (key tile, sample, head), loops over query tiles and
  accumulates ``dV = Pᵀ dO`` and ``dK = dSᵀ Q``;
* ``dq`` kernel, one program per (query tile, sample, head), loops over key tiles and
  accumulates ``dQ = dS K``;

with ``dS = (dO Vᵀ) ⊙ act'(S) · out_scale · qk_scale``. Two kernels instead of one with
atomics keep the gradients deterministic.

**Short KV** (no window, ``max_kv_len ≤ SHORT_KV_MAX_KEYS``: the personalised FFN with few
keys, seed pooling over short histories). One program per (sample, head) loads that
sample's K/V block once (``[BLOCK_N ≥ n_kv, Dh]``, kept in registers) and loops over the
sample's query tiles; backward is *one* kernel: with every key in the program, each query
tile's ``dQ`` is complete in one pass and ``dK``/``dV`` accumulate in registers, so nothing
is recomputed by a second kernel and nothing needs atomics. A sample with more keys than
the block (``max_kv_len`` understated) is still exact: further key blocks run as outer
iterations that add into the rows already written (same program, after a barrier).

Grid: the sample and its tile share axis 0 (``pid = b · n_tiles + tile``, see
:func:`_grid`) and the heads of one activation use axis 1 — CUDA caps axes 1 and 2 at
65,535, which an eval batch exceeds. ``n_tiles`` comes from the caller's ``max_len``; a
program loops over tiles ``tile, tile + n_tiles, …`` of its sample, so a sample longer
than ``max_len`` is still computed in full (one iteration per program when ``max_len`` is
right), with no device sync to check it. A window (``|i − j| ≤ w``) restricts each tile's
loop to the keys it can see. Per-head activations launch the kernels once per activation,
over that activation's heads.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kunlun.model.ops.activations import ACTIVATIONS
from kunlun.model.ops.triton.tiles import _load_tile, _loop_bounds, _segment, _split_pid, _store_tile, _valid


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
    n_tiles,
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
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    h = tl.load(heads + tl.program_id(1)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    kv_start, lk = _segment(kv_off, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Query tiles tile, tile + n_tiles, ...: one iteration unless the sample is longer than max_q_len.
    for m0 in range(tile * BLOCK_M, lq, n_tiles * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
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
    n_tiles,
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
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    h = tl.load(heads + tl.program_id(1)).to(tl.int64)
    kv_start, lk = _segment(kv_off, b)
    q_start, lq = _segment(q_off, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Key tiles tile, tile + n_tiles, ...: one iteration unless the sample is longer than max_kv_len.
    for n0 in range(tile * BLOCK_N, lk, n_tiles * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
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
    n_tiles,
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
    b, tile = _split_pid(tl.program_id(0), n_tiles)
    h = tl.load(heads + tl.program_id(1)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    kv_start, lk = _segment(kv_off, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for m0 in range(tile * BLOCK_M, lq, n_tiles * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
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


@triton.jit
def _gdpa_short_kv_fwd_kernel(
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
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST: tl.constexpr,
):
    """One program per (sample, head): K/V loaded once, loop over the sample's query tiles."""
    b = tl.program_id(0)
    h = tl.load(heads + tl.program_id(1)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    kv_start, lk = _segment(kv_off, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # One key block (BLOCK_N >= max_kv_len) unless a sample has more keys than declared; then
    # later blocks add into the rows the first wrote. At least one pass so that a sample
    # without keys still writes zeros.
    for n0 in range(0, tl.maximum(lk, 1), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
        for m0 in range(0, lq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(_valid(offs_m, offs_n, lq, lk, 0, False), _act(s, ACT, FAST) * out_scale, 0.0)
            acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            acc += _load_tile(Out, q_start, offs_m, tl.where(n0 > 0, lq, 0), stride_ot, h * stride_oh, offs_dv, DV).to(tl.float32)
            _store_tile(Out, acc, q_start, offs_m, lq, stride_ot, h * stride_oh, offs_dv, DV)
        tl.debug_barrier()  # this block's stores are visible to the next block's loads


@triton.jit
def _gdpa_short_kv_bwd_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
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
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST: tl.constexpr,
):
    """One program per (sample, head): all three gradients in one pass over the query tiles."""
    b = tl.program_id(0)
    h = tl.load(heads + tl.program_id(1)).to(tl.int64)
    q_start, lq = _segment(q_off, b)
    kv_start, lk = _segment(kv_off, b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n0 in range(0, tl.maximum(lk, 1), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
        v = _load_tile(V, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for m0 in range(0, lq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
            do = _load_tile(DO, q_start, offs_m, lq, stride_ot, h * stride_oh, offs_dv, DV)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BM, BN]
            valid = _valid(offs_m, offs_n, lq, lk, 0, False)
            p = tl.where(valid, _act(s, ACT, FAST) * out_scale, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = tl.where(valid, dp * _act_grad(s, ACT, FAST) * (out_scale * qk_scale), 0.0)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # every key of this block
            dq += _load_tile(DQ, q_start, offs_m, tl.where(n0 > 0, lq, 0), stride_qt, h * stride_qh, offs_d, D).to(tl.float32)
            _store_tile(DQ, dq, q_start, offs_m, lq, stride_qt, h * stride_qh, offs_d, D)
        _store_tile(DK, dk, kv_start, offs_n, lk, stride_kt, h * stride_kh, offs_d, D)
        _store_tile(DV_, dv, kv_start, offs_n, lk, stride_vt, h * stride_vh, offs_dv, DV)
        tl.debug_barrier()


# --------------------------------------------------------------------------- launch
def _head_groups(activations: Sequence[str], device: torch.device) -> List[Tuple[int, torch.Tensor]]:
    """``[(activation code, int32 head indices)]``, one launch per distinct activation."""
    groups: dict = {}
    for h, a in enumerate(activations):
        groups.setdefault(ACTIVATIONS[a], []).append(h)
    return [(code, torch.tensor(hs, dtype=torch.int32, device=device)) for code, hs in sorted(groups.items())]


# bf16/fp16 tile configs per head-dim bucket (by BLOCK_D = next power of two ≥ Dh, ≥ 16):
# tile sizes that fit and pipeline well depend on Dh, so a config tuned at one head dim is
# not reused blindly at another. Measured: only the Dh=128 "fwd"/"bwd" rows, an H100 sweep
# (``benchmarks/gdpa_tune.py``, BENCHMARKS.md) at H=4, n_kv=256. Everything else is
# provisional until swept (``gdpa_tune.py --head-dim 32|64|128``, ``--kv 64`` for short-KV):
# at Dh ≤ 64 the Q tile and accumulator take ≤ half the registers of Dh=128, so the forward
# takes a 64-wide key tile (fewer loop iterations); the short-KV kernels hold the whole K/V
# block, plus dK/dV in backward, so at Dh=128 they use 8 warps to stay within registers.
_TILES = {
    64: {  # Dh ≤ 64 (presets: 32, 64) — provisional
        "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        "bwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "short_kv_fwd": dict(BLOCK_M=128, num_warps=4, num_stages=2),
        "short_kv_bwd": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    },
    128: {  # Dh 65–128 — fwd/bwd measured at 128, short-KV provisional
        "fwd": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
        "bwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "short_kv_fwd": dict(BLOCK_M=64, num_warps=8, num_stages=2),
        "short_kv_bwd": dict(BLOCK_M=32, num_warps=8, num_stages=2),
    },
}
# fp32 (tests, CPU interpreter) and Dh > 128: small tiles that fit any GPU's registers.
_SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)

SHORT_KV_MAX_KEYS = 64
"""Largest ``max_kv_len`` the short-KV schedule takes (its K/V block stays in registers)."""


def schedule(window: Optional[int], max_kv_len: int, tune: Optional[dict] = None) -> str:
    """``"short_kv"`` (no window and ``max_kv_len ≤ SHORT_KV_MAX_KEYS``) or ``"tiled"``;
    ``tune["schedule"]`` forces one (``benchmarks/gdpa_tune.py`` compares them)."""
    forced = (tune or {}).get("schedule")
    if forced is not None:
        if forced not in ("tiled", "short_kv") or (forced == "short_kv" and window is not None):
            raise ValueError(f"gdpa triton: schedule {forced!r} is not one of 'tiled', 'short_kv' (the latter without a window)")
        return forced
    return "short_kv" if window is None and max_kv_len <= SHORT_KV_MAX_KEYS else "tiled"


def _launch_config(d: int, dv: int, dtype: torch.dtype, tune: Optional[dict], kind: str = "fwd", max_kv_len: int = 0) -> dict:
    """Tile sizes and launch options for one kernel ``kind`` (``fwd``, ``bwd``,
    ``short_kv_fwd``, ``short_kv_bwd``) at head dims ``d`` (q/k) and ``dv`` (v), from
    :data:`_TILES`; ``tune`` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides. The short-KV
    kernels' key block is ``next_pow2(max_kv_len)`` (≥ 16), the whole K/V of a sample.
    """
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    big = max(bd, bdv)
    if dtype == torch.float32 or big > 128:
        cfg = dict(_SMALL_TILES)
    else:
        cfg = dict(_TILES[64 if big <= 64 else 128][kind])
    if kind.startswith("short_kv"):
        cfg["BLOCK_N"] = max(16, triton.next_power_of_2(max(max_kv_len, 1)))
    cfg.update({k: v for k, v in (tune or {}).items() if k != "schedule"})
    cfg.update(BLOCK_D=bd, BLOCK_DV=bdv)
    # Fast tanh only for bf16/fp16 (its error is below their rounding) on a real GPU.
    cfg.update(FAST=dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1")
    return cfg


def _grid(n_tiles: int, batch: int, n_heads: int) -> Tuple[int, int]:
    """Launch grid ``(batch · n_tiles, n_heads)``: sample and tile share axis 0 (limit 2³¹ − 1),
    the kernels split it with ``_split_pid``; axes 1 and 2 (limit 65,535) never hold the batch."""
    return (batch * n_tiles, n_heads)


def _common(q, k, v, o_like, qk_scale, out_scale):
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
    )


def gdpa_forward(q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block=None):
    """``q [Tq, H, D]``, ``k [Tk, H, D]``, ``v [Tk, H, Dv]`` (contiguous), ``[B+1]`` offsets →
    ``[Tq, H, Dv]``. ``max_q_len`` / ``max_kv_len`` size the grid and pick the schedule; a
    sample longer than them is still computed in full (the kernels loop), only slower."""
    tq, h, d = q.shape
    dv = v.shape[2]
    out = torch.empty((tq, h, dv), dtype=q.dtype, device=q.device)
    b = q_offsets.numel() - 1
    if tq == 0 or b == 0:
        return out.zero_()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    short = schedule(window, max_kv_len, block) == "short_kv"
    cfg = _launch_config(d, dv, q.dtype, block, "short_kv_fwd" if short else "fwd", max_kv_len)
    for code, heads in _head_groups(activations, q.device):
        common = _common(q, k, v, out, qk_scale, out_scale)
        meta = dict(D=d, DV=dv, ACT=code, PRECISION=precision, **cfg)
        if short:
            _gdpa_short_kv_fwd_kernel[_grid(1, b, heads.numel())](q, k, v, out, q_offsets, kv_offsets, heads, *common, **meta)
        else:
            n_tiles = triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"])
            _gdpa_fwd_kernel[_grid(n_tiles, b, heads.numel())](
                q, k, v, out, q_offsets, kv_offsets, heads, *common, int(window or 0), n_tiles, HAS_WINDOW=window is not None, **meta
            )
    return out


def gdpa_backward(do, q, k, v, q_offsets, kv_offsets, activations, qk_scale, out_scale, window, max_q_len, max_kv_len, block=None):
    """Gradients ``(dq, dk, dv)`` of :func:`gdpa_forward` for ``do [Tq, H, Dv]``."""
    tq, h, d = q.shape
    dv = v.shape[2]
    dq, dk, dvv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    b = q_offsets.numel() - 1
    if tq == 0 or k.shape[0] == 0 or b == 0:
        return dq, dk, dvv
    do = do.contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    short = schedule(window, max_kv_len, block) == "short_kv"
    cfg = _launch_config(d, dv, q.dtype, block, "short_kv_bwd" if short else "bwd", max_kv_len)
    for code, heads in _head_groups(activations, q.device):
        meta = dict(D=d, DV=dv, ACT=code, PRECISION=precision, **cfg)
        common = _common(q, k, v, do, qk_scale, out_scale)
        if short:
            _gdpa_short_kv_bwd_kernel[_grid(1, b, heads.numel())](q, k, v, do, dq, dk, dvv, q_offsets, kv_offsets, heads, *common, **meta)
            continue
        meta.update(HAS_WINDOW=window is not None)
        w = int(window or 0)
        n_kv_tiles = triton.cdiv(max(max_kv_len, 1), cfg["BLOCK_N"])
        _gdpa_bwd_dkv_kernel[_grid(n_kv_tiles, b, heads.numel())](q, k, v, do, dk, dvv, q_offsets, kv_offsets, heads, *common, w, n_kv_tiles, **meta)
        n_q_tiles = triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"])
        _gdpa_bwd_dq_kernel[_grid(n_q_tiles, b, heads.numel())](q, k, v, do, dq, q_offsets, kv_offsets, heads, *common, w, n_q_tiles, **meta)
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
