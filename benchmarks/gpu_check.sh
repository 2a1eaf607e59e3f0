#!/usr/bin/env bash
# The one prepared GPU run (issue #11): on a machine with one NVIDIA GPU, torch, triton and
# pytest — no torchrec, no omegaconf — in at most 8 minutes:
#   1. the GPU correctness tests of gdpa and jagged_attention (fp32 and bf16, forward and
#      backward, compiled Triton kernels against the PyTorch references);
#   2. ops_bench: both ops against SDPA at production shapes (bf16);
#   3. train_bench: the kunlun, hstu and interformer towers in bf16 (autocast, fp32 weights),
#      eager and torch.compile'd.
# Writes $OUT/summary.json, $OUT/summary.md and $OUT/gpu_check.log when OUT is set (the
# device tool), else runs/gpu_check/. Every step has its own time limit, so the script ends
# in time even when one step hangs; a failed step is recorded and the next one still runs.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/runs/gpu_check}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT" "$WORK/pkg"
ln -sfn "$REPO" "$WORK/pkg/kunlun"  # the checkout is the package `kunlun` (no install needed)
export PYTHONPATH="$WORK/pkg:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: >"$LOG"
START=$(date +%s)

run_step() {  # run_step NAME SECONDS CMD...: output to the log, status to steps.jsonl
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  (cd "$REPO" && timeout "$limit" "$@") >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - t0))s (total $(($(date +%s) - START))s)" | tee -a "$LOG"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$WORK/steps.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$LOG" 2>&1

run_step tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/model/test_gdpa.py tests/model/test_jagged_attention.py
run_step ops_gdpa 40 "$PY" benchmarks/ops_bench.py --op gdpa --lens 1024 --kv 128,256 --impls triton,sdpa --out "$WORK/ops_gdpa"
run_step ops_attention 40 "$PY" benchmarks/ops_bench.py --op jagged_attention --lens 1024 --window 64 --impls triton,sdpa --out "$WORK/ops_attention"
for tower in kunlun hstu interformer; do
  run_step "train_${tower}_eager" 30 "$PY" benchmarks/train_bench.py --tower "$tower" --precision bf16 --steps 10 --trace "$WORK/train_${tower}_eager"
  run_step "train_${tower}_compiled" 55 "$PY" benchmarks/train_bench.py --tower "$tower" --precision bf16 --compile --steps 10 --trace "$WORK/train_${tower}_compiled"
done

"$PY" - "$WORK" "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
summary = {"steps": steps, "ops": {}, "train": {}}
for name in ("ops_gdpa", "ops_attention"):
    files = sorted((work / name).glob("*.json")) if (work / name).exists() else []
    summary["ops"][name] = json.loads(files[0].read_text())["rows"] if files else None
for f in sorted(work.glob("train_*/train_bench_*.json")):
    summary["train"][f.parent.name] = json.loads(f.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=1))

md = ["# gpu_check", "", "| step | exit | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
md += ["", "| run | step ms | examples/s | MFU (datasheet, compute dtype) | MFU vs probe |", "|---|---|---|---|---|"]
for name, r in summary["train"].items():
    md.append(f"| {name} | {r['step_ms']:.1f} | {r['examples_per_sec']:.0f} | {100 * r['mfu']:.1f}% | {100 * r['mfu_vs_probe']:.1f}% |")
for name, rows in summary["ops"].items():
    if not rows:
        continue
    md += ["", f"## {name}", "", "| impl | L | n_kv / window | fwd ms | fwd+bwd ms | fwd TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r.get('impl')} | {r.get('L')} | | error: {r['error']} | | |")
            continue
        md.append(f"| {r['impl']} | {r['L']} | {r.get('n_kv', r.get('window'))} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['fwd_tflops']:.1f} |")
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
rm -rf "$WORK"
echo "gpu_check: $(($(date +%s) - START))s; results in $OUT" | tee -a "$LOG"
