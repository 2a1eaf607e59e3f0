"""Sweep Triton GDPA launch configs (tile sizes, warps, stages) on a GPU; prints the best.

    python benchmarks/gdpa_tune.py [--L 1024] [--kv 256] [--batch 1152] [--head-dim 128] [--heads 4]

The winners become the row of ``model/ops/triton/gdpa.py::_TILES`` for that head-dim bucket
(Dh ≤ 64 or 65–128: tile sizes depend on it). With ``--kv ≤ 64`` and no window it also
times the short-KV schedule (its key block is the whole K/V, so only BLOCK_M, warps and
stages vary). TFLOP/s are model FLOPs: forward ``4·H·Dh·Σ pairs``, backward
``BACKWARD_FLOPS_FACTOR`` × forward (``kunlun.trainer.perf``; in-kernel recompute not counted).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from kunlun.model.flops import band_pairs
from kunlun.model.ops.triton.gdpa import SHORT_KV_MAX_KEYS, gdpa_backward, gdpa_forward
from kunlun.trainer.perf import BACKWARD_FLOPS_FACTOR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1152)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    b, h, d, n_kv = args.batch, args.heads, args.head_dim, args.kv
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
    pairs = float((lengths * n_kv).sum()) if args.window is None else float(band_pairs(lengths.numpy(), args.window).sum())
    flops = 4 * h * d * pairs  # forward: q kᵀ and p v, 2 FLOPs per multiply-add each
    acts = ["gelu_tanh"] * h
    common = (q, k, v, qo, ko, acts, 1.0, 1.0 / max_kv, args.window, args.L, max_kv)
    ref = gdpa_forward(*common, block=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, schedule="tiled"))
    results = {"fwd": [], "bwd": []}
    configs = [
        dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, schedule="tiled")
        for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    ]
    if args.window is None and n_kv <= SHORT_KV_MAX_KEYS:
        configs += [dict(BLOCK_M=bm, num_warps=w, num_stages=s, schedule="short_kv") for bm, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3))]
    for cfg in configs:
        try:
            out = gdpa_forward(*common, block=cfg)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            ms = triton.testing.do_bench(lambda: gdpa_forward(*common, block=cfg), warmup=10, rep=60, return_mode="median")
            results["fwd"].append((flops / ms / 1e9, ms, cfg, err))
            msb = triton.testing.do_bench(lambda: gdpa_backward(do, *common, block=cfg), warmup=10, rep=60, return_mode="median")
            results["bwd"].append((BACKWARD_FLOPS_FACTOR * flops / msb / 1e9, msb, cfg, err))
        except Exception as e:  # out of shared memory / registers for this config
            print("skip", cfg, type(e).__name__, str(e)[:80])
    for kind in ("fwd", "bwd"):
        rows = sorted(results[kind], key=lambda r: -r[0])
        print(f"== {kind}: L={args.L} n_kv={n_kv} window={args.window} H={h} Dh={d}, top 6 of {len(rows)}")
        for tf, ms, cfg, err in rows[:6]:
            print(f"  {tf:7.1f} TFLOP/s {ms:7.3f} ms  {json.dumps(cfg)}  rel_err {err:.1e}")


if __name__ == "__main__":
    main()
