"""Scaling laws: NE vs training FLOPs for Kunlun and its baselines, plus ablations.

    python benchmarks/scaling.py plan                       # sizes and FLOPs, no training
    python benchmarks/scaling.py sweep  --out runs/scaling  # train every tower x width
    python benchmarks/scaling.py layers --out runs/scaling  # Kunlun NE vs number of layers
    python benchmarks/scaling.py ablate --out runs/scaling  # Kunlun ablations at one width
    python benchmarks/scaling.py throughput --out runs/scaling  # their examples/s, one at a time
    python benchmarks/scaling.py saturation --out runs/scaling  # Kunlun on 2x and 4x the data
    python benchmarks/scaling.py movielens --out runs/scaling   # real-data points
    python benchmarks/scaling.py report --out runs/scaling  # fits, CSV/JSON, PNG, tables

(``make scaling`` runs all of them.) Every run is a real training job
(``python -m kunlun.launch.main --config scaling ...``, one CPU process each, ``--jobs``
at a time) whose ``final_metrics.json`` is the record; a run whose record exists is not
repeated, so an interrupted sweep resumes where it stopped.

Budget rule: data and steps fixed. Every run makes one
pass over the same 120k synthetic training examples in the same order (``configs/
scaling.yaml``: rich planted signal, batch 256, AdamW); towers and sizes differ only in
width, so training compute C = 3 × forward FLOPs/example × examples seen. Width ``w``
sets every hidden size of a tower (``tower_overrides``); five widths span ≥ 1.5 decades
of C for each tower (``plan`` prints it, ``check_span`` enforces it).

Fits, per tower, by least squares over its sizes (eval NE, the validation split):
* power law ``NE = a · C^(-b)``, i.e. ``log NE = log a − b log C``;
* log-linear ``NE = NE0 − η · log10(C / C0)`` (the architecture doc's form; C0 = 1 GFLOP),
each slope with a 95% confidence interval (Student t, n − 2 degrees of freedom).
Scaling efficiency = η_Kunlun / η_InterFormer (delta-method interval).

Is the synthetic signal saturated? ``report`` prints the Bayes floor (NE of the true
logits on the same eval split) next to every tower's best NE, and whether each tower's
NE still falls from its second-largest to its largest size; ``saturation`` trains one
Kunlun size on 2x and 4x the examples to show the data still has signal to give.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# Sibling modules by plain name, also when this file is loaded by path (tests, train_bench).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_defs import (  # noqa: E402
    ABLATION_WIDTH,
    ABLATIONS,
    GPU_ONLY_ABLATIONS,
    LAYERS,
    MIN_DECADES,
    NOISE_SEEDS,
    REPO,
    TOWERS,
    WIDTHS,
    ablation_overrides,
    slug,
    tower_overrides,
)

# Re-exported: other code and the tests use them as ``scaling.<name>``.
from scaling_plots import plot  # noqa: E402, F401
from scaling_report import bayes_floor, collect, collect_ablations, collect_layers, markdown, report, write_table  # noqa: E402, F401
from scaling_stats import LineFit, fit_line, fit_scaling, slope_ratio, t975  # noqa: E402, F401


# ----------------------------------------------------------------------------- sizes
def planned_flops(tower: str, w: int, extra: Sequence[str] = (), config: str = "scaling") -> Dict[str, float]:
    """Forward FLOPs/example and dense parameters of one size, without training."""
    from kunlun.data.sources import build_source
    from kunlun.model.towers import build_tower
    from kunlun.trainer.config import load_config
    from kunlun.trainer.perf import average_sequence_lengths

    cfg = load_config(config, [f"model.tower={tower}", *tower_overrides(tower, w), *extra])
    source = build_source(cfg.data, cfg.seed)
    tower_module = build_tower(source.schema, cfg.model, num_labels=len(source.schema.labels))
    avg = average_sequence_lengths(source, seed=cfg.seed)
    return {"forward_flops": float(tower_module.flops_per_example(avg)), "dense_params": float(sum(p.numel() for p in tower_module.parameters()))}


def tower_throughput(overrides: Sequence[str], steps: int = 30, batch: int = 256, warmup: int = 5) -> float:
    """Dense-tower training examples/s (forward + backward + AdamW) on one thread.

    The ablation runs of ``ablate`` train two at a time on a shared machine, so their
    own examples/s are noisy; this measures every variant the same way, one after the
    other in one process, on batches of the real scaling data with fixed random
    embeddings (the embedding lookup is the same for every variant and not timed).
    """
    import time

    import torch

    from kunlun.data.sources import build_source
    from kunlun.model.towers import build_tower
    from kunlun.model.towers.base import EventSequence, TowerInputs
    from kunlun.trainer.config import load_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("scaling", list(overrides))
    source = build_source(cfg.data, cfg.seed)
    schema, dim = source.schema, cfg.model.embedding_dim
    tables = {t.name: torch.randn(t.num_embeddings, dim) * 0.1 for t in schema.tables}
    tower = build_tower(schema, cfg.model, num_labels=len(schema.labels))
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-3)

    def inputs(step: int):
        block = source.read("train", np.arange(step * batch, (step + 1) * batch))
        context = {}
        for f in schema.context_features:
            col = block.context[f.name]
            rows = torch.repeat_interleave(torch.arange(batch), torch.from_numpy(col.lengths))
            context[f.name] = torch.zeros(batch, dim).index_add_(0, rows, tables[f.table][torch.from_numpy(col.values)])
        events = {}
        for e in schema.event_types:
            ev = block.events[e.name]
            lengths = torch.from_numpy(ev.lengths).long()
            events[e.name] = EventSequence(
                item=tables[e.item_table][torch.from_numpy(ev.items)],
                action=tables[e.action_table][torch.from_numpy(ev.actions)],
                timestamps=torch.from_numpy(ev.timestamps),
                lengths=lengths,
                offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            )
        x = TowerInputs(dense=torch.from_numpy(block.dense), context=context, events=events, request_time=torch.from_numpy(block.request_time))
        return x, torch.from_numpy(block.labels)

    batches = [inputs(i) for i in range(warmup + steps)]
    elapsed = 0.0
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(tower(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
    return steps * batch / elapsed


def check_span(flops: Sequence[float], tower: str, min_decades: float = MIN_DECADES) -> float:
    decades = math.log10(max(flops) / min(flops))
    if decades < min_decades:
        raise SystemExit(f"{tower}: widths span only {decades:.2f} decades of training FLOPs (need >= {min_decades}; --min-decades)")
    return decades


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str  # folder under --out, e.g. "sweep/kunlun-w40"
    overrides: List[str]
    config: str = "scaling"


def _job_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # --jobs processes share the cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def execute(run: Run, out: Path, timeout: int) -> Dict:
    """Trains one run (skipped if its record exists) and returns its final metrics."""
    run_dir = out / run.name
    record = run_dir / "final_metrics.json"
    if not record.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "kunlun.launch.main", "--config", run.config, f"run_dir={run_dir}", "checkpoint.resume=never", *run.overrides]
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        with open(run_dir / "stdout.log", "w") as fout:
            proc = subprocess.run(cmd, cwd=REPO, env=_job_env(), stdout=fout, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"run {run.name} failed with exit code {proc.returncode}; see {run_dir / 'stdout.log'}")
        print(f"  done {run.name}", flush=True)
    return json.loads(record.read_text())


def execute_all(runs: Sequence[Run], out: Path, jobs: int, timeout: int) -> List[Dict]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda r: execute(r, out, timeout), runs))


def sweep_runs(towers: Sequence[str], widths: Dict[str, Sequence[int]], common: Sequence[str] = (), seeds: Sequence[int] = (0,)) -> List[Run]:
    """One run per tower x width x seed (seed 0 is the config's; others add ``-s<seed>``)."""
    # Largest first: the long runs start early, so parallel jobs finish together.
    triples = sorted(((t, w, s) for t in towers for w in widths[t] for s in seeds), key=lambda tws: -tws[1])
    return [
        Run(f"sweep/{t}-w{w}" + (f"-s{s}" if s else ""), [f"model.tower={t}", *tower_overrides(t, w), *([f"seed={s}"] if s else []), *common])
        for t, w, s in triples
    ]


def ablation_runs(common: Sequence[str] = (), cuda: bool = False) -> List[Run]:
    names = [n for n in ABLATIONS if cuda or n not in GPU_ONLY_ABLATIONS]
    runs = [Run(f"ablate/{slug(n)}", ["model.tower=kunlun", *ablation_overrides(n), *common]) for n in names]
    base = ablation_overrides(next(iter(ABLATIONS)))
    return runs + [Run(f"ablate/seed{s}", ["model.tower=kunlun", *base, f"seed={s}", *common]) for s in NOISE_SEEDS]


def saturation_runs(factors: Sequence[int] = (2, 4)) -> List[Run]:
    """Kunlun at ABLATION_WIDTH on k x the training examples (still one pass): if NE keeps
    falling with data at a fixed model, the planted signal is not exhausted at this budget."""
    base = load_scaling_config()
    n, b = base.data.synthetic.train_examples, base.data.batch_size
    return [
        Run(
            f"saturation/kunlun-w{ABLATION_WIDTH}-x{k}",
            ["model.tower=kunlun", *tower_overrides("kunlun", ABLATION_WIDTH), f"data.synthetic.train_examples={k * n}", f"trainer.max_steps={k * n // b}"],
        )
        for k in factors
    ]


def layer_runs(common: Sequence[str] = (), layers: Sequence[int] = LAYERS) -> List[Run]:
    """Kunlun at ABLATION_WIDTH with L Kunlun layers and L-layer click towers (NE vs depth)."""
    base = tower_overrides("kunlun", ABLATION_WIDTH)
    return [
        Run(f"layers/kunlun-L{n}", ["model.tower=kunlun", *base, f"model.kunlun.num_layers={n}", f"model.kunlun.default_event.layers={n}", *common])
        for n in layers
    ]


def load_scaling_config(overrides: Sequence[str] = ()):
    from kunlun.trainer.config import load_config

    return load_config("scaling", list(overrides))


def movielens_runs(towers: Sequence[str], widths: Sequence[int]) -> List[Run]:
    # One pass over MovieLens-100K's 81,140 training examples (it overfits after ~1.5 epochs).
    common = [
        "trainer.max_steps=317",
        "data.batch_size=256",
        "trainer.eval_every_n_steps=0",
        "trainer.early_stopping.patience=0",
        "checkpoint.every_n_steps=0",
        "logging.progress_bar=false",
    ]
    return [
        Run(f"movielens/{t}-w{w}", [f"model.tower={t}", "model.embedding_dim=16", *tower_overrides(t, w, "dislike"), *common], config="movielens")
        for t in towers
        for w in widths
    ]


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("plan", "sweep", "layers", "ablate", "throughput", "saturation", "movielens", "report"))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "scaling")
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--widths", default="", help="comma-separated widths for every tower (default: WIDTHS per tower)")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. trainer.max_steps=50); give report the same ones")
    ap.add_argument("--seeds", default="0", help="sweep: comma-separated seeds per size (e.g. 0,1,2 to tighten the fits)")
    ap.add_argument("--throughput-steps", type=int, default=30, help="throughput: timed steps per variant and round")
    ap.add_argument("--min-decades", type=float, default=MIN_DECADES, help="sweep refuses width ladders spanning fewer decades of FLOPs")
    args = ap.parse_args(argv)
    towers = [t for t in args.towers.split(",") if t]
    fixed = [int(w) for w in args.widths.split(",") if w]
    widths = {t: fixed or list(WIDTHS[t]) for t in TOWERS}
    for t in towers:
        if t not in TOWERS:
            raise SystemExit(f"--towers: unknown tower {t!r}; expected some of {', '.join(TOWERS)}")
    out = args.out.resolve()
    if args.command == "plan":
        for t in towers:
            sizes = [planned_flops(t, w) for w in widths[t]]
            decades = math.log10(max(s["forward_flops"] for s in sizes) / min(s["forward_flops"] for s in sizes))
            print(
                f"{t}: "
                + ", ".join(f"w{w} {s['forward_flops'] / 1e6:.3f} MFLOPs/{s['dense_params'] / 1e3:.0f}k params" for w, s in zip(widths[t], sizes))
                + f" | {decades:.2f} decades"
            )
    elif args.command == "sweep":
        for t in towers:
            check_span([planned_flops(t, w, args.set)["forward_flops"] for w in widths[t]], t, args.min_decades)
        execute_all(sweep_runs(towers, widths, args.set, [int(x) for x in args.seeds.split(",")]), out, args.jobs, args.timeout)
    elif args.command == "ablate":
        import torch

        execute_all(ablation_runs(args.set, cuda=torch.cuda.is_available()), out, args.jobs, args.timeout)
    elif args.command == "layers":
        execute_all(layer_runs(args.set), out, args.jobs, args.timeout)
    elif args.command == "throughput":
        names = [n for n in ABLATIONS if n not in GPU_ONLY_ABLATIONS]
        result = {}
        for rnd in range(2):  # two interleaved rounds; the faster of the two counts
            for n in names:
                ex_s = tower_throughput(["model.tower=kunlun", *ablation_overrides(n), *args.set], steps=args.throughput_steps)
                result[n] = max(result.get(n, 0.0), ex_s)
                print(f"  round {rnd}: {n}: {ex_s:.0f} examples/s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation_throughput.json").write_text(json.dumps(result, indent=1))
    elif args.command == "saturation":
        execute_all(saturation_runs(), out, args.jobs, args.timeout)
    elif args.command == "movielens":
        execute_all(movielens_runs(towers, fixed or [ABLATION_WIDTH]), out, args.jobs, args.timeout)
    else:
        report(out, args.set)


if __name__ == "__main__":
    main()
