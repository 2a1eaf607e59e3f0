"""GDPA — generalized dot-product attention — on jagged tensors: the one entry point.

    out = gdpa(q, k, v, q_offsets, kv_offsets, activation="silu", qk_scale=1.0, out_scale=1.0,
               window=None, impl="auto")

Shapes: ``q [total_q, H, Dh]``, ``k [total_kv, H, Dh]``, ``v [total_kv, H, Dv]``,
``q_offsets`` / ``kv_offsets`` ``[B+1]`` integer offsets (sample ``b`` owns rows
``offsets[b]:offsets[b+1]``). For each sample ``b`` and head ``h``::

    out[i] = Σ_j out_scale · act_h(qk_scale · ⟨q_i, k_j⟩) · v_j        → [total_q, H, Dv]

over the keys of sample ``b``; no softmax, no normalisation. ``window=w`` (self-attention,
equal query and key lengths per sample) keeps only ``|i − j| ≤ w``. ``activation`` is one
name or a list with one name per head (``identity``, ``relu``, ``silu``, ``gelu``,
``gelu_tanh``).

The same operator covers three uses:

* personalised FFN: K/V are per-sample dense weights (``kv_offsets = arange(B+1) · n_kv``),
  see :func:`gdpa_dense_kv`;
* self-attention: q, k, v from the same jagged sequence, optionally windowed;
* seed pooling: shared learned queries over each sample's sequence, see :func:`gdpa_shared_q`.

``impl``: ``"reference"`` (PyTorch, pads per sample), ``"triton"`` (fused kernels; on CPU
only under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on CUDA, reference elsewhere); resolved
by :func:`kunlun.model.ops.select.resolve_gdpa_impl`, the one place that chooses.
Every impl is differentiable in q, k and v.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from kunlun.model.ops.activations import per_head
from kunlun.model.ops.pytorch.gdpa import gdpa_reference
from kunlun.model.ops.select import DEFAULT_IMPL, check_impl, resolve_gdpa_impl


def _max_len(offsets: torch.Tensor, given: Optional[int]) -> int:
    """Longest sample of ``offsets [B+1]``: ``given`` as is (no device sync), else computed.

    A ``given`` value is not checked (checking would sync): the Triton kernels loop over
    tiles past the grid, so a sample longer than it is still computed exactly, only slower
    (``max_len`` sizes the grid and picks the schedule; it is not a correctness bound)."""
    if given is not None:
        return int(given)
    if offsets.numel() <= 1:
        return 0
    return int((offsets[1:] - offsets[:-1]).max())


def _check(q, k, v, q_offsets, kv_offsets, window, impl) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"gdpa: q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"gdpa: head counts differ: q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"gdpa: q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"gdpa: k and v lengths differ: {k.shape[0]} vs {v.shape[0]}")
    if q_offsets.numel() != kv_offsets.numel():
        raise ValueError(f"gdpa: q_offsets has {q_offsets.numel()} entries, kv_offsets {kv_offsets.numel()}; both must be B+1")
    check_impl(impl)
    if window is not None and window < 0:
        raise ValueError(f"gdpa: window must be >= 0, got {window}")
    # Before dispatch, so every impl rejects it alike. Self-attention modules pass the same
    # offsets tensor for both, which skips the value comparison (a device sync on CUDA).
    if window is not None and q_offsets is not kv_offsets:
        if q.shape[0] != k.shape[0] or not torch.equal(q_offsets, kv_offsets):
            raise ValueError("gdpa: window needs equal query and key lengths per sample (self-attention)")


def gdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    *,
    activation: Union[str, Sequence[str]] = "silu",
    qk_scale: float = 1.0,
    out_scale: float = 1.0,
    window: Optional[int] = None,
    impl: str = DEFAULT_IMPL,
    max_q_len: Optional[int] = None,
    max_kv_len: Optional[int] = None,
) -> torch.Tensor:
    """See the module docstring. ``max_q_len`` / ``max_kv_len`` (optional, events): the
    longest query / key sample, to avoid a device sync; they size the Triton grid and pick
    its schedule (short-KV kernels when ``max_kv_len ≤ 64`` and no window), and an
    understated value costs speed, not correctness."""
    _check(q, k, v, q_offsets, kv_offsets, window, impl)
    acts = per_head(activation, q.shape[1])
    if resolve_gdpa_impl(impl, q.device) == "triton":
        from kunlun.model.ops.triton.gdpa import gdpa_triton

        if torch.is_autocast_enabled(q.device.type):  # autocast does not reach into custom kernels
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

        return gdpa_triton(
            q,
            k,
            v,
            q_offsets,
            kv_offsets,
            acts,
            qk_scale,
            out_scale,
            window,
            _max_len(q_offsets, max_q_len),
            _max_len(kv_offsets, max_kv_len),
        )
    return gdpa_reference(q, k, v, q_offsets, kv_offsets, acts, qk_scale, out_scale, window, max_q_len, max_kv_len)


def gdpa_dense_kv(q: torch.Tensor, q_offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """Personalised FFN: ``k [B, n_kv, H, Dh]``, ``v [B, n_kv, H, Dv]`` per sample, jagged ``q``."""
    b, n_kv = k.shape[0], k.shape[1]
    kv_offsets = torch.arange(b + 1, device=q.device, dtype=q_offsets.dtype) * n_kv
    return gdpa(q, k.reshape(b * n_kv, *k.shape[2:]), v.reshape(b * n_kv, *v.shape[2:]), q_offsets, kv_offsets, max_kv_len=n_kv, **kwargs)


def gdpa_shared_q(seeds: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_offsets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Seed pooling: ``seeds [n_seeds, H, Dh]`` shared by all samples → ``[B, n_seeds, H, Dv]``."""
    b = kv_offsets.numel() - 1
    n = seeds.shape[0]
    q = seeds.unsqueeze(0).expand(b, *seeds.shape).reshape(b * n, *seeds.shape[1:])
    q_offsets = torch.arange(b + 1, device=seeds.device, dtype=kv_offsets.dtype) * n
    out = gdpa(q, k, v, q_offsets, kv_offsets, max_q_len=n, **kwargs)
    return out.reshape(b, n, *out.shape[1:])
