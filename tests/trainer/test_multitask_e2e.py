"""Multi-task, multi-domain job end to end (issue #14): 2 ranks through ``torchx run`` on the
synthetic multi-task signal (click and like binary, watch regression, 3 domains, 30% of the
like/watch labels missing) with an MMoE and domain-aware experts; then its checkpoint is
scored in one process by ``kunlun predict`` and by a ``kunlun export`` folder.

Checks: every task's and every domain's metrics in ``final_metrics.json`` and in TensorBoard
(read back with TensorBoard's reader), the per-task console summary, predict's per-task
columns (probabilities for binary tasks, predictions for regression, missing labels kept as
NaN), and the export scoring every task like predict.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import BIN, REPO, final_metrics, job_env, run_torchx

TASKS = {"click": "binary", "like": "binary", "watch": "regression"}
JOB = [
    "data.synthetic.multitask.tasks=[click,like,watch]",
    "data.synthetic.multitask.regression=[watch]",
    "data.synthetic.multitask.missing_rate=0.3",
    "model.tasks=[{name: click, type: binary}, {name: like, type: binary, weight: 0.5}, {name: watch, type: regression, loss: huber}]",
    "model.multitask.mixer=mmoe",
    "model.multitask.domain_feature=domain",
    "trainer.max_steps=30",
    "trainer.eval_every_n_steps=15",
    "trainer.early_stopping.metric=eval/click/auc",
    "checkpoint.every_n_steps=15",
    "checkpoint.keep_best=false",
    "logging.progress_bar=false",
]


def kunlun(*args: str) -> str:
    proc = subprocess.run([str(BIN / "kunlun"), *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mt") / "run"
    proc = run_torchx("run", "-s", "local_cwd", "./launch/components.py:train", "-j", "1x2", "--config", "tiny", f"run_dir={run}", *JOB)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return run, out


@pytest.mark.slow
def test_two_rank_multitask_run_reports_every_task_and_domain(run):
    run, out = run
    final = final_metrics(run)
    for split in ("eval", "test"):
        for task, kind in TASKS.items():
            names = ("auc", "ne", "logloss") if kind == "binary" else ("mse", "mae")
            for m in names:
                assert np.isfinite(final[f"{split}/{task}/{m}"]), f"{split}/{task}/{m}"
                for domain in (1, 2, 3):
                    assert np.isfinite(final[f"{split}/{task}/{domain}/{m}"]), f"{split}/{task}/{domain}/{m}"
        # plain names: the mean over the binary tasks
        assert final[f"{split}/auc"] == pytest.approx((final[f"{split}/click/auc"] + final[f"{split}/like/auc"]) / 2)
    # like's labels are 30% missing: fewer labelled examples than click's, per domain too
    assert sum(final[f"test/like/{d}/examples"] for d in (1, 2, 3)) < 0.8 * sum(final[f"test/click/{d}/examples"] for d in (1, 2, 3))
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("eval/click/auc", "eval/like/ne", "eval/watch/mse", "eval/watch/mae", "eval/click/2/auc", "eval/watch/3/mse", "test/like/logloss"):
        assert tag in tags, f"{tag} not in {sorted(t for t in tags if t.startswith(('eval/', 'test/')))[:20]}"
    assert [e.step for e in acc.Scalars("eval/watch/mse")] == [15, 30]
    assert "|| click: auc" in out and "|| watch: mse" in out  # the console's per-task summary


@pytest.mark.slow
def test_predict_and_export_score_every_task(run, tmp_path):
    run, _ = run
    kunlun("predict", "--run-dir", str(run), "--output", str(tmp_path / "pred"))
    table = pq.read_table(sorted((tmp_path / "pred").glob("part-*.parquet")))
    cols = set(table.column_names)
    assert cols == {"example"} | {f"{k}/{t}" for t in TASKS for k in ("label", "score")}, cols
    order = np.argsort(table["example"].to_numpy())
    score = {t: table[f"score/{t}"].to_numpy()[order] for t in TASKS}
    label = {t: table[f"label/{t}"].to_numpy()[order] for t in TASKS}
    assert ((score["click"] > 0) & (score["click"] < 1)).all()
    assert (score["watch"] < 0).any() and (score["watch"] > 0).any()  # a prediction, not a probability
    assert 0.2 < np.isnan(label["like"]).mean() < 0.4 and not np.isnan(label["click"]).any()

    kunlun("export", "--run-dir", str(run), "--out", str(tmp_path / "export"))
    from kunlun.data.sources import build_source
    from kunlun.serving import load
    from kunlun.trainer.config import load_config

    model = load(tmp_path / "export")
    assert model.task_names == list(TASKS)
    cfg = load_config(str(run / "config.yaml"), [])
    block = build_source(cfg.data, cfg.seed).read("test", np.arange(len(order)))
    served = model.score(block).double().numpy()
    for j, t in enumerate(TASKS):
        assert np.abs(served[:, j] - score[t]).max() <= 1e-5, t


@pytest.mark.slow
def test_resumed_multitask_run_ends_like_an_uninterrupted_one(tmp_path):
    """Stop at step 15 (a checkpoint), start again to 30: every task's and domain's final
    metrics equal an uninterrupted 30-step run's (task heads, gates, calibration and the
    data position all come back from the checkpoint)."""
    from jobs import run_single

    job = [o for o in JOB if not o.startswith("trainer.max_steps")]
    whole = run_single([f"run_dir={tmp_path / 'whole'}", *job, "trainer.max_steps=30"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_single([f"run_dir={tmp_path / 'parts'}", *job, "trainer.max_steps=15"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_single([f"run_dir={tmp_path / 'parts'}", *job, "trainer.max_steps=30"])
    assert second.returncode == 0 and "resumed from" in second.stdout + second.stderr, second.stderr[-3000:]
    a, b = final_metrics(tmp_path / "whole"), final_metrics(tmp_path / "parts")
    keys = [k for k in a if k.startswith(("eval/", "test/")) and k.count("/") >= 2]
    assert len(keys) > 40
    for k in keys:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
