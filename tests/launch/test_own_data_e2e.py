"""End to end: a user's Parquet data set, its schema declared in YAML, trained with
``torchx run`` on 2 CPU ranks, and described by ``kunlun data inspect``.

The data (``own_data``): users, items, ``click`` and ``purchase`` histories and a label drawn
from how well the target item's category matches the categories in the histories (nothing
else), so the AUC asserted can only come from the history features.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env
from kunlun.trainer.metrics import auc
from own_data import write_dataset

MODEL = """\
run_dir: runs/own-data
model:
  tower: dlrm
  embedding_dim: 16
  dlrm:
    bottom_mlp: [16]
    top_mlp: [64, 32]
optim:
  sparse_lr: 0.05
  dense_lr: 0.003
trainer:
  max_steps: 100
  eval_every_n_steps: 50
checkpoint:
  every_n_steps: 0
  keep: 1
logging:
  log_every_n_steps: 25
  progress_bar: false
"""


@pytest.mark.slow
def test_own_parquet_data_trains_through_torchx_on_two_ranks_and_inspects(tmp_path):
    files = write_dataset(tmp_path / "data")  # train 12,000 rows in 3 files, eval and test 2,000 each
    job = tmp_path / "data" / "job.yaml"
    job.write_text(job.read_text() + MODEL)
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "torchx"), "run", "-s", "local_cwd", "./launch/components.py:train", "-j", "1x2", "--config", str(job), f"run_dir={run}"],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "world 2 (gloo on cpu)" in out
    # the item and category tables are shared by context and sequences: they live in the EC only
    plan = out.split("sharding plan (2 ranks):")[1].split("parameters:")[0]
    assert "ec     seq_item" in plan and "ec     seq_category" in plan and "ctx_item" not in plan and "ctx_category" not in plan
    metrics = final_metrics(run)
    test = pa.concat_tables([pq.read_table(p) for p in files["test"]])
    labels = torch.tensor(test.column("clicked").to_pylist(), dtype=torch.float32)
    oracle = auc(torch.tensor(test.column("affinity").to_pylist()), labels)  # ranking by the true affinity
    print(f"test AUC {metrics['test/auc']:.4f} (oracle {oracle:.4f}), eval AUC {metrics['eval/auc']:.4f}")
    assert metrics["test/auc"] > 0.75 and metrics["eval/auc"] > 0.75  # chance is 0.5
    assert metrics["test/auc"] > oracle - 0.1
    assert metrics["train/examples_consumed"] == 100 * 128

    proc = subprocess.run([str(BIN / "kunlun"), "data", "inspect", "--config", str(job)], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.split("columns")[0].splitlines() if line.startswith(("train", "eval", "test"))}
    for split, n in (("train", 12000), ("eval", 2000), ("test", 2000)):
        rate = np.mean(pa.concat_tables([pq.read_table(p) for p in files[split]]).column("clicked").to_numpy())
        chunks = {"train": 12, "eval": 2, "test": 2}[split]  # 1,000-row row groups
        assert rows[split][1:5] == [str(len(files[split])), str(chunks), f"{n:,}", f"{rate:.4f}"]
        assert rows[split][5] == "0"  # no bad rows
