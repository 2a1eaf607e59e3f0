"""GDPA: Triton kernels vs the PyTorch reference, forward and all three gradients.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set here before the
kernels are imported); on a CUDA machine the same tests run the compiled kernels, plus
bf16 checks. Tolerances: fp32 ≤ 1e-4 abs (ieee dot); bf16 relative L2 error ≤ 1e-2
against an fp32 reference on the same (rounded) inputs.
This file needs only torch and triton (no TorchRec), so it runs on the GPU box as is.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kunlun.model.ops import gdpa, gdpa_dense_kv, gdpa_shared_q  # noqa: E402
from kunlun.model.ops.activations import torch_activation  # noqa: E402
from kunlun.model.ops.select import resolve_gdpa_impl  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def offsets(lengths):
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(DEVICE)


def loop_reference(q, k, v, qo, ko, acts, qk_scale, out_scale, window):
    """Independent per-sample, per-head loop (checks the padded reference itself)."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for b in range(len(qo) - 1):
        qs, qe, ks, ke = int(qo[b]), int(qo[b + 1]), int(ko[b]), int(ko[b + 1])
        for h, a in enumerate(acts):
            s = qk_scale * q[qs:qe, h].double() @ k[ks:ke, h].double().T
            p = torch_activation(a)(s) * out_scale
            if window is not None:
                i = torch.arange(qe - qs)[:, None]
                j = torch.arange(ke - ks)[None, :]
                p = p * ((i - j).abs() <= window)
            out[qs:qe, h] = p @ v[ks:ke, h].double()
    return out


CASES = [
    # q lengths, kv lengths (None = same as q), heads, Dh, Dv, activation(s), window
    ([5, 0, 1, 37, 20], None, 2, 24, 20, "silu", None),
    ([5, 0, 1, 37, 20], None, 2, 24, 20, ["gelu", "relu"], 3),
    ([1, 1, 1], None, 1, 16, 16, "gelu_tanh", 0),
    ([70, 3, 0, 33], None, 3, 32, 16, ["identity", "silu", "gelu"], 17),
    ([0, 0, 0], None, 2, 16, 16, "silu", None),  # all sequences empty
    ([40, 7, 0, 19], [8, 8, 8, 8], 2, 32, 32, "gelu_tanh", None),  # dense per-sample K/V (PFFN)
    ([4, 4], [50, 0], 2, 16, 8, ["relu", "silu"], None),  # shared-query shape, empty K/V sample
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_matches_reference_fp32(case):
    qlen, kvlen, h, d, dv, act, window = case
    kvlen = qlen if kvlen is None else kvlen
    g = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    qo, ko = offsets(qlen), offsets(kvlen)
    q = torch.randn(int(qo[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(int(ko[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(int(ko[-1]), h, dv, generator=g).to(DEVICE).requires_grad_()
    kw = dict(activation=act, qk_scale=0.25, out_scale=0.7, window=window)
    ref = gdpa(q, k, v, qo, ko, impl="reference", **kw)
    tri = gdpa(q, k, v, qo, ko, impl="triton", **kw)
    acts = [act] * h if isinstance(act, str) else act
    exact = loop_reference(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), qo.cpu(), ko.cpu(), acts, 0.25, 0.7, window)
    torch.testing.assert_close(ref.detach().cpu().double(), exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn(ref.shape, generator=g).to(DEVICE)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad_out)
    g_tri = torch.autograd.grad(tri, (q, k, v), grad_out)
    for name, a, b in zip("qkv", g_tri, g_ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_gradients_are_numerically_right():
    """The reference's autograd (what the kernels are held to) against finite differences."""
    g = torch.Generator().manual_seed(0)
    qo = torch.tensor([0, 3, 5])
    q = torch.randn(5, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: gdpa(q, k, v, qo, qo, activation=["gelu_tanh", "silu"], window=1, impl="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dense_kv_and_shared_q_wrappers():
    g = torch.Generator().manual_seed(1)
    b, n_kv, h, d = 3, 6, 2, 16
    qo = offsets([4, 0, 9])
    q = torch.randn(13, h, d, generator=g).to(DEVICE)
    k = torch.randn(b, n_kv, h, d, generator=g).to(DEVICE)
    v = torch.randn(b, n_kv, h, d, generator=g).to(DEVICE)
    for impl in ("reference", "triton"):
        out = gdpa_dense_kv(q, qo, k, v, activation="gelu", impl=impl)
        # personalised FFN: act(q W1(x)) W2(x) per sample
        rows = torch.repeat_interleave(torch.arange(b, device=DEVICE), qo[1:] - qo[:-1])
        hidden = torch.nn.functional.gelu(torch.einsum("thd,tnhd->thn", q, k[rows]))  # [T, H, n_kv]
        want = torch.einsum("thn,tnhe->the", hidden, v[rows])
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    seeds = torch.randn(5, h, d, generator=g).to(DEVICE)
    ko = offsets([7, 0, 2])
    kk = torch.randn(9, h, d, generator=g).to(DEVICE)
    vv = torch.randn(9, h, d, generator=g).to(DEVICE)
    pooled = {impl: gdpa_shared_q(seeds, kk, vv, ko, activation="silu", impl=impl) for impl in ("reference", "triton")}
    assert pooled["reference"].shape == (3, 5, h, d)
    assert torch.count_nonzero(pooled["reference"][1]) == 0  # no history → zero summary
    torch.testing.assert_close(pooled["triton"], pooled["reference"], atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_named():
    qo = torch.tensor([0, 2])
    x = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="head counts differ"):
        gdpa(x, torch.randn(2, 3, 8), torch.randn(2, 3, 8), qo, qo)
    with pytest.raises(ValueError, match="activation 'softmax' is not supported"):
        gdpa(x, x, x, qo, qo, activation="softmax")
    with pytest.raises(ValueError, match="got 3 names for 2 heads"):
        gdpa(x, x, x, qo, qo, activation=["silu"] * 3)
    with pytest.raises(ValueError, match="impl="):
        gdpa(x, x, x, qo, qo, impl="cuda")
    with pytest.raises(ValueError, match="window needs equal"):
        gdpa(x, x, x, qo, torch.tensor([0, 1]), window=2, impl="reference")


def test_kernel_selection(monkeypatch):
    """``auto`` is Triton on CUDA and the reference elsewhere; explicit names pass through."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_gdpa_impl("auto", cpu) == "reference" and resolve_gdpa_impl("auto", cuda) == "triton"
    assert resolve_gdpa_impl("reference", cuda) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_gdpa_impl("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        resolve_gdpa_impl("triton", cpu)
    with pytest.raises(ValueError, match="impl="):
        resolve_gdpa_impl("cuda", cpu)


@pytest.mark.skipif(not CUDA, reason="bf16 kernels are checked on a GPU")
@pytest.mark.parametrize("window", [None, 64])
def test_bf16_on_gpu(window):
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = torch.randint(0, 600, (24,), generator=g, device="cuda")
    qo = torch.cat([torch.zeros(1, dtype=torch.int64, device="cuda"), lens.cumsum(0)])
    t, h, d = int(qo[-1]), 4, 128
    q, k, v = (torch.randn(t, h, d, generator=g, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in range(3))
    for x in (q, k, v):
        x.requires_grad_()
    kw = dict(activation=["gelu_tanh", "silu", "gelu", "relu"], qk_scale=1 / 16, window=window)
    tri = gdpa(q, k, v, qo, qo, impl="triton", **kw)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = gdpa(qf, kf, vf, qo, qo, impl="reference", **kw)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm().clamp(min=1e-12))  # noqa: E731
    assert rel(tri, ref) < 1e-2
    go = torch.randn(ref.shape, generator=g, device="cuda")
    for a, b in zip(torch.autograd.grad(tri, (q, k, v), go.bfloat16()), torch.autograd.grad(ref, (qf, kf, vf), go)):
        assert rel(a, b) < 2e-2
