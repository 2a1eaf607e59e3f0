"""Multi-task and multi-domain: single-task models vs shared bottom vs MMoE vs PLE vs
domain-aware, per task, over seeds (issue #14).

    .venv/bin/python benchmarks/multitask_bench.py run [--data movielens|synthetic|both] [--seeds 0,1,2] [--out runs/multitask_bench]
    .venv/bin/python benchmarks/multitask_bench.py report [--out runs/multitask_bench]

Every job is a real one-process ``kunlun train`` (early stopping on the validation split,
test on the best step); results are read from each run's ``final_metrics.json`` and kept in
``--out/results.jsonl`` (finished runs are skipped on a rerun). ``report`` prints the
Markdown tables that go into BENCHMARKS.md: per task, the test metric's mean ± sample std
over seeds, and each variant's difference to the single-task model of that task.

* ``movielens``: ``configs/movielens-mt.yaml`` (Kunlun tower; like = rating >= 4, rating
  regression, love = rating == 5). Single-task models train on one label each with the same
  tower; ``shared`` has one output per task on the tower (shared bottom); ``mmoe`` 4 experts;
  ``ple`` 2 shared + 1 per-task experts. Early stopping on ``like``'s NE (or the single task's
  metric).
* ``synthetic``: the tiny preset with the synthetic multi-task, multi-domain signal
  (``data.synthetic.multitask``: click, like binary and watch regression; 3 domains with
  domain-specific parts; 30% of like/watch labels missing), DLRM tower; variants as above plus
  ``domain`` (MMoE with ``domain_feature=domain``: per-domain gates, one expert per domain,
  per-domain calibration). The oracle's test AUC / MSE per task is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUIET = ["logging.progress_bar=false", "checkpoint.every_n_steps=0", "checkpoint.keep_best=true", "checkpoint.resume=never"]

SYN_DATA = [
    "data.synthetic.multitask.tasks=[click,like,watch]",
    "data.synthetic.multitask.regression=[watch]",
    "data.synthetic.multitask.missing_rate=0.3",
    "trainer.max_steps=1500",
    "trainer.eval_every_n_steps=100",
    "trainer.early_stopping.patience=4",
]
SYN_TASKS = "model.tasks=[{name: click, type: binary}, {name: like, type: binary}, {name: watch, type: regression, weight: 0.5}]"
ML_TASKS = {
    "like": ("binary", "data.movielens.labels=[like]", "model.tasks=[{name: like, type: binary}]", "eval/ne"),
    "rating": ("regression", "data.movielens.labels=[rating]", "model.tasks=[{name: rating, type: regression}]", "eval/mse"),
    "love": ("binary", "data.movielens.labels=[love]", "model.tasks=[{name: love, type: binary}]", "eval/ne"),
}
MIXERS = {
    "shared": ["model.multitask.mixer=shared"],
    "mmoe": ["model.multitask.mixer=mmoe", "model.multitask.num_experts=4"],
    "ple": ["model.multitask.mixer=ple", "model.multitask.shared_experts=2", "model.multitask.task_experts=1"],
}


def variants(data: str) -> Dict[str, List[str]]:
    """name → (config, overrides) of every job of ``data``."""
    out: Dict[str, List[str]] = {}
    if data == "movielens":
        for task, (_, labels, tasks, metric) in ML_TASKS.items():
            out[f"single-{task}"] = ["movielens-mt", labels, tasks, "model.multitask.mixer=shared", f"trainer.early_stopping.metric={metric}"]
        for mixer, extra in MIXERS.items():
            out[mixer] = ["movielens-mt", *extra]
        return out
    for task, kind in (("click", "binary"), ("like", "binary"), ("watch", "regression")):
        metric = "eval/ne" if kind == "binary" else "eval/mse"
        # the same data (all three labels); one task reads its label
        out[f"single-{task}"] = ["tiny", *SYN_DATA, f"model.tasks=[{{name: {task}, type: {kind}}}]", f"trainer.early_stopping.metric={metric}"]
    for mixer, extra in MIXERS.items():
        out[mixer] = ["tiny", *SYN_DATA, SYN_TASKS, *extra, "model.multitask.tower_out=32", "trainer.early_stopping.metric=eval/click/ne"]
    out["domain"] = [
        "tiny",
        *SYN_DATA,
        SYN_TASKS,
        *MIXERS["mmoe"],
        "model.multitask.tower_out=32",
        "model.multitask.domain_feature=domain",
        "trainer.early_stopping.metric=eval/click/ne",
    ]
    return out


def run(args) -> None:
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["data"], r["variant"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} if results.exists() else set()
    datas = ["movielens", "synthetic"] if args.data == "both" else [args.data]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for data in datas:
            for name, (config, *overrides) in variants(data).items():
                if (data, name, seed) in done:
                    continue
                run_dir = out / "runs" / data / f"{name}-s{seed}"
                cmd = [str(BIN / "kunlun"), "train", "--config", config, f"run_dir={run_dir}", f"seed={seed}", *QUIET, *overrides]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                final = json.loads((run_dir / "final_metrics.json").read_text())
                rec = {"data": data, "variant": name, "seed": seed, "final": final}
                with open(results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(data, name, seed, {k: round(v, 4) for k, v in final.items() if k.startswith("test/") and k.count("/") <= 2}, flush=True)


def _test_metric(final: Dict, task: str, metric: str):
    """A task's test metric from a multi-task run (``test/<task>/<metric>``) or a single-task
    one (``test/<metric>``)."""
    return final.get(f"test/{task}/{metric}", final.get(f"test/{metric}"))


def oracle_row(tasks) -> str:
    """The synthetic data's true logits scored like a model: the ceiling of each task."""
    import numpy as np
    import torch

    from kunlun.data.sources import build_source
    from kunlun.trainer.config import load_config
    from kunlun.trainer.metrics import task_metrics

    cfg = load_config("tiny", [o for o in SYN_DATA if o.startswith("data.")])
    src = build_source(cfg.data, cfg.seed)
    n = src.num_examples("test")
    idx = np.arange(n)
    logits = torch.as_tensor(src.oracle_logits("test", idx).reshape(n, -1))
    labels = torch.as_tensor(np.asarray(src.read("test", idx).labels).reshape(n, -1))
    names = list(src.schema.labels)
    cells = []
    for t, m in tasks:
        j = names.index(t)
        kind = "binary" if m in ("auc", "ne", "logloss") else "regression"
        cells.append(f"{task_metrics(logits[:, j], labels[:, j], torch.ones(n), kind)[m]:.4f}")
    return "| oracle (true logits) | " + " | ".join(cells) + " |"


def report(args) -> None:
    out = (REPO / args.out).resolve()
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for data in ("movielens", "synthetic"):
        rows = [r for r in recs if r["data"] == data]
        if not rows:
            continue
        tasks = [("like", "auc"), ("rating", "mse"), ("love", "auc")] if data == "movielens" else [("click", "auc"), ("like", "auc"), ("watch", "mse")]
        names = list(variants(data))
        seeds = sorted({r["seed"] for r in rows})
        print(f"\n{data}: test metric per task, mean ± std over seeds {seeds}; Δ = variant − single-task model of that task (same seeds)\n")
        print("| variant | " + " | ".join(f"{t} {m}" for t, m in tasks) + " |")
        print("|---|" + "---|" * len(tasks))
        single = {}
        for t, m in tasks:
            single[t] = {r["seed"]: _test_metric(r["final"], t, m) for r in rows if r["variant"] == f"single-{t}"}
        for name in names:
            cells = []
            for t, m in tasks:
                vals = {r["seed"]: _test_metric(r["final"], t, m) for r in rows if r["variant"] == name}
                vals = {s: v for s, v in vals.items() if v is not None}
                if name.startswith("single-") and name != f"single-{t}":
                    cells.append("")
                    continue
                if not vals:
                    cells.append("–")
                    continue
                mean = statistics.mean(vals.values())
                sd = statistics.stdev(vals.values()) if len(vals) > 1 else 0.0
                cell = f"{mean:.4f} ± {sd:.4f}"
                if not name.startswith("single-"):
                    diffs = [vals[s] - single[t][s] for s in vals if s in single[t]]
                    if diffs:
                        dm = statistics.mean(diffs)
                        dsd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                        cell += f" (Δ {dm:+.4f} ± {dsd:.4f})"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")
        if data == "synthetic":
            print(oracle_row(tasks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--data", default="both", choices=["movielens", "synthetic", "both"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/multitask_bench")
    args = p.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
