"""GDPA: Triton kernels vs the PyTorch reference, forward and all three gradients.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set here before the
kernels are imported); on a CUDA machine the same tests run the compiled kernels, plus
bf16 checks. Both schedules (tiled; short-KV, one program per (sample, head)) run on every
case without a window. Tolerances: fp32 ≤ 1e-4 abs (ieee dot) at unit-scale outputs,
scaled by the output's magnitude for the large-score cases; bf16 relative L2 error against
an fp32 reference on the same (rounded) inputs: ≤ 1e-2 forward / 2e-2 gradients with scores
of magnitude ≲ 1 (activations near-linear), ≤ 2e-2 / 3e-2 with scores of magnitude ~4
(where silu/gelu curve: bf16 rounding of the activated scores and of dS, and the
approximate tanh's error in ``1 − tanh²``, no longer cancel as in a linear map).
Seeds are fixed per case (crc32 of the case), so a failure reproduces in any process.
This file needs only torch and triton (no TorchRec), so it runs on the GPU box as is.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import triton
import triton.language as tl

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kunlun.model.ops import gdpa, gdpa_dense_kv, gdpa_shared_q  # noqa: E402
from kunlun.model.ops.activations import torch_activation  # noqa: E402
from kunlun.model.ops.select import resolve_gdpa_impl  # noqa: E402
from kunlun.model.ops.triton import gdpa as tri_mod  # noqa: E402

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


def seed_of(case) -> int:
    """Stable across processes (``hash(str)`` is salted per process)."""
    return zlib.crc32(repr(case).encode())


def force_schedule(monkeypatch, schedule):
    """Make ``auto`` pick ``schedule`` for windowless calls (windows always run tiled)."""
    monkeypatch.setattr(tri_mod, "SHORT_KV_MAX_KEYS", {"tiled": -1, "short_kv": 10**9}[schedule])


CASES = [
    # q lengths, kv lengths (None = same as q), heads, Dh, Dv, activation(s), window, qk_scale
    ([5, 0, 1, 37, 20], None, 2, 24, 20, "silu", None, 0.25),
    ([5, 0, 1, 37, 20], None, 2, 24, 20, ["gelu", "relu"], 3, 0.25),
    ([1, 1, 1], None, 1, 16, 16, "gelu_tanh", 0, 0.25),
    ([70, 3, 0, 33], None, 3, 32, 16, ["identity", "silu", "gelu"], 17, 0.25),
    ([0, 0, 0], None, 2, 16, 16, "silu", None, 0.25),  # all sequences empty
    ([40, 7, 0, 19], [8, 8, 8, 8], 2, 32, 32, "gelu_tanh", None, 0.25),  # dense per-sample K/V (PFFN)
    ([4, 4], [50, 0], 2, 16, 8, ["relu", "silu"], None, 0.25),  # shared-query shape, empty K/V sample
    # large scores (|s| ~ 4: qk_scale·√Dh = 4), where silu / gelu curve
    ([40, 0, 9], [16, 16, 16], 3, 16, 16, ["silu", "gelu", "gelu_tanh"], None, 1.0),
    ([21, 6], None, 2, 16, 8, ["gelu_tanh", "silu"], 4, 1.0),
]
# every windowless case under both schedules; windowed ones only run tiled
PARAMS = [
    pytest.param(case, sched, id=f"case{i}-{sched}") for i, case in enumerate(CASES) for sched in (("tiled", "short_kv") if case[6] is None else ("tiled",))
]


# the interpreter's exp overflows to inf for very negative scores (sigmoid → 0, correct)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("case,sched", PARAMS)
def test_triton_matches_reference_fp32(case, sched, monkeypatch):
    qlen, kvlen, h, d, dv, act, window, qk_scale = case
    force_schedule(monkeypatch, sched)
    kvlen = qlen if kvlen is None else kvlen
    g = torch.Generator().manual_seed(seed_of(case))
    qo, ko = offsets(qlen), offsets(kvlen)
    q = torch.randn(int(qo[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(int(ko[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(int(ko[-1]), h, dv, generator=g).to(DEVICE).requires_grad_()
    kw = dict(activation=act, qk_scale=qk_scale, out_scale=0.7, window=window)
    ref = gdpa(q, k, v, qo, ko, impl="reference", **kw)
    tri = gdpa(q, k, v, qo, ko, impl="triton", **kw)
    acts = [act] * h if isinstance(act, str) else act
    exact = loop_reference(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), qo.cpu(), ko.cpu(), acts, qk_scale, 0.7, window)
    # fp32 rounding grows with the magnitude of what is summed: 1e-4 at unit scale, relative beyond
    mag = max(1.0, float(exact.abs().max()) if exact.numel() else 1.0)
    torch.testing.assert_close(ref.detach().cpu().double(), exact, atol=1e-4 * mag, rtol=1e-4)
    torch.testing.assert_close(tri, ref, atol=1e-4 * mag, rtol=1e-4)
    grad_out = torch.randn(ref.shape, generator=g).to(DEVICE)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad_out)
    g_tri = torch.autograd.grad(tri, (q, k, v), grad_out)
    for name, a, b in zip("qkv", g_tri, g_ref):
        gmag = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
        torch.testing.assert_close(a, b, atol=2e-4 * gmag, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("sched,window", [("tiled", None), ("short_kv", None), ("tiled", 2)])
def test_samples_longer_than_the_given_max_len_are_exact(sched, window, monkeypatch):
    """``max_q_len`` / ``max_kv_len`` understated (grid of 1 tile, 16-key block): the kernels
    loop past the grid, so every row is written and every key counted, forward and backward."""
    force_schedule(monkeypatch, sched)
    g = torch.Generator().manual_seed(seed_of(("long", sched, window)))
    qo = offsets([75, 3, 0, 40])
    ko = qo if window is not None else offsets([50, 0, 17, 33])
    h, d = 2, 16
    q = torch.randn(int(qo[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(int(ko[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(int(ko[-1]), h, d, generator=g).to(DEVICE).requires_grad_()
    kw = dict(activation=["silu", "gelu"], qk_scale=0.25, window=window)
    ref = gdpa(q, k, v, qo, ko, impl="reference", **kw)
    tri = gdpa(q, k, v, qo, ko, impl="triton", max_q_len=5, max_kv_len=9, **kw)
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    go = torch.randn(ref.shape, generator=g).to(DEVICE)
    for name, a, b in zip("qkv", torch.autograd.grad(tri, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@triton.jit
def _pid_probe(out_b, out_t, n_tiles):
    pid = tl.program_id(0)
    b, t = tri_mod._split_pid(pid, n_tiles)
    tl.store(out_b + pid, b)
    tl.store(out_t + pid, t)


@pytest.mark.parametrize("batch,n_tiles", [(1, 1), (7, 1), (1, 5), (13, 3), (4, 16)])
def test_sample_and_tile_share_grid_axis_0(batch, n_tiles):
    """``pid = b · n_tiles + tile``: the kernels' split recovers every (sample, tile) once."""
    grid = tri_mod._grid(n_tiles, batch, 3)
    assert grid == (batch * n_tiles, 3)
    out_b = torch.full((grid[0],), -1, dtype=torch.int32, device=DEVICE)
    out_t = torch.full_like(out_b, -1)
    _pid_probe[(grid[0],)](out_b, out_t, n_tiles)
    pairs = sorted(zip(out_b.tolist(), out_t.tolist()))
    assert pairs == [(b, t) for b in range(batch) for t in range(n_tiles)]
    assert out_b.tolist() == [pid // n_tiles for pid in range(grid[0])]


def test_no_launch_puts_the_batch_on_grid_axis_1_or_2(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65,535 (an eval batch is larger): every launch, both
    schedules, forward and backward, has the batch on axis 0 and only heads on axis 1."""
    assert tri_mod._grid(4, 100_000, 8) == (400_000, 8)  # axis 0's limit is 2³¹ − 1
    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.fn.__name__, tuple(grid)))
            return self.kernel[grid]

    for name in ("_gdpa_fwd_kernel", "_gdpa_bwd_dkv_kernel", "_gdpa_bwd_dq_kernel", "_gdpa_short_kv_fwd_kernel", "_gdpa_short_kv_bwd_kernel"):
        monkeypatch.setattr(tri_mod, name, Spy(getattr(tri_mod, name)))
    b, h = 5, 3
    qo = offsets([3, 9, 0, 1, 4])
    x = torch.randn(int(qo[-1]), h, 16, device=DEVICE, requires_grad=True)
    ko = offsets([2] * b)
    kv = torch.randn(2 * b, h, 16, device=DEVICE, requires_grad=True)
    acts = ["silu", "gelu", "silu"]  # two launches per kernel: heads {0, 2} and {1}
    gdpa(x, x, x, qo, qo, activation=acts, window=1, impl="triton", max_q_len=9, max_kv_len=9).sum().backward()
    gdpa(x, kv, kv, qo, ko, activation=acts, impl="triton", max_q_len=9, max_kv_len=2).sum().backward()
    kernels = {k for k, _ in launches}
    assert kernels == {"_gdpa_fwd_kernel", "_gdpa_bwd_dkv_kernel", "_gdpa_bwd_dq_kernel", "_gdpa_short_kv_fwd_kernel", "_gdpa_short_kv_bwd_kernel"}
    for kernel, grid in launches:
        assert len(grid) == 2 and grid[1] in (1, 2), (kernel, grid)  # heads of one activation
        assert grid[0] % b == 0 and grid[0] >= b, (kernel, grid)  # B · n_tiles


def test_tile_configs_depend_on_head_dim_and_schedule():
    """bf16 tiles come from a per-head-dim table; short-KV's key block is the whole K/V."""
    bf16 = torch.bfloat16
    small, big = (tri_mod._launch_config(d, d, bf16, None, "fwd") for d in (32, 128))
    assert (small["BLOCK_D"], big["BLOCK_D"]) == (32, 128)
    assert {k: small[k] for k in ("BLOCK_M", "BLOCK_N")} == {k: tri_mod._TILES[64]["fwd"][k] for k in ("BLOCK_M", "BLOCK_N")}
    assert {k: big[k] for k in ("BLOCK_M", "BLOCK_N")} == {k: tri_mod._TILES[128]["fwd"][k] for k in ("BLOCK_M", "BLOCK_N")}
    assert tri_mod._launch_config(64, 64, bf16, None, "short_kv_bwd", max_kv_len=24)["BLOCK_N"] == 32
    assert tri_mod._launch_config(64, 64, bf16, {"BLOCK_M": 16}, "fwd")["BLOCK_M"] == 16  # tune overrides
    assert tri_mod.schedule(None, 64) == "short_kv" and tri_mod.schedule(None, 65) == "tiled"
    assert tri_mod.schedule(3, 8) == "tiled" and tri_mod.schedule(None, 8, {"schedule": "tiled"}) == "tiled"
    with pytest.raises(ValueError, match="schedule"):
        tri_mod.schedule(3, 8, {"schedule": "short_kv"})


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
    for impl in ("reference", "triton"):  # checked before dispatch: every impl says the same
        with pytest.raises(ValueError, match="window needs equal"):
            gdpa(x, x, x, qo, torch.tensor([0, 1]), window=2, impl=impl)
        with pytest.raises(ValueError, match="window needs equal"):
            gdpa(x, x[:1], x[:1], qo, torch.tensor([0, 1]), window=2, impl=impl)


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


# (input scale, qk_scale, forward tol, gradient tol): scores of magnitude ~0.2 (near-linear
# activations) and ~4 (std of qk_scale·⟨q, k⟩ = 0.35·√128 ≈ 4, where silu/gelu curve).
BF16_REGIMES = {"linear": (0.3, 1 / 16, 1e-2, 2e-2), "nonlinear": (1.0, 0.35, 2e-2, 3e-2)}


@pytest.mark.skipif(not CUDA, reason="bf16 kernels are checked on a GPU")
@pytest.mark.parametrize("regime", list(BF16_REGIMES))
@pytest.mark.parametrize("window,n_kv", [(None, None), (64, None), (None, 32)])  # self-attention; windowed; short-KV PFFN
def test_bf16_on_gpu(window, n_kv, regime):
    scale, qk_scale, tol_fwd, tol_grad = BF16_REGIMES[regime]
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = torch.randint(0, 600, (24,), generator=g, device="cuda")
    qo = torch.cat([torch.zeros(1, dtype=torch.int64, device="cuda"), lens.cumsum(0)])
    ko = qo if n_kv is None else torch.arange(25, device="cuda") * n_kv
    t, tk, h, d = int(qo[-1]), int(ko[-1]), 4, 128
    q = torch.randn(t, h, d, generator=g, device="cuda", dtype=torch.bfloat16) * scale
    k, v = (torch.randn(tk, h, d, generator=g, device="cuda", dtype=torch.bfloat16) * scale for _ in range(2))
    for x in (q, k, v):
        x.requires_grad_()
    kw = dict(activation=["gelu_tanh", "silu", "gelu", "relu"], qk_scale=qk_scale, window=window)
    tri = gdpa(q, k, v, qo, ko, impl="triton", **kw)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = gdpa(qf, kf, vf, qo, ko, impl="reference", **kw)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm().clamp(min=1e-12))  # noqa: E731
    assert rel(tri, ref) < tol_fwd
    go = torch.randn(ref.shape, generator=g, device="cuda")
    for a, b in zip(torch.autograd.grad(tri, (q, k, v), go.bfloat16()), torch.autograd.grad(ref, (qf, kf, vf), go)):
        assert rel(a, b) < tol_grad
