"""Dense-tower training-step throughput and MFU, with a torch.profiler breakdown.

    python benchmarks/train_bench.py --tower kunlun            # GPU: bf16, production-like shapes
    python benchmarks/train_bench.py --device cpu --tower kunlun --batch 64   # CPU: ratios only
    python benchmarks/train_bench.py --e2e --nproc 2     # whole trainer, every tower, CPU/gloo

The tower is fed synthetic *embedded* inputs (pooled context embeddings, jagged event
embeddings, timestamps), so it runs where TorchRec is not installed; embedding lookups
and data loading are therefore not in these numbers (the end-to-end trainer logs
``perf/mfu`` with them). One step = forward + backward + AdamW. MFU = 3 × analytic forward
FLOPs/example × examples/s ÷ peak (datasheet bf16 dense peak on known GPUs; on CPU a
matmul probe measured in the same run). A Chrome/Perfetto trace goes to ``--trace``.

``--e2e`` instead trains every tower through the real trainer (torchrun, TorchRec
sharded embeddings, the synthetic scaling data of ``configs/scaling.yaml``) at matched
forward FLOPs per example (``--target-mflops``; each tower's width is searched for the
closest match), profiles a window of steps with ``logging.profile`` and reports
examples/s, MFU against a matmul probe of the same dtype and thread count measured in the
same run, and the share of step time outside dense model compute (data, embedding
lookup, optimizer, communication, other). Traces land in ``<out>/<tower>/profile/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.model.config import ModelConfig
from kunlun.model.flops import LengthStats
from kunlun.model.towers import build_tower
from kunlun.model.towers.base import EventSequence, TowerInputs
from kunlun.trainer.perf import TRAIN_FLOPS_FACTOR, gpu_peak_tflops, matmul_probe_tflops


def make_schema(n_ctx: int, n_dense: int, events: dict) -> FeatureSchema:
    return FeatureSchema(
        tables=[TableSpec("t", 1000), TableSpec("item", 1000), TableSpec("act", 10)],
        dense_features=[f"d{i}" for i in range(n_dense)],
        context_features=[ContextFeature(f"c{i}", "t") for i in range(n_ctx)],
        event_types=[EventType(name, "item", "act", max_len) for name, max_len in events.items()],
    )


def make_inputs(schema, b: int, emb: int, device, dtype, fill: float, seed: int = 0) -> TowerInputs:
    g = torch.Generator().manual_seed(seed)
    events = {}
    for e in schema.event_types:
        lengths = torch.randint(1, int(2 * fill * e.max_len) + 1, (b,), generator=g).clamp(max=e.max_len)
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        t = int(off[-1])
        ts = torch.arange(t) * 60
        events[e.name] = EventSequence(
            item=torch.randn(t, emb, generator=g).to(device, dtype),
            action=torch.randn(t, emb, generator=g).to(device, dtype),
            timestamps=ts.to(device),
            lengths=lengths.to(device),
            offsets=off.to(device),
        )
    return TowerInputs(
        dense=torch.randn(b, schema.num_dense, generator=g).to(device, dtype),
        context={k: torch.randn(b, emb, generator=g).to(device, dtype) for k in schema.context_keys},
        events=events,
        request_time=torch.full((b,), 10**9).to(device),
    )


def matched_width(tower: str, target_flops: float) -> int:
    """Width whose forward FLOPs/example is closest to ``target_flops`` (FLOPs grow with w)."""
    import scaling

    # Widths in steps of 4 (2 heads on the width and on half of it must divide evenly).
    lo, hi = 1, 128
    while hi - lo > 1:  # smallest k with F(4k) >= target, then the closer of 4k and 4(k - 1)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if scaling.planned_flops(tower, 4 * mid)["forward_flops"] < target_flops else (lo, mid)
    f_lo, f_hi = (scaling.planned_flops(tower, 4 * k)["forward_flops"] for k in (lo, hi))
    return 4 * (lo if abs(math.log(f_lo / target_flops)) < abs(math.log(f_hi / target_flops)) else hi)


def e2e(args) -> None:
    import scaling

    out = Path(args.out or "runs/train_bench").resolve()
    torch.set_num_threads(1)  # the probe runs like one rank of the job (OMP_NUM_THREADS=1)
    probe = matmul_probe_tflops(torch.device("cpu"), torch.float32, n=512, repeats=9)
    warm, prof_steps = 15, 10
    rows = []
    runs = [(t, p) for t in args.towers.split(",") for p in args.pipelines.split(",")]
    for tower, pipeline in runs:
        w = matched_width(tower, args.target_mflops * 1e6)
        run_dir = out / tower if args.pipelines == "none" else out / f"{tower}-{pipeline}"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "kunlun.launch.main",
            "--config",
            "scaling",
            f"run_dir={run_dir}",
            "checkpoint.resume=never",
            f"model.tower={tower}",
            *scaling.tower_overrides(tower, w),
            f"trainer.max_steps={warm + prof_steps + 5}",
            f"logging.profile.start_step={warm}",
            f"logging.profile.num_steps={prof_steps}",
            "data.synthetic.eval_examples=2048",
            "data.synthetic.test_examples=2048",
            "checkpoint.every_n_steps=0",
            f"trainer.pipeline={pipeline}",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=scaling.REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{tower}: training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        m = json.loads((run_dir / "final_metrics.json").read_text())
        prof = json.loads((run_dir / "profile" / "summary_rank0.json").read_text())
        # Throughput of the profiled steps (after warm-up; includes the profiler's own
        # overhead, so a slight underestimate): a 25-step run's average would be dominated
        # by the first steps' one-off costs.
        global_batch = m["train/examples_consumed"] / m["train/step"]
        ex_s = global_batch / (prof["step_ms"] / 1e3)
        model_tflops = TRAIN_FLOPS_FACTOR * m["perf/forward_flops_per_example"] * ex_s / 1e12
        rows.append(
            dict(
                tower=tower,
                pipeline=pipeline,
                width=w,
                mflops_per_example_fwd=m["perf/forward_flops_per_example"] / 1e6,
                dense_params=int(m["model/dense_params"]),
                examples_per_sec=ex_s,
                examples_per_sec_whole_run=m["perf/examples_per_sec"],
                model_gflops=model_tflops * 1e3,
                mfu_vs_probe=model_tflops / (probe * args.nproc),
                step_ms=prof["step_ms"],
                outside_dense_compute=prof["outside_dense_compute_share"],
                shares=prof["host_share"],
                trace=str(run_dir / "profile" / "trace_rank0.json"),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_bench_e2e.json").write_text(json.dumps({"probe_tflops_per_rank": probe, "nproc": args.nproc, "rows": rows}, indent=1))
    print(f"\nmatmul probe (fp32, 1 thread, 512³): {probe * 1e3:.1f} GFLOP/s per rank; {args.nproc} ranks")
    print(
        "| tower | pipeline | width | fwd MFLOPs/ex | dense params | examples/s | model GFLOP/s | MFU vs probe | step ms | outside dense compute | data | embedding | optimizer | communication | other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sh = r["shares"]
        print(
            f"| {r['tower']} | {r['pipeline']} | {r['width']} | {r['mflops_per_example_fwd']:.3f} | {r['dense_params']:,} | {r['examples_per_sec']:.0f} | {r['model_gflops']:.2f} | "
            f"{100 * r['mfu_vs_probe']:.1f}% | {r['step_ms']:.1f} | {100 * r['outside_dense_compute']:.0f}% | "
            + " | ".join(f"{100 * sh[c]:.0f}%" for c in ("data", "embedding", "optimizer", "communication", "other"))
            + " |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", action="store_true", help="whole trainer at matched FLOPs per example (see the module docstring)")
    ap.add_argument("--towers", default="kunlun,interformer,hstu,wukong,dcnv2,dlrm", help="--e2e: towers to run")
    ap.add_argument("--target-mflops", type=float, default=1.0, help="--e2e: forward MFLOPs/example every tower is sized to")
    ap.add_argument("--nproc", type=int, default=2, help="--e2e: ranks (torchrun, gloo on CPU)")
    ap.add_argument("--pipelines", default="none", help="--e2e: trainer.pipeline values to run for every tower, e.g. none,sparse_dist,semi_sync")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="tower compute: bf16 = autocast, fp32 weights (auto: bf16 on GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the tower (dynamic=True), as model.compile=true")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--out", default="", help="--e2e: run folder (default runs/train_bench)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tower", default="kunlun")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None, help="max history length per event type")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trace", default=os.environ.get("OUT", ""))
    ap.add_argument("--set", nargs="*", default=[], help="model config overrides: kunlun.dim=256 ...")
    args = ap.parse_args()
    if args.e2e:
        return e2e(args)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    precision = args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32")
    # As the trainer runs it (trainer.precision): fp32 weights, inputs and optimizer state;
    # bf16 = the tower's compute under autocast.
    dtype = torch.float32
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b = args.batch or (1152 if gpu else 64)
    seq = args.seq or (1024 if gpu else 32)
    cfg = ModelConfig(tower=args.tower, embedding_dim=128 if gpu else 16)
    k = cfg.kunlun
    if gpu:  # production-like (docs/architecture.md §9 defaults, GDPA PFFN with m = 128)
        k.dim, k.num_layers, k.num_summary_tokens, k.pffn_kv_len, k.kv_rank, k.hsp_rank = 256, 3, 8, 128, 256, 8
        k.wukong_mlp, k.head_mlp = 512, [512, 256]
        k.default_event.dim, k.default_event.heads, k.default_event.layers = 512, 4, 3
        k.default_event.window, k.default_event.num_tokens, k.default_event.num_seeds = 64, 16, 64
    for item in args.set:
        key, value = item.split("=", 1)
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        old = getattr(obj, last)
        setattr(obj, last, value.lower() in ("1", "true", "yes") if isinstance(old, bool) else type(old)(value))
    schema = make_schema(n_ctx=16, n_dense=8, events={"click": seq, "impression": seq})
    tower = build_tower(schema, cfg, num_labels=1).to(dev, dtype)
    if args.compile:
        tower.compile(dynamic=True, backend=args.compile_backend)
    inputs = make_inputs(schema, b, cfg.embedding_dim, dev, dtype, fill=0.5)
    avg = {n: LengthStats(e.lengths.cpu().numpy()) for n, e in inputs.events.items()}  # E[L] and E[L²] for the FLOPs
    flops_ex = tower.flops_per_example(avg)
    labels = torch.randint(0, 2, (b, 1), device=dev).to(dtype)
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = tower(inputs)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    ex_s = b / dt
    model_tflops = TRAIN_FLOPS_FACTOR * flops_ex * ex_s / 1e12
    probe = matmul_probe_tflops(dev, compute_dtype, n=8192 if gpu else 512)
    peak = (gpu_peak_tflops(dev, compute_dtype) if gpu else None) or probe
    result = dict(
        device=torch.cuda.get_device_name() if gpu else "cpu",
        tower=args.tower,
        precision=precision,
        compiled=bool(args.compile),
        batch=b,
        max_seq=seq,
        mean_seq=avg,
        gflops_per_example_fwd=flops_ex / 1e9,
        step_ms=dt * 1e3,
        examples_per_sec=ex_s,
        model_tflops=model_tflops,
        peak_tflops=peak,
        matmul_probe_tflops=probe,
        mfu=model_tflops / peak,
        mfu_vs_probe=model_tflops / probe,
        params=sum(p.numel() for p in tower.parameters()),
    )
    print(json.dumps(result, indent=1))
    # Where the time goes: top ops by device (or CPU) time over 3 profiled steps.
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if gpu:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if gpu else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"trace_{args.tower}.json"))
        (Path(args.trace) / f"train_bench_{args.tower}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
