"""Exported model on CPU: size by embedding dtype, score latency at batch 1 and 256, and what
fp16 / int8 tables cost in test AUC; the tower as an exported program and as an
AOTInductor package.

    .venv/bin/python benchmarks/export_bench.py [--run-dir runs/export_bench/run] [--out runs/export_bench]
                                                [--train-steps 300] [--iters 300] [--threads 1]

Trains the MovieLens preset (``configs/movielens.yaml``, Kunlun tower, ``--train-steps``
steps, one process) unless ``--run-dir`` already holds a checkpoint, exports its best
checkpoint with ``kunlun export`` for each of fp32 / fp16 / int8 tables and fp32 with
``--aoti`` (served by the AOTInductor package), and for each export:

* size: the whole folder and ``tables.pt``;
* latency of ``ServingModel.score`` (lookups + the exported tower + sigmoid) on test rows,
  ``--iters`` calls per batch size after 20 warm-up calls, p50 and p99 in milliseconds, with
  ``torch.set_num_threads(--threads)``; input blocks are read beforehand (decoding is not in
  the time: MovieLens rows are already ids);
* quality on the whole test split: AUC, and max |Δp| and ΔAUC against the fp32 export.

Writes ``--out/results.json`` and prints the Markdown table that goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DTYPES = ("fp32", "fp16", "int8")
VARIANTS = {"fp32": ["--embedding-dtype", "fp32"], "fp16": ["--embedding-dtype", "fp16"], "int8": ["--embedding-dtype", "int8"], "fp32+aoti": ["--aoti"]}


def run(cmd, **kw) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def latency_ms(model, block, iters: int) -> dict:
    for _ in range(20):
        model.score(block)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.score(block)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/export_bench")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else out / "run"
    if not (run_dir / "checkpoints" / "best.json").is_file():
        run(
            [str(BIN / "kunlun"), "train", "--config", "movielens", f"run_dir={run_dir}", f"trainer.max_steps={args.train_steps}", "logging.progress_bar=false"]
        )
    for name, flags in VARIANTS.items():
        folder = out / f"export-{name}"
        run([str(BIN / "kunlun"), "export", "--run-dir", str(run_dir), "--checkpoint", "best", "--out", str(folder), *flags, "--overwrite"])

    import torch

    from kunlun.data.sources import build_source
    from kunlun.serving import load
    from kunlun.trainer.config import load_config
    from kunlun.trainer.metrics import auc

    torch.set_num_threads(args.threads)
    cfg = load_config(str(run_dir / "config.yaml"), [])
    source = build_source(cfg.data, cfg.seed)
    n_test = source.num_examples("test")
    test = source.read("test", np.arange(n_test))
    labels = torch.as_tensor(np.asarray(test.labels).reshape(-1))
    blocks = {1: source.read("test", np.arange(1)), 256: source.read("test", np.arange(256))}
    results = {"run_dir": str(run_dir), "threads": args.threads, "iters": args.iters, "test_examples": n_test, "exports": {}}
    ref = None
    for dtype in VARIANTS:
        folder = out / f"export-{dtype}"
        model = load(folder)
        scores = model.score(test, batch_size=1024).double().reshape(-1)
        ref = scores if ref is None else ref
        entry = {
            "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
            "tables_bytes": (folder / "tables.pt").stat().st_size,
            "test_auc": auc(scores, labels),
            "max_abs_dp_vs_fp32": float((scores - ref).abs().max()),
            "latency_ms": {str(b): latency_ms(model, blk, args.iters) for b, blk in blocks.items()},
        }
        entry["d_auc_vs_fp32"] = entry["test_auc"] - results["exports"].get("fp32", entry)["test_auc"]
        results["exports"][dtype] = entry
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"MovieLens-100K, Kunlun tower, {n_test} test examples; CPU, {args.threads} thread(s), {args.iters} calls per batch size\n")
    print("| export | export size | tables.pt | p50 / p99 batch 1 (ms) | p50 / p99 batch 256 (ms) | test AUC | ΔAUC vs fp32 | max abs Δp vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, e in results["exports"].items():
        l1, l256 = e["latency_ms"]["1"], e["latency_ms"]["256"]
        print(
            f"| {dtype} | {e['bytes'] / 1e6:.2f} MB | {e['tables_bytes'] / 1e6:.2f} MB | {l1['p50']:.2f} / {l1['p99']:.2f} "
            f"| {l256['p50']:.2f} / {l256['p99']:.2f} | {e['test_auc']:.5f} | {e['d_auc_vs_fp32']:+.5f} | {e['max_abs_dp_vs_fp32']:.2g} |"
        )


if __name__ == "__main__":
    main()
