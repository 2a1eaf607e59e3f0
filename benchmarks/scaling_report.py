"""Reports of the scaling study: reads the runs' ``final_metrics.json`` records (sweep,
MovieLens, ablations, layers, more data), computes the fits, efficiency ratios and the
Bayes floor, and writes ``scaling.csv``/``scaling.json``/``scaling.png``/``ablations.csv``
and the Markdown tables.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scaling_defs import ABLATION_WIDTH, ABLATIONS, TOWERS, slug
from scaling_plots import plot
from scaling_stats import fit_line, fit_scaling, slope_ratio


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
        rec = out / "ablate" / slug(name) / "final_metrics.json"
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
