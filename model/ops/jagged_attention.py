"""Softmax attention on jagged tensors: the one entry point.

    out = jagged_attention(q, k, v, q_offsets, kv_offsets, window=None, scale=None, impl="auto")

Shapes: ``q [total_q, H, Dh]``, ``k [total_kv, H, Dh]``, ``v [total_kv, H, Dv]``,
``q_offsets`` / ``kv_offsets`` ``[B+1]`` integer offsets (sample ``b`` owns rows
``offsets[b]:offsets[b+1]``). For each sample ``b``, head ``h`` and query row ``i``::

    out[i] = Σ_j softmax_j(scale · ⟨q_i, k_j⟩) · v_j        → [total_q, H, Dv]

over the keys ``j`` of sample ``b``; ``scale`` defaults to ``1/sqrt(Dh)``. ``window=w``
(self-attention: equal query and key lengths per sample) keeps only ``|i − j| ≤ w``, where
``i`` and ``j`` are positions inside the sample. A query that sees no key (a sample with no
keys) gives zeros, and finite (zero) gradients, never NaN.

:func:`jagged_attention_shared_q` is the pooling shape: dense queries (seeds / PMA) shared
by every sample against jagged keys, ``[n, H, Dh]`` → ``[B, n, H, Dv]``.

``impl``: ``"reference"`` (PyTorch: pads inside the op to the longest lengths and runs one
masked SDPA, banded ``O(B·L·w)`` for a narrow window), ``"triton"`` (fused FlashAttention-2
style kernels, no padding; on CPU only under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on CUDA, the
reference elsewhere), resolved by :func:`kunlun.model.ops.select.resolve_impl`.
Every impl is differentiable in q, k and v.

Tracing (``torch.export``, ``torch.compile``): with ``max_q_len`` / ``max_kv_len`` given, no
impl reads a tensor value on the host, so one graph serves every total length; the bounds
and the window's equal-lengths condition are then checked by device-side assertions
(``torch._assert_async``, traced into the graph), as on CUDA.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from kunlun.model.ops.pytorch.jagged_attention import jagged_attention_reference
from kunlun.model.ops.select import DEFAULT_IMPL, check_impl, resolve_impl

_OP = "jagged_attention"


def _check(q, k, v, q_offsets, kv_offsets, window, impl) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{_OP}: q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"{_OP}: head counts differ: q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{_OP}: q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{_OP}: k and v lengths differ: {k.shape[0]} vs {v.shape[0]}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"{_OP}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q_offsets.dim() != 1 or kv_offsets.dim() != 1 or q_offsets.numel() == 0:
        raise ValueError(f"{_OP}: offsets must be 1-D [B+1]; got {tuple(q_offsets.shape)} and {tuple(kv_offsets.shape)}")
    if q_offsets.numel() != kv_offsets.numel():
        raise ValueError(f"{_OP}: q_offsets has {q_offsets.numel()} entries, kv_offsets {kv_offsets.numel()}; both must be B+1")
    check_impl(impl, _OP)
    if window is not None and (int(window) != window or window < 0):
        raise ValueError(f"{_OP}: window must be an integer >= 0, got {window}")


def _check_equal_lengths(q_len: torch.Tensor, kv_len: torch.Tensor, on_host: bool) -> None:
    """A window compares positions i and j inside a sample: only defined for self-attention.
    ``on_host=False`` (CUDA, tracing): a device-side assertion instead of a host sync."""
    if not on_host:
        torch._assert_async((q_len == kv_len).all(), f"{_OP}: window needs equal query and key lengths per sample (self-attention)")
        return
    diff = torch.nonzero(q_len != kv_len)
    if diff.numel():
        b = int(diff[0, 0])
        raise ValueError(
            f"{_OP}: window needs equal query and key lengths per sample (self-attention); sample {b} has {int(q_len[b])} queries and {int(kv_len[b])} keys"
        )


def _max_lens(q_len: torch.Tensor, kv_len: torch.Tensor, max_q_len: Optional[int], max_kv_len: Optional[int], on_host: bool) -> Tuple[int, int]:
    """The longest query and key samples: the given bounds, checked, or computed (one sync).

    Both impls size their work from them (Triton grid, reference padding), so a bound below
    the real maximum would leave rows unwritten: it raises instead. With ``on_host=False``
    (CUDA, or while tracing) a given bound is checked without a host sync
    (``torch._assert_async``: a device-side assertion fails the next synchronising call).
    """
    if q_len.numel() == 0:
        return int(max_q_len or 0), int(max_kv_len or 0)
    got = [max_q_len, max_kv_len]
    if not on_host and None not in got:
        for i, name in enumerate(("max_q_len", "max_kv_len")):
            torch._assert_async((q_len, kv_len)[i].max() <= got[i], f"{_OP}: {name}={got[i]} is below the longest sample")
        return int(got[0]), int(got[1])
    if torch.compiler.is_compiling():
        raise ValueError(f"{_OP}: pass max_q_len and max_kv_len when tracing (torch.export / torch.compile): computing them reads tensor values")
    actual = torch.stack([q_len.max(), kv_len.max()]).tolist()
    for i, name in enumerate(("max_q_len", "max_kv_len")):
        if got[i] is None:
            got[i] = int(actual[i])
        elif actual[i] > got[i]:
            raise ValueError(f"{_OP}: {name}={got[i]} but the longest sample has {actual[i]} rows")
    return int(got[0]), int(got[1])


def jagged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    *,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    impl: str = DEFAULT_IMPL,
    max_q_len: Optional[int] = None,
    max_kv_len: Optional[int] = None,
) -> torch.Tensor:
    """Softmax attention within each sample (see the module docstring) → ``[total_q, H, Dv]``.

    ``max_q_len`` / ``max_kv_len`` (optional; required when tracing): the longest query / key
    sample in rows; they size the Triton grid and the reference's padding and, when given,
    spare a host sync on CUDA. A value below the real maximum raises ``ValueError``
    (``RuntimeError`` from a device assertion on CUDA or in a traced graph).
    """
    _check(q, k, v, q_offsets, kv_offsets, window, impl)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2])
    q_len = q_offsets[1:] - q_offsets[:-1]
    kv_len = kv_offsets[1:] - kv_offsets[:-1]
    on_host = q.device.type != "cuda" and not torch.compiler.is_compiling()  # checks may read values
    if window is not None:  # before any impl runs
        # Self-attention modules pass one offsets tensor for both: nothing to compare.
        if q_offsets is not kv_offsets:
            _check_equal_lengths(q_len, kv_len, on_host)
        if q.shape[0] != k.shape[0]:  # equal lengths with offsets from 0: the same row count
            raise ValueError(f"{_OP}: window needs self-attention; got {q.shape[0]} query rows and {k.shape[0]} key rows")
    use_triton = resolve_impl(impl, q.device, _OP) == "triton"
    lq, lk = _max_lens(q_len, kv_len, max_q_len, max_kv_len, on_host)  # same check for every impl
    if use_triton:
        from kunlun.model.ops.triton.jagged_attention import jagged_attention_triton

        return jagged_attention_triton(q, k, v, q_offsets, kv_offsets, float(scale), window, lq, lk)
    return jagged_attention_reference(q, k, v, q_offsets, kv_offsets, float(scale), window, lq, lk)


def jagged_attention_shared_q(seeds: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_offsets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Pooling: ``seeds [n, H, Dh]`` shared by all samples attend over each sample's jagged
    ``k [total_kv, H, Dh]`` / ``v [total_kv, H, Dv]`` → ``[B, n, H, Dv]`` (zeros for a sample
    without keys). ``kwargs`` go to :func:`jagged_attention` (``scale``, ``impl``, ``max_kv_len``)."""
    if seeds.dim() != 3:
        raise ValueError(f"{_OP}: seeds must be [n, H, Dh]; got {tuple(seeds.shape)}")
    b = kv_offsets.numel() - 1
    n = seeds.shape[0]
    # The copy per sample keeps one code path for every impl; seeds' gradient sums over samples.
    q = seeds.unsqueeze(0).expand(b, *seeds.shape).reshape(b * n, *seeds.shape[1:])
    q_offsets = torch.arange(b + 1, device=seeds.device, dtype=kv_offsets.dtype) * n
    kwargs.setdefault("max_q_len", n)
    out = jagged_attention(q, k, v, q_offsets, kv_offsets, **kwargs)
    return out.reshape(b, n, *out.shape[1:])
