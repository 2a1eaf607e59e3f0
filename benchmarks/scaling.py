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
import csv
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOWERS = ("kunlun", "interformer", "hstu", "wukong", "dcnv2", "dlrm")
# Five widths per tower, chosen so that each spans >= 1.5 decades of FLOPs/example (towers
# whose FLOPs grow about linearly in w need a wider ladder) while the largest run stays a
# few minutes on one CPU core.
WIDTHS = {
    "kunlun": (12, 20, 32, 52, 80),
    "interformer": (12, 20, 32, 48, 72),
    "hstu": (16, 24, 40, 72, 128),
    "wukong": (8, 16, 32, 64, 128),
    "dcnv2": (8, 16, 32, 64, 128),
    "dlrm": (8, 16, 32, 64, 128),
}
ABLATION_WIDTH = 32
MIN_DECADES = 1.5


# ----------------------------------------------------------------------------- sizes
def tower_overrides(tower: str, w: int, low_value_event: str = "purchase") -> List[str]:
    """Config overrides that size ``tower`` at width ``w`` (every hidden size follows w).

    ``low_value_event``: the event type Kunlun gives half the capacity (event-level
    personalisation): ``purchase`` on the synthetic data, ``dislike`` on MovieLens.
    """
    if tower == "kunlun":
        h = max(8, w // 2)
        return [
            f"model.kunlun.dim={w}",
            f"model.kunlun.kv_rank={w}",
            f"model.kunlun.pffn_kv_len={h}",
            f"model.kunlun.wukong_mlp={2 * w}",
            f"model.kunlun.head_mlp=[{2 * w}]",
            "model.kunlun.num_layers=3",
            "model.kunlun.num_summary_tokens=4",
            # Event-level personalisation: clicks get the full width, purchases half of it.
            f"model.kunlun.default_event={{dim: {w}, heads: 2, layers: 3, window: 4, num_tokens: 4, num_seeds: 8}}",
            f"model.kunlun.events={{{low_value_event}: {{dim: {h}, heads: 2, layers: 1, window: 2, num_tokens: 2, num_seeds: 4}}}}",
        ]
    if tower == "interformer":
        return [
            f"model.interformer.dim={w}",
            "model.interformer.heads=2",
            "model.interformer.num_layers=2",
            f"model.interformer.kv_rank={w}",
            f"model.interformer.pffn_kv_len={max(8, w // 2)}",
            f"model.interformer.wukong_mlp={2 * w}",
            f"model.interformer.head_mlp=[{2 * w}]",
        ]
    if tower == "hstu":
        return [f"model.hstu.dim={w}", "model.hstu.heads=2", "model.hstu.num_layers=2", f"model.hstu.head_mlp=[{2 * w}]"]
    if tower == "wukong":
        return [f"model.wukong.dim={w}", "model.wukong.num_layers=2", f"model.wukong.mlp_hidden={2 * w}", f"model.wukong.head_mlp=[{2 * w}]"]
    if tower == "dcnv2":
        return ["model.dcnv2.num_cross_layers=2", f"model.dcnv2.low_rank={w}", f"model.dcnv2.deep_mlp=[{8 * w},{4 * w}]"]
    if tower == "dlrm":
        return [f"model.dlrm.bottom_mlp=[{2 * w}]", f"model.dlrm.top_mlp=[{8 * w},{4 * w}]"]
    raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")


# Ablations of Kunlun at ABLATION_WIDTH: variant → (overrides on top of the sized config,
# the feature the variant removes, the paper's reported effect of that feature (the
# Kunlun paper's ablation table, arXiv 2602.10016)).
ABLATIONS: Dict[str, Tuple[Optional[List[str]], str, str]] = {
    "kunlun (all on)": ([], "", ""),
    "CompSkip off": (["model.kunlun.compskip=false"], "CompSkip", "−43.1% FLOPs, +35% QPS, NE-neutral"),
    "full attention (no window)": (
        ["model.kunlun.default_event.window=-1", "model.kunlun.events.purchase.window=-1"],
        "sliding window",
        "−29.5% FLOPs, +31.1% QPS, NE-neutral",
    ),
    "PMA instead of HSP": (["model.kunlun.summary=pma"], "HSP (vs PMA)", "+0.08% NE gain"),
    "event personalisation off": (None, "event personalisation", "−11% FLOPs, +13% QPS"),  # see ablation_overrides
    "unfused PFFN (reference GDPA)": (["model.kunlun.gdpa_impl=reference"], "fused GDPA", "MFU 34→37%, +0.04% NE gain"),
}


def ablation_overrides(name: str, w: int = ABLATION_WIDTH) -> List[str]:
    base = tower_overrides("kunlun", w)
    if name == "event personalisation off":  # purchases get the clicks' config too
        return [o for o in base if not o.startswith("model.kunlun.events=")] + ["model.kunlun.events={}"]
    return base + list(ABLATIONS[name][0] or [])


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


GPU_ONLY_ABLATIONS = ("unfused PFFN (reference GDPA)",)  # on CPU "auto" already is the reference


NOISE_SEEDS = (1, 2)  # the full model again with other seeds: the run-to-run spread of NE


def ablation_runs(common: Sequence[str] = (), cuda: bool = False) -> List[Run]:
    names = [n for n in ABLATIONS if cuda or n not in GPU_ONLY_ABLATIONS]
    runs = [Run(f"ablate/{_slug(n)}", ["model.tower=kunlun", *ablation_overrides(n), *common]) for n in names]
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


LAYERS = (1, 2, 3, 4, 6)


def layer_runs(common: Sequence[str] = (), layers: Sequence[int] = LAYERS) -> List[Run]:
    """Kunlun at ABLATION_WIDTH with L Kunlun layers and L-layer click towers (NE vs depth)."""
    base = tower_overrides("kunlun", ABLATION_WIDTH)
    return [
        Run(f"layers/kunlun-L{n}", ["model.tower=kunlun", *base, f"model.kunlun.num_layers={n}", f"model.kunlun.default_event.layers={n}", *common])
        for n in layers
    ]


def collect_layers(out: Path) -> Optional[Dict]:
    recs = sorted((out / "layers").glob("kunlun-L*/final_metrics.json"), key=lambda p: int(p.parent.name.rsplit("-L", 1)[1]))
    if len(recs) < 3:
        return None
    rows = []
    for rec in recs:
        m = json.loads(rec.read_text())
        rows.append(
            {
                "layers": int(rec.parent.name.rsplit("-L", 1)[1]),
                "gflops_per_example_fwd": m["perf/forward_flops_per_example"] / 1e9,
                "train_flops": m["perf/train_flops"],
                "eval_ne": m["eval/ne"],
                "test_ne": m["test/ne"],
            }
        )
    fit = fit_line(np.log10([r["layers"] for r in rows]), [r["eval_ne"] for r in rows])
    lo, hi = fit.slope_ci
    return {
        "rows": rows,
        "ne_per_decade_of_layers": -fit.slope,
        "ci95": [-hi, -lo],
        "r2": fit.r2,
        "vs_flops": fit_scaling([r["train_flops"] for r in rows], [r["eval_ne"] for r in rows]),
    }


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


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ----------------------------------------------------------------------------- fits
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table; between rows the smaller dof, i.e. the
    wider interval; 1.96 beyond 30 degrees of freedom)."""
    if dof <= 0:
        return float("nan")
    if dof > 30:
        return 1.96
    return _T975[max(k for k in _T975 if k <= dof)]


@dataclass
class LineFit:
    """y = intercept + slope · x by least squares, with standard errors and 95% CIs."""

    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    r2: float
    n: int

    @property
    def slope_ci(self) -> Tuple[float, float]:
        h = t975(self.n - 2) * self.slope_se
        return self.slope - h, self.slope + h


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3:
        raise ValueError(f"need >= 3 points for a fit with an error estimate, got {n}")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    s2 = float((resid**2).sum() / (n - 2))
    sst = float(((y - ym) ** 2).sum())
    return LineFit(
        slope=slope,
        intercept=intercept,
        slope_se=math.sqrt(s2 / sxx),
        intercept_se=math.sqrt(s2 * (1 / n + xm**2 / sxx)),
        r2=1 - float((resid**2).sum()) / sst if sst > 0 else 1.0,
        n=n,
    )


def fit_scaling(train_flops: Sequence[float], ne: Sequence[float]) -> Dict:
    """Power-law and log-linear fits of NE against training FLOPs C (C in FLOPs)."""
    logc = np.log10(np.asarray(train_flops, float))
    power = fit_line(np.log(np.asarray(train_flops, float)), np.log(np.asarray(ne, float)))
    loglin = fit_line(logc - 9.0, ne)  # x = log10(C / 1 GFLOP)
    b_lo, b_hi = -power.slope_ci[1], -power.slope_ci[0]
    eta_lo, eta_hi = -loglin.slope_ci[1], -loglin.slope_ci[0]
    return {
        "power_a": math.exp(power.intercept),
        "power_b": -power.slope,
        "power_b_se": power.slope_se,
        "power_b_ci95": [b_lo, b_hi],
        "power_r2": power.r2,
        "loglin_ne0": loglin.intercept,
        "loglin_eta": -loglin.slope,
        "loglin_eta_se": loglin.slope_se,
        "loglin_eta_ci95": [eta_lo, eta_hi],
        "loglin_r2": loglin.r2,
        "points": len(ne),
        "decades": float(logc.max() - logc.min()),
    }


def slope_ratio(num: float, num_se: float, den: float, den_se: float) -> Tuple[float, float, float]:
    """num/den with a 95% delta-method interval (normal approximation)."""
    r = num / den
    se = abs(r) * math.sqrt((num_se / num) ** 2 + (den_se / den) ** 2)
    return r, r - 1.96 * se, r + 1.96 * se


def bayes_floor(overrides: Sequence[str] = (), config: str = "scaling", split: str = "eval") -> float:
    """NE of the synthetic source's true logits on ``split``: the floor no model can beat."""
    import torch

    from kunlun.data.sources import build_source
    from kunlun.trainer.config import load_config
    from kunlun.trainer.metrics import normalized_entropy

    cfg = load_config(config, list(overrides))
    src = build_source(cfg.data, cfg.seed)
    idx = np.arange(src.num_examples(split))
    labels = torch.from_numpy(src.read(split, idx).labels[:, 0].astype(np.float64))
    return normalized_entropy(torch.from_numpy(src.oracle_logits(split, idx)), labels)


# ----------------------------------------------------------------------------- report
def _row(tower: str, width: int, m: Dict, data: str) -> Dict:
    return {
        "data": data,
        "tower": tower,
        "width": width,
        "dense_params": int(m["model/dense_params"]),
        "gflops_per_example_fwd": m["perf/forward_flops_per_example"] / 1e9,
        "train_flops": m["perf/train_flops"],
        "examples": int(m["train/examples_consumed"]),
        "examples_per_sec": m.get("perf/examples_per_sec", float("nan")),
        "eval_ne": m["eval/ne"],
        "eval_auc": m["eval/auc"],
        "test_ne": m["test/ne"],
        "test_auc": m["test/auc"],
    }


def collect(out: Path, kind: str) -> List[Dict]:
    rows = []
    for rec in sorted((out / kind).glob("*/final_metrics.json")):
        tower, rest = rec.parent.name.rsplit("-w", 1)
        w, _, seed = rest.partition("-s")
        row = _row(tower, int(w), json.loads(rec.read_text()), kind)
        row["seed"] = int(seed or 0)
        rows.append(row)
    order = {t: i for i, t in enumerate(TOWERS)}
    return sorted(rows, key=lambda r: (order.get(r["tower"], len(order)), r["width"], r["seed"]))


def write_table(rows: List[Dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: List[Dict], fits: Dict[str, Dict], floor: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=100)
    for i, tower in enumerate(t for t in TOWERS if t in fits):
        pts = sorted((r["train_flops"], r["eval_ne"]) for r in rows if r["tower"] == tower)
        c = np.array([p[0] for p in pts])
        color = f"C{i}"
        ax.scatter(c, [p[1] for p in pts], color=color, s=18)
        f = fits[tower]
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.plot(grid, f["power_a"] * grid ** (-f["power_b"]), color=color, label=f"{tower}: b={f['power_b']:.4f}, η={f['loglin_eta']:.4f}")
    ax.set_xscale("log")
    if floor is not None:  # far below the curves: a line would flatten them, so a note
        ax.text(0.01, 0.01, f"Bayes floor (NE of the true logits): {floor:.3f}", transform=ax.transAxes, fontsize=7, color="gray")
    ax.set_xlabel("training FLOPs (3 × forward FLOPs/example × examples)")
    ax.set_ylabel("eval NE")
    ax.set_title("NE vs training compute (synthetic rich signal, one pass over the same examples)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, common: Sequence[str] = ()) -> Dict:
    """Fits, ``scaling.csv``/``scaling.json``/``scaling.png`` (+ ``ablations.csv``) under ``out``."""
    rows = collect(out, "sweep")
    if not rows:
        raise SystemExit(f"no sweep results under {out / 'sweep'}; run `scaling.py sweep --out {out}` first")
    fits = {}
    for tower in TOWERS:
        pts = sorted((r["train_flops"], r["eval_ne"]) for r in rows if r["tower"] == tower)
        # Every run is a point of the fit (several seeds per size tighten it); the
        # size-level checks use the mean over seeds.
        by_size: Dict[int, List[float]] = {}
        for r in rows:
            if r["tower"] == tower:
                by_size.setdefault(r["width"], []).append(r["eval_ne"])
        means = [float(np.mean(by_size[w])) for w in sorted(by_size)]
        if len(by_size) >= 3:
            fits[tower] = fit_scaling([p[0] for p in pts], [p[1] for p in pts])
            fits[tower]["sizes"] = len(by_size)
            fits[tower]["still_improving"] = bool(means[-1] < means[-2])
            fits[tower]["best_eval_ne"] = min(means)
    summary: Dict = {"fits": fits}
    if "kunlun" in fits and "interformer" in fits:
        for key in ("power_b", "loglin_eta"):
            k, i = fits["kunlun"], fits["interformer"]
            r, lo, hi = slope_ratio(k[key], k[f"{key}_se"], i[key], i[f"{key}_se"])
            summary[f"efficiency_{key}"] = {"ratio": r, "ci95": [lo, hi]}
    floor = bayes_floor(common)
    summary["bayes_floor_eval_ne"] = floor
    all_rows = rows + collect(out, "movielens")
    write_table(all_rows, out / "scaling.csv")
    ablations = collect_ablations(out)
    if ablations:
        write_table(ablations, out / "ablations.csv")
        summary["ablations"] = ablations
        seeds = [ablations[0]["eval_ne"]] + [json.loads(p.read_text())["eval/ne"] for p in sorted((out / "ablate").glob("seed*/final_metrics.json"))]
        if len(seeds) >= 2:  # seed changes data order, eval examples and init: the whole-run spread
            summary["seed_spread"] = {"eval_ne": seeds, "std": float(np.std(seeds, ddof=1)), "std_pct": float(100 * np.std(seeds, ddof=1) / np.mean(seeds))}
    summary["rows"] = all_rows
    depth = collect_layers(out)
    if depth:
        summary["layers"] = depth
    base = out / "sweep" / f"kunlun-w{ABLATION_WIDTH}" / "final_metrics.json"
    more = sorted((out / "saturation").glob(f"kunlun-w{ABLATION_WIDTH}-x*/final_metrics.json"), key=lambda p: int(p.parent.name.rsplit("-x", 1)[1]))
    if base.exists() and more:
        summary["more_data"] = [{"data_factor": 1, "eval_ne": json.loads(base.read_text())["eval/ne"]}] + [
            {"data_factor": int(p.parent.name.rsplit("-x", 1)[1]), "eval_ne": json.loads(p.read_text())["eval/ne"]} for p in more
        ]
    (out / "scaling.json").write_text(json.dumps(summary, indent=1))
    plot(rows, fits, floor, out / "scaling.png")
    print(markdown(summary))
    return summary


def collect_ablations(out: Path) -> List[Dict]:
    rows, base = [], None
    tput_file = out / "ablation_throughput.json"
    tput = json.loads(tput_file.read_text()) if tput_file.exists() else {}
    for name, (_, feature, paper) in ABLATIONS.items():
        rec = out / "ablate" / _slug(name) / "final_metrics.json"
        if not rec.exists():
            continue
        r = _row("kunlun", ABLATION_WIDTH, json.loads(rec.read_text()), "ablate")
        r["variant"], r["feature"], r["paper"] = name, feature, paper
        if name in tput:  # the sequential, same-conditions measurement beats the run's own
            r["examples_per_sec"] = tput[name]
        base = base or r
        # The feature's effect, in the paper's convention: the full model relative to this
        # variant without it (FLOPs and examples/s ratios; NE gain > 0 = the feature helps).
        r["feature_flops_pct"] = 100 * (base["gflops_per_example_fwd"] / r["gflops_per_example_fwd"] - 1)
        r["feature_examples_per_sec_pct"] = 100 * (base["examples_per_sec"] / r["examples_per_sec"] - 1)
        r["feature_ne_gain_pct"] = 100 * (r["eval_ne"] - base["eval_ne"]) / r["eval_ne"]
        rows.append(r)
    return rows


def markdown(summary: Dict) -> str:
    lines = [
        "| tower | runs | decades of C | b (NE = a·C^-b) [95% CI] | η (NE per decade) [95% CI] | R² (power) | best eval NE (size mean) | largest size still better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tower, f in summary["fits"].items():
        lines.append(
            f"| {tower} | {f['points']} ({f['sizes']} sizes) | {f['decades']:.2f} | {f['power_b']:.4f} [{f['power_b_ci95'][0]:.4f}, {f['power_b_ci95'][1]:.4f}] | "
            f"{f['loglin_eta']:.4f} [{f['loglin_eta_ci95'][0]:.4f}, {f['loglin_eta_ci95'][1]:.4f}] | {f['power_r2']:.3f} | {f['best_eval_ne']:.4f} | {'yes' if f['still_improving'] else 'no'} |"
        )
    for key in ("efficiency_power_b", "efficiency_loglin_eta"):
        if key in summary:
            e = summary[key]
            lines.append(f"\nScaling efficiency Kunlun/InterFormer ({key.split('_', 1)[1]}): {e['ratio']:.2f} [95% CI {e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}]")
    if summary.get("bayes_floor_eval_ne") is not None:
        lines.append(f"\nBayes floor (eval NE of the true logits): {summary['bayes_floor_eval_ne']:.4f}")
    if summary.get("more_data"):
        lines.append(
            f"\nKunlun w{ABLATION_WIDTH} with more training examples (one pass each): "
            + ", ".join(f"{d['data_factor']}x → eval NE {d['eval_ne']:.4f}" for d in summary["more_data"])
        )
    lines.append(
        "\n| data | tower | width | seed | dense params | fwd GFLOPs/ex | train FLOPs | ex/s | eval NE | eval AUC | test NE | test AUC |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in summary["rows"]:
        lines.append(
            f"| {r['data']} | {r['tower']} | {r['width']} | {r['seed']} | {r['dense_params']:,} | {r['gflops_per_example_fwd']:.5f} | {r['train_flops']:.3g} | {r['examples_per_sec']:.0f} | "
            f"{r['eval_ne']:.4f} | {r['eval_auc']:.4f} | {r['test_ne']:.4f} | {r['test_auc']:.4f} |"
        )
    if summary.get("layers"):
        d = summary["layers"]
        lines.append(
            f"\nNE vs number of layers (Kunlun w{ABLATION_WIDTH}): η = {d['ne_per_decade_of_layers']:.4f} NE per decade of layers [95% CI {d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}], R² {d['r2']:.2f}; "
            f"vs FLOPs b = {d['vs_flops']['power_b']:.4f} [{d['vs_flops']['power_b_ci95'][0]:.4f}, {d['vs_flops']['power_b_ci95'][1]:.4f}]"
        )
        lines.append("\n| layers | fwd GFLOPs/ex | train FLOPs | eval NE | test NE |\n|---|---|---|---|---|")
        lines += [
            f"| {r['layers']} | {r['gflops_per_example_fwd']:.5f} | {r['train_flops']:.3g} | {r['eval_ne']:.4f} | {r['test_ne']:.4f} |" for r in d["rows"]
        ]
    if summary.get("seed_spread"):
        sp = summary["seed_spread"]
        lines.append(
            f"\nKunlun (all on) over {len(sp['eval_ne'])} seeds: eval NE "
            + ", ".join(f"{v:.4f}" for v in sp["eval_ne"])
            + f" (std {sp['std']:.4f} = {sp['std_pct']:.2f}%)"
        )
    if summary.get("ablations"):
        lines.append(
            "\n| variant | fwd GFLOPs/ex | ex/s | eval NE | feature | its ΔFLOPs | its Δex/s | its NE gain | paper (same feature) |\n|---|---|---|---|---|---|---|---|---|"
        )
        for r in summary["ablations"]:
            effect = (
                f"{r['feature_flops_pct']:+.1f}% | {r['feature_examples_per_sec_pct']:+.1f}% | {r['feature_ne_gain_pct']:+.2f}%"
                if r["feature"]
                else "— | — | —"
            )
            lines.append(
                f"| {r['variant']} | {r['gflops_per_example_fwd']:.5f} | {r['examples_per_sec']:.0f} | {r['eval_ne']:.4f} | {r['feature'] or '—'} | {effect} | {r['paper'] or '—'} |"
            )
    return "\n".join(lines)


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
