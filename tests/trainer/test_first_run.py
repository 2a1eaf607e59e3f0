"""First-run behaviour: early stopping, the best checkpoint and the final test on it, what the
console shows (epochs, FLOPs units, no library noise), and ``make data`` for non-MovieLens jobs."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest

from jobs import BIN, REPO, final_metrics, job_env, run_single
from kunlun.trainer.early_stopping import BestTracker
from kunlun.trainer.perf import format_flops
from own_data import write_dataset

# ---------------------------------------------------------------------- tracker


def test_tracker_direction_delta_patience_and_nonfinite():
    ne = BestTracker("eval/ne", "auto", patience=2, min_delta=0.01)
    assert ne.mode == "min"
    assert ne.update(10, {"ne": 0.90})  # first evaluation is the best so far
    assert not ne.update(20, {"ne": 0.895})  # better, but by less than min_delta
    assert ne.update(30, {"ne": 0.88}) and ne.best_step == 30 and ne.evals_without_improvement == 0
    assert not ne.update(40, {"ne": math.nan})  # a diverged model never becomes the best
    assert not ne.stopped
    assert not ne.update(50, {"ne": 0.95}) and ne.stopped  # 2 evaluations without improvement
    assert ne.best_metrics == {"ne": 0.88}

    auc = BestTracker("eval/auc", "auto")
    assert auc.mode == "max"
    auc.update(1, {"auc": 0.7})
    assert auc.update(2, {"auc": 0.71}) and not auc.update(3, {"auc": 0.69})
    assert not auc.stopped  # patience 0: never stops
    assert BestTracker("eval/auc", "min").mode == "min"  # explicit mode wins


def test_tracker_state_round_trip_and_patience_change():
    a = BestTracker("eval/ne", patience=3)
    for step, v in ((5, 0.9), (10, 0.8), (15, 0.85), (20, 0.86)):
        a.update(step, {"ne": v})
    state = json.loads(json.dumps(a.state_dict()))  # travels as JSON in meta.json
    b = BestTracker("eval/ne", patience=3)
    b.load_state_dict(state)
    assert (b.best_step, b.best_value, b.evals_without_improvement) == (10, 0.8, 2)
    assert not b.update(20, {"ne": 0.1})  # the same evaluation again: ignored, not counted
    b.update(25, {"ne": 0.9})
    assert b.stopped
    longer = BestTracker("eval/ne", patience=5)  # resuming a stopped run with more patience trains on
    longer.load_state_dict(b.state_dict())
    assert not longer.stopped and longer.evals_without_improvement == 3
    other = BestTracker("eval/auc")  # another metric: the old history is not comparable
    other.load_state_dict(b.state_dict())
    assert other.best_step is None


def test_format_flops_shows_small_towers():
    assert format_flops(1.52e6) == "1.52 MFLOPs"
    assert format_flops(3.4e9) == "3.4 GFLOPs"
    assert format_flops(812.0) == "812 FLOPs"
    assert format_flops(2.5e13) == "25 TFLOPs"


# ------------------------------------------------------------------ whole runs
# min_delta=10 makes only the first evaluation an improvement, so with evaluations every
# 5 steps and patience 2 a run must stop at step 15 with its best at step 5.
EARLY = [
    "trainer.eval_every_n_steps=5",
    "trainer.early_stopping.patience=2",
    "trainer.early_stopping.min_delta=10",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep=1",
    "logging.log_every_n_steps=5",
    "logging.progress_bar=false",
]


def _ok(proc):
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_early_stopping_keeps_best_checkpoint_tests_it_and_resumes_with_its_state(tmp_path):
    a = tmp_path / "a"
    proc = _ok(run_single([f"run_dir={a}", "trainer.max_steps=100", *EARLY]))
    out = proc.stdout
    m = final_metrics(a)
    assert m["train/step"] == 15 and m["train/stopped_early"] == 1.0
    assert m["best/step"] == 5 and m["test/step"] == 5
    assert "early stopping at step 15" in out
    assert re.search(r"test @ best step 5: auc", out), out[-2000:]
    # keep=1 keeps the newest checkpoint; the best one is kept apart and never rotated away.
    ckpts = sorted(p.name for p in (a / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000005", "step_00000015"], ckpts
    assert json.loads((a / "checkpoints" / "best.json").read_text())["checkpoint"] == "step_00000005"
    meta = json.loads((a / "checkpoints" / "step_00000015" / "meta.json").read_text())
    assert meta["early_stopping"]["best_step"] == 5 and meta["early_stopping"]["evals_without_improvement"] == 2

    # The test metrics are those of step 5's weights: a run that stops at step 5 agrees.
    c = tmp_path / "c"
    _ok(run_single([f"run_dir={c}", "trainer.max_steps=5", "checkpoint.keep_best=false", *EARLY[:1], *EARLY[3:]]))
    mc = final_metrics(c)
    for k in ("test/auc", "test/ne", "test/logloss", "eval/auc", "eval/ne"):
        assert m[k] == pytest.approx(mc[k], abs=1e-7), k
    assert m["last_eval/ne"] != pytest.approx(m["eval/ne"], abs=1e-6)  # the last step really differs

    # Interrupted after one evaluation without improvement, then resumed: the counter is
    # restored, so it stops at 15 exactly like the uninterrupted run (a reset would give 20).
    b = tmp_path / "b"
    _ok(run_single([f"run_dir={b}", "trainer.max_steps=10", *EARLY]))
    assert final_metrics(b)["train/stopped_early"] == 0.0
    proc = _ok(run_single([f"run_dir={b}", "trainer.max_steps=100", *EARLY]))
    mb = final_metrics(b)
    assert mb["train/step"] == 15 and mb["best/step"] == 5 and mb["train/stopped_early"] == 1.0
    for k in ("test/auc", "test/ne", "eval/ne", "last_eval/ne"):
        assert mb[k] == pytest.approx(m[k], abs=1e-7), k

    # Rerunning a stopped run trains no further and reports the same test.
    proc = _ok(run_single([f"run_dir={a}", "trainer.max_steps=100", *EARLY]))
    assert final_metrics(a)["test/auc"] == pytest.approx(m["test/auc"], abs=1e-7)
    assert "step 20" not in proc.stdout


def test_console_shows_epochs_and_flops_units_without_library_warnings(tmp_path):
    run = tmp_path / "r"
    proc = _ok(
        run_single(
            [
                f"run_dir={run}",
                "trainer.max_steps=10",
                "logging.log_every_n_steps=5",
                "trainer.eval_every_n_steps=0",
                "checkpoint.every_n_steps=0",
                "logging.progress_bar=false",
            ]
        )
    )
    console = proc.stdout + proc.stderr
    # tiny preset: 20,000 train examples, global batch 64 → 312.5 steps per epoch
    assert "one epoch = 20,000 train examples = 312.5 steps" in console
    assert re.search(r"step 10 \| epoch 1 \(0\.03\)", console), console[-2000:]
    assert re.search(r"tower dlrm: \d+(\.\d+)? kFLOPs/example forward", console), console[-2000:]
    assert "0.0000" not in console
    # TorchRec's planner and torch.fx warn on every healthy run: log file only.
    log_file = (run / "logs" / "rank0.log").read_text()
    for noise in ("TopologyFactory", "is_fx_tracing"):
        assert noise in log_file, noise  # still recorded ...
        assert noise not in console, noise  # ... but not shown
    assert final_metrics(run)["train/epochs"] == pytest.approx(640 / 20000)


def test_early_stopping_metric_errors_name_key_and_value(tmp_path):
    proc = run_single([f"run_dir={tmp_path}", "trainer.early_stopping.metric=test/auc"])
    assert proc.returncode == 2
    assert "trainer.early_stopping.metric" in proc.stderr and "'test/auc'" in proc.stderr and "validation" in proc.stderr
    proc = run_single([f"run_dir={tmp_path}", "trainer.early_stopping.metric=eval/click/auc"])
    assert proc.returncode == 2 and "task 'click' is not one of the tasks ['label']" in proc.stderr
    proc = run_single([f"run_dir={tmp_path}", "trainer.early_stopping.patience=3", "trainer.eval_every_n_steps=0"])
    assert proc.returncode == 2 and "trainer.early_stopping.patience" in proc.stderr


# ------------------------------------------------------------------- make data


def test_make_data_fetches_nothing_for_a_parquet_job(tmp_path):
    """A Parquet job must not need MovieLens (nor the package index) before training."""
    write_dataset(tmp_path / "data", train_rows=600, eval_rows=100, test_rows=100, train_files=1)
    cache = tmp_path / "cache"
    env = job_env()
    env.update(KUNLUN_CACHE=str(cache), PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1")
    proc = subprocess.run(
        ["make", "data", f"CONFIG={tmp_path / 'data' / 'job.yaml'}", f"PYTHON={BIN / 'python'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data.source=parquet: nothing to download" in proc.stdout
    assert not (cache / "ml-100k").exists()
    # make train runs the same step with the job's own config and overrides first.
    proc = subprocess.run(["make", "-n", "train", "CONFIG=my.yaml", "ARGS=data.batch_size=64"], cwd=REPO, capture_output=True, text=True)
    assert "kunlun.launch.prepare --config my.yaml data.batch_size=64" in proc.stdout
    assert proc.stdout.index("kunlun.launch.prepare") < proc.stdout.index("torchx run")


def test_prepare_reports_a_bad_config_like_training(tmp_path):
    env = job_env()
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "kunlun.launch.prepare", "--config", "movielens", "data.source=mystery"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "data.source" in proc.stderr and "mystery" in proc.stderr
