"""GDPA benchmark: Triton kernels vs the eager PyTorch reference vs softmax SDPA.

    python benchmarks/ops_bench.py                 # GPU: production-like shapes, bf16
    python benchmarks/ops_bench.py --device cpu    # CPU: small shapes, ratios only

Needs only torch + triton. Without an install (e.g. a bare GPU box), make the checkout
importable as ``kunlun`` first: ``ln -s $PWD /tmp/pkg/kunlun; export PYTHONPATH=/tmp/pkg``.

Shapes (GPU): jagged Q with max length L in {256, 512, 1024, 2048}, lengths uniform in
[1, L] (~50% fill), dense per-sample K/V of n_kv in {128, 256} (the personalised-FFN shape),
H=4, Dh=128, B=1152 scaled down so the eager reference fits. FLOPs are counted on the jagged
lengths: forward 4·H·Dh·Σ_b Lq_b·Lkv_b, backward 2.5× forward. SDPA (FlashAttention,
softmax) runs on the padded [B, H, L, Dh] queries — the work a dense kernel must do —
and is reported by time (and by its own padded FLOP/s). ``compiled`` is
``torch.compile`` (Inductor) of the eager reference (the CPU default set is reference,
compiled, sdpa: Triton on CPU only runs interpreted). Every row has its speedup over the
eager reference measured in the same run. Peak memory is the CUDA
allocator's peak during the timed call.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

from kunlun.model.ops import gdpa
from kunlun.model.ops.pytorch.gdpa import jagged_to_padded

H100_BF16_DENSE_TFLOPS = 989.0  # SXM datasheet, dense


def bench_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
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
                    fwdbwd_tflops=3.5 * flops / ms_fb / 1e9,
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lens", default=None, help="comma separated max Q lengths")
    ap.add_argument("--kv", default=None, help="comma separated n_kv")
    ap.add_argument("--impls", default=None)
    ap.add_argument("--act", default="gelu_tanh")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
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
