"""Tile helpers shared by the jagged Triton kernels (``gdpa.py``, ``jagged_attention.py``):
sample bounds from offsets, the grid-axis-0 split, masked row tiles, and the key/query range
and mask a tile sees (optionally limited to a window ``|i − j| ≤ w``)."""

import triton
import triton.language as tl


@triton.jit
def _segment(offsets, b):
    """Start row (int64) and length (int32: loop bounds) of sample ``b``, ``offsets [B+1]``."""
    start = tl.load(offsets + b).to(tl.int64)
    return start, (tl.load(offsets + b + 1).to(tl.int64) - start).to(tl.int32)


@triton.jit
def _split_pid(pid, n_tiles):
    """Program id on grid axis 0 → (sample, tile): the inverse of ``pid = b · n_tiles + tile``."""
    return pid // n_tiles, pid % n_tiles


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
