"""2D replica sync: throughput of 1D vs 2D full vs 2D touched, and NE against the sync period.

    .venv/bin/python benchmarks/sync_bench.py throughput [--rounds 2] [--out runs/sync_bench]
    .venv/bin/python benchmarks/sync_bench.py period [--seeds 0,1] [--out runs/sync_bench]
    .venv/bin/python benchmarks/sync_bench.py report [--out runs/sync_bench]

Every job is a real 4-rank ``torchrun`` of ``kunlun.launch.main`` on CPU/gloo (2D: sharding
groups of 2, M = 2 replica groups); results are read from each run's ``final_metrics.json``
and kept in ``--out/results.jsonl`` (finished runs are skipped on a rerun, so both sweeps
resume). ``report`` prints the Markdown tables that go into BENCHMARKS.md.

``throughput``: the job of issue #18 (tiny preset with 200k users, 100k items, dim 64,
batch 256, 300 steps, 200k training examples; test NE at the last step) in 1D, 2D with a full sync every step and 2D with a touched-rows
sync every step. The three run back to back in each round and ratios are taken within a
round (this machine is shared and noisy).

``period``: test NE after a fixed number of examples (256 steps of 256) for sync periods
1, 4, 16, 64, 256, averaging replicas with and without momentum scaling and summing their
changes (``sync_reduce=sum_delta``, no scaling), against 1D, on the synthetic rich
signal (``configs/scaling.yaml``, DLRM tower) and MovieLens-100K (``configs/movielens.yaml``,
DLRM tower, one fixed-length run, no early stopping).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TWO_D = ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2"]
QUIET = ["logging.progress_bar=false", "checkpoint.every_n_steps=0", "checkpoint.resume=never"]

THROUGHPUT_JOB = [
    "data.synthetic.num_users=200000",
    "data.synthetic.num_items=100000",
    "model.embedding_dim=64",
    "data.batch_size=256",
    "trainer.max_steps=300",
    # 0.38 epochs: the tiny preset's 20,000 training examples would be seen ~4 times at this
    # batch and the 200k-user tables overfit (test NE > 2), which says nothing about the sync
    "data.synthetic.train_examples=200000",
    "trainer.eval_every_n_steps=0",
    "checkpoint.keep_best=false",
    "logging.log_every_n_steps=50",
]
THROUGHPUT_VARIANTS: Dict[str, List[str]] = {
    "1d": ["parallel.sparse.strategy=1d"],
    "2d_full": [*TWO_D, "parallel.sparse.sync=full", "parallel.sparse.sync_every_n_steps=1"],
    "2d_touched": [*TWO_D, "parallel.sparse.sync=touched", "parallel.sparse.sync_every_n_steps=1"],
    # the summed replica changes; momentum scaling off (it corrects the average's 1/M, gone here)
    "2d_touched_sum": [
        *TWO_D,
        "parallel.sparse.sync=touched",
        "parallel.sparse.sync_reduce=sum_delta",
        "parallel.sparse.momentum_scaling=false",
        "parallel.sparse.sync_every_n_steps=1",
    ],
}

PERIODS = (1, 4, 16, 64, 256)
PERIOD_STEPS = 256
PERIOD_DATA: Dict[str, tuple] = {
    "synthetic-rich": ("scaling", ["model.tower=dlrm", f"trainer.max_steps={PERIOD_STEPS}"]),
    "movielens": (
        "movielens",
        [
            "model.tower=dlrm",
            f"trainer.max_steps={PERIOD_STEPS}",
            "trainer.eval_every_n_steps=0",
            "checkpoint.keep_best=false",
            "trainer.early_stopping.patience=0",
        ],
    ),
}


def run_job(name: str, config: str, overrides: List[str], out: Path) -> dict:
    """One 4-rank job; returns its final metrics (cached in ``out/results.jsonl``)."""
    results = out / "results.jsonl"
    if results.exists():
        for line in results.read_text().splitlines():
            rec = json.loads(line)
            if rec["name"] == name:
                return rec
    run_dir = out / "runs" / name
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "kunlun.launch.main",
        "--config",
        config,
        f"run_dir={run_dir}",
        *QUIET,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    rec = {"name": name, "config": config, "overrides": overrides, "wall_s": round(time.time() - t0, 1), **metrics}
    out.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{name}: {metrics.get('perf/examples_per_sec', 0):,.0f} examples/s, test NE {metrics['test/ne']:.4f} ({rec['wall_s']} s)", flush=True)
    return rec


def throughput(out: Path, rounds: int) -> None:
    for r in range(rounds):
        for variant, extra in THROUGHPUT_VARIANTS.items():
            run_job(f"throughput/r{r}/{variant}", "tiny", [*THROUGHPUT_JOB, *extra], out)


def period(out: Path, seeds: List[int]) -> None:
    for data, (config, base) in PERIOD_DATA.items():
        for seed in seeds:
            run_job(f"period/{data}/s{seed}/1d", config, [*base, f"seed={seed}", "parallel.sparse.strategy=1d"], out)
            for p in PERIODS:
                for scaling in ("true", "false"):
                    extra = [*TWO_D, "parallel.sparse.sync=touched", f"parallel.sparse.sync_every_n_steps={p}", f"parallel.sparse.momentum_scaling={scaling}"]
                    run_job(f"period/{data}/s{seed}/2d_p{p}_ms{scaling}", config, [*base, f"seed={seed}", *extra], out)
                extra = [*TWO_D, "parallel.sparse.sync=touched", "parallel.sparse.sync_reduce=sum_delta", f"parallel.sparse.sync_every_n_steps={p}"]
                run_job(f"period/{data}/s{seed}/2d_p{p}_sum", config, [*base, f"seed={seed}", *extra, "parallel.sparse.momentum_scaling=false"], out)


def _records(out: Path) -> Dict[str, dict]:
    path = out / "results.jsonl"
    return {json.loads(line)["name"]: json.loads(line) for line in path.read_text().splitlines()} if path.exists() else {}


def report(out: Path) -> str:
    recs = _records(out)
    lines: List[str] = []
    rounds = sorted({n.split("/")[1] for n in recs if n.startswith("throughput/")})
    if rounds:
        lines += [
            "| round | variant | examples/s | / 1D (same round) | test NE | − 1D |",
            "|---|---|---|---|---|---|",
        ]
        for r in rounds:
            v = {k: recs[f"throughput/{r}/{k}"] for k in THROUGHPUT_VARIANTS if f"throughput/{r}/{k}" in recs}
            if "1d" not in v:
                continue
            for k, rec in v.items():
                eps, ne = rec["perf/examples_per_sec"], rec["test/ne"]
                lines.append(f"| {r} | {k} | {eps:,.0f} | {eps / v['1d']['perf/examples_per_sec']:.2f} | {ne:.4f} | {ne - v['1d']['test/ne']:+.4f} |")
        lines.append("")
    for data in PERIOD_DATA:
        names = [n for n in recs if n.startswith(f"period/{data}/")]
        if not names:
            continue
        seeds = sorted({n.split("/")[2] for n in names})
        lines += [f"**{data}** (test NE after {PERIOD_STEPS} steps of 256; mean ± spread over seeds {', '.join(seeds)}; 2D − 1D in brackets)", ""]
        lines += ["| sync period (steps) | 2D mean, momentum scaling | 2D mean, no scaling | 2D sum_delta, no scaling |", "|---|---|---|---|"]
        base = [recs[f"period/{data}/{s}/1d"]["test/ne"] for s in seeds if f"period/{data}/{s}/1d" in recs]
        lines.append(f"| 1D | {_mean_spread(base)} | | |")
        for p in PERIODS:
            cells = []
            for scaling in ("mstrue", "msfalse", "sum"):
                vals, gaps = [], []
                for s in seeds:
                    rec, ref = recs.get(f"period/{data}/{s}/2d_p{p}_{scaling}"), recs.get(f"period/{data}/{s}/1d")
                    if rec and ref:
                        vals.append(rec["test/ne"])
                        gaps.append(rec["test/ne"] - ref["test/ne"])
                cells.append(f"{_mean_spread(vals)} ({statistics.mean(gaps):+.4f})" if vals else "")
            lines.append(f"| {p} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def _mean_spread(vals: List[float]) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "period", "report"])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "sync_bench")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    if a.what == "throughput":
        throughput(a.out, a.rounds)
    elif a.what == "period":
        period(a.out, [int(s) for s in a.seeds.split(",")])
    print(report(a.out))


if __name__ == "__main__":
    main()
