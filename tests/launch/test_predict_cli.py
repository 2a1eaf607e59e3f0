"""``kunlun predict``: score every example of a split with a checkpoint, to Parquet parts.

One tiny run (one process, ``keep_best=false``: the final test scored the last step) is
trained once per module; its ``latest`` checkpoint is scored on one and on two processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env, run_single
from kunlun.data.sources import build_source
from kunlun.trainer.config import load_config
from kunlun.trainer.metrics import auc

TRAIN = ["trainer.max_steps=10", "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=10", "checkpoint.keep_best=false"]
TEST_EXAMPLES = 2000  # configs/tiny.yaml; eval_batch_size 256: the last batch is padded


def kunlun_predict(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kunlun"), "predict", *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def read_parts(out: Path) -> Dict[str, np.ndarray]:
    """Every part's columns, concatenated (rank, then part order)."""
    parts = sorted(out.glob("part-r*-*.parquet"))
    assert parts, f"no parts in {out}: {sorted(p.name for p in out.iterdir())}"
    tables = [pq.read_table(p) for p in parts]
    assert all(t.schema.names == ["example", "label", "score"] for t in tables), tables[0].schema
    return {c: np.concatenate([t[c].to_numpy() for t in tables]) for c in ("example", "label", "score")}


def by_example(cols: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    order = np.argsort(cols["example"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    proc = run_single([f"run_dir={run}", *TRAIN])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def one_process(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "out_1"
    ok(kunlun_predict("--run-dir", str(run), "--checkpoint", "latest", "--split", "test", "--output", str(out)))
    return out


@pytest.mark.slow
def test_one_process_scores_every_test_example_once_and_reproduces_the_final_test_auc(run, one_process):
    final = final_metrics(run)
    assert final["test/step"] == final["train/step"] == 10  # keep_best=false: the last step was tested
    cols = read_parts(one_process)
    assert cols["example"].dtype == np.int64 and cols["score"].dtype == np.float64
    assert np.array_equal(np.sort(cols["example"]), np.arange(TEST_EXAMPLES))  # each example exactly once, no padding
    assert ((cols["score"] > 0) & (cols["score"] < 1)).all()
    assert set(np.unique(cols["label"]).tolist()) <= {0.0, 1.0}
    # each row's label is the label of the example it names (reads the split through the run's own source)
    cfg = load_config(str(run / "config.yaml"), [])
    by = by_example(cols)
    want_labels = np.asarray(build_source(cfg.data, cfg.seed).read("test", by["example"]).labels, dtype=np.float32).reshape(-1)
    assert np.array_equal(by["label"], want_labels)
    got = auc(torch.from_numpy(cols["score"]), torch.from_numpy(cols["label"].astype(np.float64)))
    assert abs(got - final["test/auc"]) < 1e-6, (got, final["test/auc"])

    success = json.loads((one_process / "_SUCCESS.json").read_text())
    assert success["rows"] == TEST_EXAMPLES and success["world_size"] == 1 and success["split"] == "test"
    assert success["step"] == 10 and success["checkpoint"] == str((run / "checkpoints" / "step_00000010").resolve())
    assert success["parts"] == ["part-r0-00000.parquet"]
    assert not list(one_process.glob(".tmp-*"))


@pytest.mark.slow
def test_two_ranks_through_torchrun_write_the_same_rows_and_scores(run, one_process, tmp_path):
    out = tmp_path / "out_2"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "kunlun.launch.predict_cli"]
    cmd += ["--run-dir", str(run), "--output", str(out), "--rows-per-part", "300"]
    ok(subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300))
    names = sorted(p.name for p in out.glob("part-*"))
    assert {n.split("-")[1] for n in names} == {"r0", "r1"} and len(names) > 2, names  # both ranks, several parts each
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["rows"] == TEST_EXAMPLES and sum(success["rows_per_rank"]) == TEST_EXAMPLES
    assert success["parts"] == names

    two, one = by_example(read_parts(out)), by_example(read_parts(one_process))
    assert np.array_equal(two["example"], np.arange(TEST_EXAMPLES))  # union of the parts, no duplicates
    assert np.array_equal(two["label"], one["label"])
    assert np.abs(two["score"] - one["score"]).max() < 1e-6


@pytest.mark.slow
def test_existing_output_is_refused_unless_overwrite(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-r0-00000.parquet").write_bytes(b"old")
    (out / "part-r7-00003.parquet").write_bytes(b"stale part of a bigger world")
    proc = kunlun_predict("--run-dir", str(run), "--output", str(out))
    assert proc.returncode == 2 and str(out) in proc.stderr and "--overwrite" in proc.stderr, proc.stderr[-3000:]
    assert (out / "part-r0-00000.parquet").read_bytes() == b"old"

    ok(kunlun_predict("--run-dir", str(run), "--output", str(out), "--split", "valid", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS.json", "part-r0-00000.parquet"]  # the stale part is gone
    assert json.loads((out / "_SUCCESS.json").read_text())["split"] == "eval"
    assert len(read_parts(out)["example"]) == 2000  # the tiny validation split, all of it

    (out / "notes.txt").write_text("mine")  # a folder with other files: --overwrite refuses it
    proc = kunlun_predict("--run-dir", str(run), "--output", str(out), "--overwrite")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr, proc.stderr[-3000:]
    assert (out / "notes.txt").exists()


def test_kunlun_help_lists_predict():
    proc = subprocess.run([str(BIN / "kunlun"), "--help"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "kunlun predict --run-dir" in proc.stdout
