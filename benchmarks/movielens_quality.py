"""MovieLens-100K quality of every tower beside a logistic-regression baseline.

    .venv/bin/python benchmarks/movielens_quality.py run --out runs/ml-quality [--towers ...] [--seeds 0,1,2] [--jobs 2]
    .venv/bin/python benchmarks/movielens_quality.py report --out runs/ml-quality [--baseline baseline.json]

``run`` trains each tower with ``configs/movielens.yaml`` (what ``make train`` runs: early
stopping on validation NE, the final test on the best validation step) for each seed, one
process per run (``--jobs`` at a time, one thread each); a run whose ``final_metrics.json``
exists is not run again. Kunlun and DLRM use the preset's own sizes; the other towers
are sized at width 32 as in the scaling study (``scaling.tower_overrides``).

``report`` prints a Markdown table of test AUC / NE (mean ± sample std over seeds), the
best step and the epochs trained, with the baseline's row (``movielens_baseline.py
--json``) for comparison, and writes ``quality.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import Run, execute_all, tower_overrides  # noqa: E402

TOWERS = ("kunlun", "interformer", "hstu", "wukong", "dcnv2", "dlrm")
PRESET_SIZED = ("kunlun", "dlrm")  # configs/movielens.yaml sizes these two


def quality_runs(towers: Sequence[str], seeds: Sequence[int]) -> List[Run]:
    runs = []
    for tower in towers:
        sizing = [] if tower in PRESET_SIZED else tower_overrides(tower, 32, "dislike")
        for seed in seeds:
            overrides = [f"model.tower={tower}", f"seed={seed}", "logging.progress_bar=false", *sizing]
            runs.append(Run(f"{tower}/seed{seed}", overrides, config="movielens"))
    return runs


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(out: Path, baseline: Optional[Path]) -> Dict:
    rows: Dict[str, Dict] = {}
    for record in sorted(out.glob("*/seed*/final_metrics.json")):
        tower = record.parent.parent.name
        m = json.loads(record.read_text())
        row = rows.setdefault(tower, {"test/auc": [], "test/ne": [], "eval/ne": [], "best/step": [], "train/epochs": []})
        for key in row:
            row[key].append(float(m[key]))
    summary = {"towers": rows}
    if baseline is not None:
        summary["baseline"] = json.loads(baseline.read_text())
    return summary


def markdown(summary: Dict) -> str:
    lines = [
        "| model | seeds | test AUC | test NE | eval NE (best step) | best step | epochs trained |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(summary["towers"].items(), key=lambda kv: -statistics.mean(kv[1]["test/auc"]))
    for tower, row in ranked:
        lines.append(
            f"| {tower} | {len(row['test/auc'])} | {_mean_std(row['test/auc'])} | {_mean_std(row['test/ne'])} | "
            f"{_mean_std(row['eval/ne'])} | {statistics.mean(row['best/step']):.0f} | {statistics.mean(row['train/epochs']):.2f} |"
        )
    base = summary.get("baseline")
    if base:
        lines.append(
            f"| logistic regression (benchmarks/movielens_baseline.py) | – | {base['test_auc']:.4f} | {base['test_ne']:.4f} | {base['eval_ne']:.4f} | – | – |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("run", "report"))
    ap.add_argument("--out", type=Path, default=Path("runs/ml-quality"))
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--baseline", type=Path, default=None, help="JSON written by movielens_baseline.py --json")
    args = ap.parse_args(argv)
    if args.command == "run":
        towers = [t for t in args.towers.split(",") if t]
        unknown = sorted(set(towers) - set(TOWERS))
        if unknown:
            ap.error(f"--towers: unknown {unknown}; expected a subset of {list(TOWERS)}")
        runs = quality_runs(towers, [int(s) for s in args.seeds.split(",")])
        execute_all(runs, args.out, args.jobs, args.timeout)
    summary = summarise(args.out, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
