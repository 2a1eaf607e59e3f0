"""Sweep Triton GDPA launch configs (tile sizes, warps, stages) on a GPU; prints the best.

    python benchmarks/gdpa_tune.py [--L 1024] [--kv 256] [--batch 1152]

The winners become the defaults in ``model/ops/triton/gdpa.py::_launch_config``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from kunlun.model.ops.triton.gdpa import gdpa_backward, gdpa_forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1152)
    ap.add_argument("--window", type=int, default=None)
    args = ap.parse_args()
    b, h, d, n_kv = args.batch, 4, 128, args.kv
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.L + 1, (b,), generator=g)
    qo = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).cuda()
    if args.window is None:
        ko = (torch.arange(b + 1, dtype=torch.int64) * n_kv).cuda()
        tk, max_kv = b * n_kv, n_kv
    else:
        ko, tk, max_kv = qo, int(qo[-1]), args.L
    tq = int(qo[-1])
    q = (torch.randn(tq, h, d) * 0.5).cuda().bfloat16()
    k = (torch.randn(tk, h, d) / d**0.5).cuda().bfloat16()
    v = torch.randn(tk, h, d).cuda().bfloat16()
    do = torch.randn(tq, h, d).cuda().bfloat16()
    flops = (
        4
        * h
        * d
        * (float((lengths * n_kv).sum()) if args.window is None else float((lengths.float() * torch.clamp(lengths.float(), max=2 * args.window + 1)).sum()))
    )
    acts = ["gelu_tanh"] * h
    common = (q, k, v, qo, ko, acts, 1.0, 1.0 / max_kv, args.window, args.L, max_kv)
    ref = gdpa_forward(*common, block=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))
    results = {"fwd": [], "bwd": []}
    for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        try:
            out = gdpa_forward(*common, block=cfg)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            ms = triton.testing.do_bench(lambda: gdpa_forward(*common, block=cfg), warmup=10, rep=60, return_mode="median")
            results["fwd"].append((flops / ms / 1e9, ms, cfg, err))
            msb = triton.testing.do_bench(lambda: gdpa_backward(do, *common, block=cfg), warmup=10, rep=60, return_mode="median")
            results["bwd"].append((2.5 * flops / msb / 1e9, msb, cfg, err))
        except Exception as e:  # out of shared memory / registers for this config
            print("skip", cfg, type(e).__name__, str(e)[:80])
    for kind in ("fwd", "bwd"):
        rows = sorted(results[kind], key=lambda r: -r[0])
        print(f"== {kind}: L={args.L} n_kv={n_kv} window={args.window}, top 6 of {len(rows)}")
        for tf, ms, cfg, err in rows[:6]:
            print(f"  {tf:7.1f} TFLOP/s {ms:7.3f} ms  {json.dumps(cfg)}  rel_err {err:.1e}")


if __name__ == "__main__":
    main()
