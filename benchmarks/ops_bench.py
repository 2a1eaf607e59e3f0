"""GDPA benchmark: Triton kernels vs the eager PyTorch reference vs softmax SDPA.

    python benchmarks/ops_bench.py                 # GPU: production-like shapes, bf16
    python benchmarks/ops_bench.py --device cpu    # CPU: small shapes, ratios only

Needs only torch + triton. Without an install (e.g. a bare GPU box), make the checkout
importable as ``kunlun`` first: ``ln -s $PWD /tmp/pkg/kunlun; export PYTHONPATH=/tmp/pkg``.

Shapes (GPU): jagged Q with max length L in {256, 512, 1024, 2048}, lengths uniform in
[1, L] (~50% fill), dense per-sample K/V of n_kv in {128, 256} (the personalised-FFN shape),
H=4, Dh=128, B=1152 scaled down so the eager reference fits. FLOPs are counted on the jagged
lengths: forward 4·H·Dh·Σ_b Lq_b·Lkv_b, backward 2× forward (``kunlun.trainer.perf``'s one
convention: the kernels' recomputation of Q·Kᵀ in backward is hardware work, not model work). SDPA (FlashAttention,
softmax) runs on the padded [B, H, L, Dh] queries — the work a dense kernel must do —
and is reported by time (and by its own padded FLOP/s). ``compiled`` is
``torch.compile`` (Inductor) of the eager reference (the CPU default set is reference,
compiled, sdpa: Triton on CPU only runs interpreted). Every row has its speedup over the
eager reference measured in the same run. Peak memory is the CUDA
allocator's peak during the timed call.

``--op jagged_attention``: softmax self-attention on jagged sequences instead
(``kunlun.model.ops.jagged_attention``), full vs windowed (``--window w``, ``|i − j| ≤ w``)
vs SDPA on the padded ``[B, H, L, Dh]`` tensors (``sdpa``: no mask, the dense work;
``sdpa_win``: the same with a boolean band + padding mask), forward and forward+backward::

    python benchmarks/ops_bench.py --op jagged_attention --device cpu --lens 256 --window 8

Lengths uniform in [1, L]. CPU defaults: fp32, H=2, Dh=32, B=8, impls ``reference,sdpa``;
GPU: bf16, H=4, Dh=128, B=256, impls ``triton,reference,sdpa``. On CPU the rows are timed
round-robin (``--reps`` rounds, one call of each row per round, so load from other processes
hits all rows alike) and ``fwd ms`` / ``f+b ms`` are the minimum, the median beside them;
on GPU both are ``triton.testing.do_bench`` medians. It prints each row and the
full/windowed time ratio per impl.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

from kunlun.model.ops import gdpa, jagged_attention
from kunlun.model.ops.pytorch.gdpa import jagged_to_padded
from kunlun.trainer.perf import TRAIN_FLOPS_FACTOR

H100_BF16_DENSE_TFLOPS = 989.0  # SXM datasheet, dense


def bench_ms(fn, device: str, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` (CPU: ``reps`` timed calls after one warm-up)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mem_gb(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_case(b, max_len, n_kv, h, d, dtype, device, impls, act, tune=None):
    g = torch.Generator(device="cpu").manual_seed(max_len * 7 + n_kv)
    lengths = torch.randint(1, max_len + 1, (b,), generator=g)
    qo = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    ko = (torch.arange(b + 1, dtype=torch.int64) * n_kv).to(device)
    tq = int(qo[-1])
    q = (torch.randn(tq, h, d, generator=g) * 0.5).to(device, dtype).requires_grad_()
    k = (torch.randn(b * n_kv, h, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    v = torch.randn(b * n_kv, h, d, generator=g).to(device, dtype).requires_grad_()
    flops_fwd = 4 * h * d * float((lengths * n_kv).sum())
    rows = []
    kw = dict(activation=act, qk_scale=1.0, out_scale=1.0 / n_kv, max_q_len=max_len, max_kv_len=n_kv)
    results = {}
    for impl in impls:
        try:
            if impl == "sdpa":
                qp = jagged_to_padded(q.detach(), qo, max_len).transpose(1, 2).contiguous().requires_grad_()
                kp = k.detach().view(b, n_kv, h, d).transpose(1, 2).contiguous().requires_grad_()
                vp = v.detach().view(b, n_kv, h, d).transpose(1, 2).contiguous().requires_grad_()
                fwd = lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp)  # noqa: E731
                out = fwd()
                go = torch.randn_like(out)
                fb = lambda: torch.autograd.grad(fwd(), (qp, kp, vp), go)  # noqa: E731
                flops = 4 * h * d * float(b * max_len * n_kv)
            elif impl == "compiled":  # torch.compile (Inductor) of the eager reference
                compiled = torch.compile(functools.partial(gdpa, impl="reference", **kw), dynamic=False)
                fwd = lambda: compiled(q, k, v, qo, ko)  # noqa: E731
                out = fwd()
                results[impl] = out.detach()
                go = torch.randn_like(out)
                fb = lambda: torch.autograd.grad(fwd(), (q, k, v), go)  # noqa: E731
                flops = flops_fwd
            else:
                fwd = lambda: gdpa(q, k, v, qo, ko, impl=impl, **kw)  # noqa: E731
                out = fwd()
                results[impl] = out.detach()
                go = torch.randn_like(out)
                fb = lambda: torch.autograd.grad(fwd(), (q, k, v), go)  # noqa: E731
                flops = flops_fwd
            with torch.no_grad():
                ms_f = bench_ms(fwd, device)
                mem_f = peak_mem_gb(fwd, device)
            ms_fb = bench_ms(fb, device)
            mem_fb = peak_mem_gb(fb, device)
            rows.append(
                dict(
                    impl=impl,
                    L=max_len,
                    n_kv=n_kv,
                    B=b,
                    fwd_ms=ms_f,
                    fwdbwd_ms=ms_fb,
                    fwd_tflops=flops / ms_f / 1e9,
                    fwdbwd_tflops=TRAIN_FLOPS_FACTOR * flops / ms_fb / 1e9,
                    fwd_mem_gb=mem_f,
                    fwdbwd_mem_gb=mem_fb,
                    sum_lq=tq,
                )
            )
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(impl=impl, L=max_len, n_kv=n_kv, B=b, error="OOM"))
            torch.cuda.empty_cache()
        out = fb = fwd = None
    if "reference" in results:
        ref = results["reference"].float()
        for r in rows:
            if r["impl"] in results:
                r["rel_err_vs_ref"] = float((results[r["impl"]].float() - ref).norm() / ref.norm())
        ref_rows = [r for r in rows if r["impl"] == "reference" and "fwd_ms" in r]
        for r in rows:  # speedup over the eager reference, measured in this run
            if ref_rows and "fwd_ms" in r:
                r["fwd_speedup_vs_ref"] = ref_rows[0]["fwd_ms"] / r["fwd_ms"]
                r["fwdbwd_speedup_vs_ref"] = ref_rows[0]["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


def cpu_interleaved_ms(fns, reps: int = 25):
    """``[(min, median) ms]`` per callable, timed round-robin (one call of each per round), so
    load from other processes on a shared CPU hits every row alike; min is the least noisy."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [(min(t), sorted(t)[len(t) // 2]) for t in times]


def run_attention_case(b, max_len, window, h, d, dtype, device, impls, reps=25):
    """Jagged softmax self-attention rows: each impl full and windowed, and padded SDPA."""
    g = torch.Generator(device="cpu").manual_seed(max_len * 7 + window)
    lengths = torch.randint(1, max_len + 1, (b,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    t = int(offs[-1])
    q, k, v = ((torch.randn(t, h, d, generator=g) * 0.5).to(device, dtype).requires_grad_() for _ in range(3))
    pos = torch.arange(max_len)
    band = ((pos[:, None] - pos[None, :]).abs() <= window).long()
    pairs_full = float((lengths.double() ** 2).sum())
    pairs_win = float(sum(band[:n, :n].sum() for n in lengths.tolist()))
    cases = []  # (name, window, fwd, fwd+bwd, flops)
    for impl in impls:
        for w in (None, window):
            if impl == "sdpa":
                qp, kp, vp = (jagged_to_padded(x.detach(), offs, max_len).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                mask = None
                if w is not None:  # band and key padding, [B, 1, L, L] boolean
                    keep = (pos[None, :] < lengths[:, None]).to(device)
                    mask = (band.bool().to(device)[None] & keep[:, None, :])[:, None]
                fwd = functools.partial(torch.nn.functional.scaled_dot_product_attention, qp, kp, vp, attn_mask=mask)
                inputs, pairs = (qp, kp, vp), b * max_len * max_len
            else:
                fwd = functools.partial(jagged_attention, q, k, v, offs, offs, window=w, impl=impl, max_q_len=max_len, max_kv_len=max_len)
                inputs, pairs = (q, k, v), (pairs_full if w is None else pairs_win)
            go = torch.randn_like(fwd())
            fb = functools.partial(lambda f, x, go: torch.autograd.grad(f(), x, go), fwd, inputs, go)
            no_grad_fwd = functools.partial(lambda f: torch.no_grad()(f)(), fwd)
            cases.append((impl if w is None else f"{impl}_win", w, no_grad_fwd, fb, 4 * h * d * pairs))
    if device == "cuda":
        timed = [((bench_ms(f, device),) * 2, (bench_ms(fb, device),) * 2) for _, _, f, fb, _ in cases]
    else:
        ms = cpu_interleaved_ms([fn for c in cases for fn in c[2:4]], reps)
        timed = [(ms[2 * i], ms[2 * i + 1]) for i in range(len(cases))]
    rows = []
    for (name, w, _, fb, flops), ((f_min, f_med), (fb_min, fb_med)) in zip(cases, timed):
        rows.append(
            dict(
                impl=name,
                L=max_len,
                window=w,
                B=b,
                fwd_ms=f_min,
                fwdbwd_ms=fb_min,
                fwd_median_ms=f_med,
                fwdbwd_median_ms=fb_med,
                fwd_tflops=flops / f_min / 1e9,
                fwdbwd_tflops=TRAIN_FLOPS_FACTOR * flops / fb_min / 1e9,
                fwdbwd_mem_gb=peak_mem_gb(fb, device),
                sum_l=t,
            )
        )
    return rows


def attention_main(args) -> None:
    dev = args.device
    if dev == "cuda":
        dtype, h, d = torch.bfloat16, 4, 128
        lens = [int(x) for x in (args.lens or "256,512,1024,2048").split(",")]
        impls = (args.impls or "triton,reference,sdpa").split(",")
        batch = args.batch or 256
    else:
        dtype, h, d = torch.float32, 2, 32
        lens = [int(x) for x in (args.lens or "256").split(",")]
        impls = (args.impls or "reference,sdpa").split(",")
        batch = args.batch or 8
    w = args.window
    print(f"jagged_attention | device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} | dtype {dtype} | H={h} Dh={d} B={batch} w={w}", flush=True)
    rows = []
    for L in lens:
        rows += run_attention_case(batch, L, w, h, d, dtype, dev, impls, args.reps)
    print(f"{'impl':<16}{'L':>6}{'window':>8}{'fwd ms':>10}{'f+b ms':>10}{'med f/fb':>16}{'fwd TF/s':>10}{'f+b TF/s':>10}{'mem GB fb':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16}{r['L']:>6}{str(r['window']):>8}  {r['error']}")
            continue
        print(
            f"{r['impl']:<16}{r['L']:>6}{str(r['window']):>8}{r['fwd_ms']:>10.3f}{r['fwdbwd_ms']:>10.3f}"
            f"{r['fwd_median_ms']:>8.3f}/{r['fwdbwd_median_ms']:<7.3f}{r['fwd_tflops']:>10.3f}{r['fwdbwd_tflops']:>10.3f}{r['fwdbwd_mem_gb']:>11.2f}"
        )
    by = {(r["impl"], r["L"]): r for r in rows if "fwd_ms" in r}
    for impl in impls:
        for L in lens:
            full, win = by.get((impl, L)), by.get((f"{impl}_win", L))
            if full and win:
                print(f"{impl} L={L}: full/windowed(w={w}) fwd {full['fwd_ms'] / win['fwd_ms']:.2f}x, fwd+bwd {full['fwdbwd_ms'] / win['fwdbwd_ms']:.2f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ops_bench_jagged_attention.json").write_text(json.dumps({"rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("gdpa", "jagged_attention"), default="gdpa")
    ap.add_argument("--window", type=int, default=8, help="jagged_attention: window w of the windowed rows")
    ap.add_argument("--reps", type=int, default=25, help="jagged_attention on CPU: timing rounds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lens", default=None, help="comma separated max Q lengths")
    ap.add_argument("--kv", default=None, help="comma separated n_kv")
    ap.add_argument("--impls", default=None)
    ap.add_argument("--act", default="gelu_tanh")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    if args.op == "jagged_attention":
        return attention_main(args)
    dev = args.device
    if dev == "cuda":
        dtype, h, d = torch.bfloat16, 4, 128
        lens = [int(x) for x in (args.lens or "256,512,1024,2048").split(",")]
        kvs = [int(x) for x in (args.kv or "128,256").split(",")]
        impls = (args.impls or "triton,reference,sdpa").split(",")
        batch = args.batch or 1152
    else:
        dtype, h, d = torch.float32, 2, 32
        lens = [int(x) for x in (args.lens or "64,128").split(",")]
        kvs = [int(x) for x in (args.kv or "32").split(",")]
        impls = (args.impls or "reference,compiled,sdpa").split(",")
        batch = args.batch or 16
    peak = matmul_tflops(dev, dtype)
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} | dtype {dtype} | matmul probe {peak:.1f} TFLOP/s", flush=True)
    rows = []
    for n_kv in kvs:
        for L in lens:
            rows += run_case(batch, L, n_kv, h, d, dtype, dev, impls, args.act)
            r = rows[-len(impls) :]
            print(json.dumps(r), flush=True)
    hdr = f"{'impl':<10}{'L':>6}{'n_kv':>6}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}{'mem GB f/fb':>14}{'fwd %peak':>10}{'rel err':>9}{'x ref f/fb':>12}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<10}{r['L']:>6}{r['n_kv']:>6}  {r['error']}")
            continue
        print(
            f"{r['impl']:<10}{r['L']:>6}{r['n_kv']:>6}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>10.1f}{r['fwdbwd_ms']:>9.3f}"
            f"{r['fwdbwd_tflops']:>10.1f}{r['fwd_mem_gb']:>7.2f}/{r['fwdbwd_mem_gb']:<6.2f}{100 * r['fwd_tflops'] / (H100_BF16_DENSE_TFLOPS if dev == 'cuda' else peak):>10.1f}"
            f"{r.get('rel_err_vs_ref', float('nan')):>9.1e}{r.get('fwd_speedup_vs_ref', float('nan')):>6.2f}/{r.get('fwdbwd_speedup_vs_ref', float('nan')):<5.2f}"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ops_bench.json").write_text(json.dumps({"matmul_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
