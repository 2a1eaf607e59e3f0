"""Jagged softmax attention: the PyTorch reference against a naive per-sample loop, the Triton
kernels against the reference (forward and the three gradients), and the argument checks.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it
for the session; set here too so the file also runs on its own) with tiny shapes and 16x16
tiles, so samples span several tiles and windows skip tiles. The interpreter's bf16 ``tl.dot``
is wrong (GDPA's kernels show the same), so bf16 runs on a GPU only; fp16 runs everywhere.
Tolerances: fp64 reference vs loop 1e-10; fp32 Triton vs reference 1e-4 abs;
fp16/bf16 relative L2 error ≤ 1e-2 (forward) / 2e-2 (gradients) against fp32 on the same inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kunlun.model.ops import jagged_attention, jagged_attention_shared_q  # noqa: E402
from kunlun.model.ops.select import resolve_impl  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TILES = dict(BLOCK_M=16, BLOCK_N=16)  # small tiles: several per sample at interpreter-sized shapes


def offsets(lengths, device="cpu"):
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)


def naive(q, k, v, qo, ko, scale=None, window=None):
    """Independent per-sample dense softmax (fp64, differentiable): the ground truth."""
    scale = q.shape[2] ** -0.5 if scale is None else scale
    rows = []
    for b in range(len(qo) - 1):
        qs, qe, ks, ke = int(qo[b]), int(qo[b + 1]), int(ko[b]), int(ko[b + 1])
        qb, kb, vb = q[qs:qe].double(), k[ks:ke].double(), v[ks:ke].double()
        if ke == ks:  # no keys: zeros by definition
            rows.append(qb.new_zeros(qe - qs, q.shape[1], v.shape[2]) + 0 * (qb.sum() + kb.sum() + vb.sum()))
            continue
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        if window is not None:
            i = torch.arange(qe - qs)[:, None]
            j = torch.arange(ke - ks)[None, :]
            s = s.masked_fill((i - j).abs() > window, float("-inf"))
        rows.append(torch.einsum("hij,jhe->ihe", torch.softmax(s, dim=-1), vb))
    return torch.cat(rows)


def make(qlen, kvlen, h, d, dv, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qo, ko = offsets(qlen, device), offsets(kvlen, device)
    q = torch.randn(int(qo[-1]), h, d, generator=g, dtype=torch.float64)
    k = torch.randn(int(ko[-1]), h, d, generator=g, dtype=torch.float64)
    v = torch.randn(int(ko[-1]), h, dv, generator=g, dtype=torch.float64)
    q, k, v = (x.to(device, dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, qo, ko, g


def grads(out, inputs, go):
    return torch.autograd.grad(out, inputs, go)


REF_CASES = [
    # q lengths, kv lengths (None = same as q), heads, Dh, Dv, window, scale
    ([5, 0, 1, 37, 20], None, 2, 8, 6, None, None),
    ([5, 0, 1, 37, 20], None, 2, 8, 6, 3, None),
    ([5, 0, 1, 37, 20], None, 2, 8, 8, 0, 0.3),
    ([9], None, 1, 4, 3, None, 0.5),  # B = 1
    ([9], None, 3, 4, 5, 3, None),  # B = 1, windowed
    ([6, 2], None, 2, 4, 4, 100, None),  # window wider than every sample = full attention
    ([40, 25, 0, 3], None, 2, 4, 3, 20, None),  # window wider than the reference's chunk of 16
    ([1, 1, 1], None, 1, 4, 2, 0, None),
    ([4, 3, 0], [0, 7, 5], 2, 8, 5, None, None),  # cross attention; a sample without keys
    ([0, 0], None, 2, 4, 4, None, None),  # everything empty
    ([160, 3, 0, 97], None, 2, 4, 3, 2, None),  # long enough for the reference's banded path
    ([160, 1, 45], None, 1, 4, 4, 0, 0.7),  # banded, w = 0
]


@pytest.mark.parametrize("case", REF_CASES, ids=[f"case{i}" for i in range(len(REF_CASES))])
def test_reference_matches_naive_loop(case):
    qlen, kvlen, h, d, dv, window, scale = case
    q, k, v, qo, ko, g = make(qlen, qlen if kvlen is None else kvlen, h, d, dv, seed=REF_CASES.index(case))
    out = jagged_attention(q, k, v, qo, ko, window=window, scale=scale, impl="reference")
    want = naive(q, k, v, qo, ko, scale, window)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for name, a, b in zip("qkv", grads(out, (q, k, v), go), grads(want, (q, k, v), go)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_reference_fp32_and_gradcheck():
    q, k, v, qo, ko, _ = make([5, 0, 3], [5, 0, 3], 2, 4, 3, seed=11)
    for window in (None, 1):
        fn = lambda q, k, v: jagged_attention(q, k, v, qo, ko, window=window, impl="reference")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v))
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    out = jagged_attention(q32, k32, v32, qo, ko, window=1, impl="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive(q, k, v, qo, ko, window=1).detach(), atol=1e-5, rtol=1e-5)


def test_shared_q_matches_naive():
    seeds_g = torch.Generator().manual_seed(5)
    h, d, dv, n = 2, 8, 6, 3
    seeds = torch.randn(n, h, d, generator=seeds_g, dtype=torch.float64, requires_grad=True)
    ko = offsets([7, 0, 2, 1])
    k = torch.randn(10, h, d, generator=seeds_g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, h, dv, generator=seeds_g, dtype=torch.float64, requires_grad=True)
    out = jagged_attention_shared_q(seeds, k, v, ko, scale=0.4, impl="reference")
    assert out.shape == (4, n, h, dv)
    assert torch.count_nonzero(out[1]) == 0  # no keys → zero summary
    q = seeds.unsqueeze(0).expand(4, n, h, d).reshape(4 * n, h, d)
    want = naive(q, k, v, offsets([n] * 4), ko, 0.4).reshape(4, n, h, dv)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    go = torch.randn(out.shape, generator=seeds_g, dtype=torch.float64)
    for a, b in zip(grads(out, (seeds, k, v), go), grads(want, (seeds, k, v), go)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_windowed_reference_is_banded(monkeypatch):
    """With a window narrower than the samples the reference takes the banded path (never the
    per-sample dense softmax), here on a sample 3000 long (a dense 3000² fp32 score matrix
    per head would be 36 MB)."""
    import kunlun.model.ops.pytorch.jagged_attention as ref_impl

    q, k, v, qo, ko, _ = make([3000, 5], [3000, 5], 1, 4, 4, seed=3, dtype=torch.float32)
    want = jagged_attention(q[:40], k[:40], v[:40], offsets([40]), offsets([40]), window=2, impl="reference")
    monkeypatch.setattr(ref_impl, "_full", lambda *a: pytest.fail("dense path taken"))
    out = jagged_attention(q, k, v, qo, ko, window=2, impl="reference")
    torch.testing.assert_close(out[:38], want[:38])  # rows whose band lies in the first 40 keys


TRITON_CASES = [
    # q lengths, kv lengths (None = same as q), heads, Dh, Dv, window, scale
    ([5, 0, 1, 40, 20], None, 2, 24, 20, None, None),  # ragged, a sample over two tiles, Dh != Dv
    ([5, 0, 1, 40, 20], None, 2, 24, 20, 3, None),  # window: far key tiles skipped
    ([40, 17], None, 1, 16, 16, 0, 0.2),
    ([3], None, 2, 16, 8, None, 0.5),  # B = 1
    ([4, 3, 0, 18], [0, 20, 5, 1], 2, 16, 16, None, None),  # cross attention, a sample without keys
    ([0, 0, 0], None, 2, 16, 16, None, None),  # everything empty
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"case{i}" for i in range(len(TRITON_CASES))])
def test_triton_matches_reference_fp32(case):
    qlen, kvlen, h, d, dv, window, scale = case
    q, k, v, qo, ko, g = make(qlen, qlen if kvlen is None else kvlen, h, d, dv, seed=100 + TRITON_CASES.index(case), dtype=torch.float32, device=DEVICE)
    ref = jagged_attention(q, k, v, qo, ko, window=window, scale=scale, impl="reference")
    from kunlun.model.ops.triton.jagged_attention import jagged_attention_triton

    lq = int((qo[1:] - qo[:-1]).max())
    lk = int((ko[1:] - ko[:-1]).max())
    sc = scale if scale is not None else d**-0.5
    tri = jagged_attention_triton(q, k, v, qo, ko, sc, window, lq, lk, TILES)
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    go = torch.randn(ref.shape, generator=g).to(DEVICE)
    for name, a, b in zip("qkv", grads(tri, (q, k, v), go), grads(ref, (q, k, v), go)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_triton_default_tiles_and_empty_rows():
    """Through the public entry point (default tiles): rows without keys are zeros, their
    gradients zeros, nothing is NaN."""
    q, k, v, qo, ko, g = make([3, 2, 4], [0, 6, 0], 2, 16, 8, seed=7, dtype=torch.float32, device=DEVICE)
    out = jagged_attention(q, k, v, qo, ko, impl="triton")
    ref = jagged_attention(q, k, v, qo, ko, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(out[:3]) == 0 and torch.count_nonzero(out[5:]) == 0
    dq, dk, dv = grads(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv))
    assert torch.count_nonzero(dq[:3]) == 0 and torch.count_nonzero(dq[5:]) == 0


def test_triton_window_skips_tiles():
    """Key tiles outside the band are never loaded: NaN values there cannot reach the output
    (masking a visited tile would give 0 · NaN = NaN). Without a window they do."""
    from kunlun.model.ops.triton.jagged_attention import jagged_attention_triton

    q, k, v, qo, ko, _ = make([48], [48], 1, 16, 16, seed=9, dtype=torch.float32, device=DEVICE)
    v = v.detach().clone()
    v[32:] = float("nan")  # key tile 2; query tile 0 (rows 0-15) with w = 3 sees keys 0-18 only
    out = jagged_attention_triton(q.detach(), k.detach(), v, qo, ko, 0.25, 3, 48, 48, TILES)
    assert torch.isfinite(out[:16]).all()
    ref = jagged_attention(q.detach()[:32], k.detach()[:32], v[:32], offsets([32], DEVICE), offsets([32], DEVICE), window=3, scale=0.25, impl="reference")
    torch.testing.assert_close(out[:16], ref[:16], atol=1e-4, rtol=1e-4)
    full = jagged_attention_triton(q.detach(), k.detach(), v, qo, ko, 0.25, None, 48, 48, TILES)
    assert torch.isnan(full[:16]).all()


def test_shared_q_triton():
    g = torch.Generator().manual_seed(21)
    seeds = torch.randn(4, 2, 16, generator=g).to(DEVICE).requires_grad_()
    ko = offsets([7, 0, 20], DEVICE)
    k = torch.randn(27, 2, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(27, 2, 16, generator=g).to(DEVICE).requires_grad_()
    outs = {impl: jagged_attention_shared_q(seeds, k, v, ko, impl=impl) for impl in ("reference", "triton")}
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-4, rtol=1e-4)
    go = torch.randn(outs["reference"].shape, generator=g).to(DEVICE)
    for a, b in zip(grads(outs["triton"], (seeds, k, v), go), grads(outs["reference"], (seeds, k, v), go)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("window", [None, 3])
def test_triton_half_precision(dtype, window):
    q, k, v, qo, ko, g = make([5, 0, 40, 20], [5, 0, 40, 20], 2, 32, 16, seed=31, dtype=dtype, device=DEVICE)
    tri = jagged_attention(q, k, v, qo, ko, window=window, impl="triton")
    assert tri.dtype == dtype
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = jagged_attention(qf, kf, vf, qo, ko, window=window, impl="reference")
    rel = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm().clamp(min=1e-12))  # noqa: E731
    assert rel(tri, ref) < 1e-2
    go = torch.randn(ref.shape, generator=g).to(DEVICE)
    for a, b in zip(grads(tri, (q, k, v), go.to(dtype)), grads(ref, (qf, kf, vf), go)):
        assert a.dtype == dtype and rel(a, b) < 2e-2


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_too_small_max_len_raises(impl):
    q, k, v, qo, ko, _ = make([5, 20], [3, 9], 1, 16, 16, seed=1, dtype=torch.float32, device=DEVICE)
    if CUDA:  # checked by a device-side assertion there (no host sync)
        pytest.skip("a failing device assertion poisons the CUDA context")
    with pytest.raises(ValueError, match="max_q_len=16 but the longest sample has 20"):
        jagged_attention(q, k, v, qo, ko, impl=impl, max_q_len=16)
    with pytest.raises(ValueError, match="max_kv_len=8 but the longest sample has 9"):
        jagged_attention(q, k, v, qo, ko, impl=impl, max_kv_len=8)
    out = jagged_attention(q, k, v, qo, ko, impl=impl, max_q_len=64, max_kv_len=9)  # larger bounds are fine
    torch.testing.assert_close(out, jagged_attention(q, k, v, qo, ko, impl="reference"), atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_named():
    qo = torch.tensor([0, 2])
    x = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="head counts differ"):
        jagged_attention(x, torch.randn(2, 3, 8), torch.randn(2, 3, 8), qo, qo)
    with pytest.raises(ValueError, match=r"must be \[T, H, D\]"):
        jagged_attention(x[0], x, x, qo, qo)
    with pytest.raises(ValueError, match="head dims differ"):
        jagged_attention(x, torch.randn(2, 2, 4), x, qo, qo)
    with pytest.raises(ValueError, match="k and v lengths differ"):
        jagged_attention(x, x, torch.randn(3, 2, 8), qo, qo)
    with pytest.raises(ValueError, match="both must be B\\+1"):
        jagged_attention(x, x, x, qo, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="impl="):
        jagged_attention(x, x, x, qo, qo, impl="cuda")
    with pytest.raises(ValueError, match=r"seeds must be \[n, H, Dh\]"):
        jagged_attention_shared_q(x[0], x, x, qo)
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        jagged_attention(x, x, x, qo, qo, window=-1)
    # unequal lengths under a window: named, and raised before any impl runs (also "triton")
    for impl in ("reference", "triton", "auto"):
        with pytest.raises(ValueError, match="sample 1 has 3 queries and 2 keys"):
            kv = torch.randn(4, 2, 8)
            jagged_attention(torch.randn(5, 2, 8), kv, kv, torch.tensor([0, 2, 5]), torch.tensor([0, 2, 4]), window=1, impl=impl)
        with pytest.raises(ValueError, match="got 6 query rows and 5 key rows"):
            o = torch.tensor([0, 2, 5])
            jagged_attention(torch.randn(6, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), o, o, window=1, impl=impl)


def test_kernel_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("auto", cpu, "jagged_attention") == "reference"
    assert resolve_impl("auto", cuda, "jagged_attention") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="jagged_attention impl='triton' needs a CUDA tensor"):
        resolve_impl("triton", cpu, "jagged_attention")
    x = torch.randn(2, 1, 16)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        jagged_attention(x, x, x, torch.tensor([0, 2]), torch.tensor([0, 2]), impl="triton")


class _Attend(torch.nn.Module):
    """Self-attention over a jagged ``x [T, H, D]`` given ``lengths [B]``, as the towers call it."""

    def __init__(self, window, max_len):
        super().__init__()
        self.window, self.max_len = window, max_len

    def forward(self, x, lengths):
        off = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
        return jagged_attention(x, x * 0.5, x + 1.0, off, off, window=self.window, impl="reference", max_q_len=self.max_len, max_kv_len=self.max_len)


@pytest.mark.parametrize(
    "window, path",
    [(None, "_full"), (2, "_banded"), (30, "_full"), (200, "_full")],
    ids=["full", "banded", "band-mask", "window-covers-all"],
)
def test_reference_exports_with_dynamic_totals(window, path, monkeypatch):
    """The reference path the towers use reads no tensor value on the host (no per-sample loop,
    no ``.tolist()``): ``torch.export`` traces one graph for every total length, zero included,
    and it equals the independent loop. Samples up to 160 rows; ``path`` is the one traced."""
    from torch.export import Dim

    import kunlun.model.ops.pytorch.jagged_attention as ref_impl

    calls = []
    traced = getattr(ref_impl, path)
    monkeypatch.setattr(ref_impl, path, lambda *a: calls.append(path) or traced(*a))
    m = _Attend(window, 160)
    trace_len = torch.tensor([7, 160, 3])
    x = torch.randn(int(trace_len.sum()), 2, 4)
    dims = ({0: Dim("t", min=0, max=1 << 20)}, {0: Dim("b", min=1, max=1 << 20)})
    program = torch.export.export(m, (x, trace_len), dynamic_shapes=dims, strict=False).module()
    assert calls == [path]
    for lengths in ([5, 0, 160, 1], [0, 0], [9], [133] * 6):
        lengths = torch.tensor(lengths)
        x = torch.randn(int(lengths.sum()), 2, 4, dtype=torch.float32)
        o = offsets(lengths.tolist())
        want = naive(x, x * 0.5, x + 1.0, o, o, window=window).float()
        torch.testing.assert_close(program(x, lengths), want, atol=1e-5, rtol=1e-5)


def test_reference_compiles_once_for_dynamic_totals():
    """``torch.compile`` (dynamic totals, full graph) of the full and the banded path: new
    total lengths and batch sizes reuse the compiled graph instead of recompiling."""
    import torch._dynamo.testing

    for window in (None, 2):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        fn = torch.compile(_Attend(window, 160), backend=counter, dynamic=True, fullgraph=True)
        for lengths in ([7, 160, 3], [5, 0, 160, 1], [9, 9], [2, 3, 4, 5, 6]):
            lengths = torch.tensor(lengths)
            x = torch.randn(int(lengths.sum()), 2, 4)
            o = offsets(lengths.tolist())
            torch.testing.assert_close(fn(x, lengths), naive(x, x * 0.5, x + 1.0, o, o, window=window).float(), atol=1e-5, rtol=1e-5)
        assert counter.frame_count == 1, f"window={window}: compiled {counter.frame_count} times"
