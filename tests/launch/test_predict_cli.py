"""``kunlun predict``: score every example of a split with a checkpoint, to Parquet parts.

One tiny run (one process, ``keep_best=false``: the final test scored the last step) is
trained once per module; its ``latest`` checkpoint is scored on one and on two processes
(torchrun, torchx), interrupted and resumed, with and without a progress bar. File-source
features (``--columns``, ``--input``) are tested in ``test_predict_files.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
import threading
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env, run_single, run_torchx
from kunlun.data.sources import build_source
from kunlun.trainer.config import load_config
from kunlun.trainer.metrics import auc

TRAIN = ["trainer.max_steps=10", "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=10", "checkpoint.keep_best=false"]
TEST_EXAMPLES = 2000  # configs/tiny.yaml; eval_batch_size 256: the last batch is padded


STOP = "KUNLUN_PREDICT_STOP_AFTER_PARTS"  # predict_cli's hook: exit (status 3) after K parts, as if killed


def kunlun_predict(*args: str, timeout: int = 300, env: Dict[str, str] = {}) -> subprocess.CompletedProcess:  # noqa: B006 - read only
    return subprocess.run([str(BIN / "kunlun"), "predict", *args], cwd=REPO, env={**job_env(), **env}, capture_output=True, text=True, timeout=timeout)


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
    assert sorted(p.name for p in out.iterdir()) == ["_PREDICT.json", "_SUCCESS.json", "part-r0-00000.parquet"]  # the stale part is gone
    assert json.loads((out / "_SUCCESS.json").read_text())["split"] == "eval"
    assert len(read_parts(out)["example"]) == 2000  # the tiny validation split, all of it

    (out / "notes.txt").write_text("mine")  # a folder with other files: --overwrite refuses it
    proc = kunlun_predict("--run-dir", str(run), "--output", str(out), "--overwrite")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr, proc.stderr[-3000:]
    assert (out / "notes.txt").exists()


def part_tables(out: Path) -> Dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("part-r*-*.parquet"))}


def written_parts(log: str) -> List[str]:
    """The parts a run wrote, from its per-part log lines (rank 0's: the console)."""
    return [line.split()[2].rstrip(":") for line in log.splitlines() if line.startswith("[kunlun] part part-")]


@pytest.mark.slow
def test_resume_scores_only_the_missing_parts_and_equals_an_uninterrupted_run(run, tmp_path):
    args = ["--run-dir", str(run), "--rows-per-part", "300"]  # 256-row batches, 2 per part: 4 parts
    full, out = tmp_path / "full", tmp_path / "out"
    ok(kunlun_predict(*args, "--output", str(full)))
    want = part_tables(full)
    assert list(want) == [f"part-r0-{k:05d}.parquet" for k in range(4)]

    proc = kunlun_predict(*args, "--output", str(out), env={STOP: "2"})  # interrupted after 2 parts
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["_PREDICT.json", "part-r0-00000.parquet", "part-r0-00001.parquet"]
    request = json.loads((out / "_PREDICT.json").read_text())
    assert request["rows_per_part"] == 300 and request["world_size"] == 1 and request["split"] == "test" and request["split_examples"] == TEST_EXAMPLES

    proc = kunlun_predict(*args, "--output", str(out))
    assert proc.returncode == 2 and "--resume" in proc.stderr, proc.stderr[-3000:]
    for other, what in ((["--rows-per-part", "200"], "rows_per_part: 300 there, 200 now"), (["--split", "valid"], "split: 'test' there, 'eval' now")):
        proc = kunlun_predict(*args, *other, "--output", str(out), "--resume")
        assert proc.returncode == 2 and "--resume refused" in proc.stderr and what in proc.stderr, proc.stderr[-3000:]
    proc = kunlun_predict(*args, "--output", str(out), "--resume", "--overwrite")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr, proc.stderr[-3000:]

    log = ok(kunlun_predict(*args, "--output", str(out), "--resume"))
    assert written_parts(log) == ["part-r0-00002.parquet", "part-r0-00003.parquet"]  # only the missing ones
    got = part_tables(out)
    assert list(got) == list(want) and all(got[k].equals(want[k]) for k in want)
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["parts_kept"] == 2 and success["rows"] == TEST_EXAMPLES and success["parts"] == list(want)

    (out / "part-r0-00001.parquet").unlink()  # a lost part in the middle
    (out / ".tmp-part-r0-00003.parquet").write_bytes(b"half written")
    log = ok(kunlun_predict(*args, "--output", str(out), "--resume"))
    assert written_parts(log) == ["part-r0-00001.parquet"]
    got = part_tables(out)
    assert list(got) == list(want) and all(got[k].equals(want[k]) for k in want)
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_torchx_component_on_two_ranks_interrupted_and_resumed_scores_every_example_once(run, one_process, tmp_path):
    out = tmp_path / "out_torchx"
    base = ["run", "-s", "local_cwd", "./launch/components.py:predict", "-j", "1x2", "--run_dir", str(run), "--output", str(out), "--rows_per_part", "300"]
    proc = run_torchx(*base[:4], "--env", f"{STOP}=1", *base[4:])  # every rank stops after its first part
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-r0-00000.parquet", "part-r1-00000.parquet"] and not (out / "_SUCCESS.json").exists()

    ok(run_torchx(*base, "--resume", "True"))
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["rows"] == TEST_EXAMPLES and success["parts_kept"] == 2
    names = sorted(p.name for p in out.glob("part-*"))
    assert success["parts"] == names and len(names) == 6  # 8 batches, 3 per part: 3 parts per rank
    two, one = by_example(read_parts(out)), by_example(read_parts(one_process))
    assert np.array_equal(two["example"], np.arange(TEST_EXAMPLES))  # every example exactly once
    assert np.array_equal(two["label"], one["label"])
    assert np.abs(two["score"] - one["score"]).max() < 1e-6


def _stderr_on_a_tty(cmd: List[str]) -> str:
    """Run ``cmd`` with stderr on a pseudo-terminal (as in an interactive shell); what it wrote there."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 0x0 terminal gets an empty bar
    chunks: List[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=secondary, timeout=300)
    finally:
        os.close(secondary)
    reader.join(timeout=10)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + text[-3000:]
    return text


@pytest.mark.slow
def test_progress_bar_on_a_terminal_unless_no_progress(run, tmp_path):
    cmd = [str(BIN / "kunlun"), "predict", "--run-dir", str(run), "--rows-per-part", "300"]
    bar = _stderr_on_a_tty([*cmd, "--output", str(tmp_path / "a")])
    assert "predict: 100%" in bar and "2.00k/2.00k" in bar and "row/s" in bar, bar[-2000:]
    assert "predict:" not in _stderr_on_a_tty([*cmd, "--output", str(tmp_path / "b"), "--no-progress"])


def test_columns_and_input_are_refused_for_built_in_sources(run, tmp_path):
    proc = kunlun_predict("--run-dir", str(run), "--output", str(tmp_path / "o"), "--columns", "user_id")
    assert proc.returncode == 2 and "--columns" in proc.stderr and "data.source=synthetic" in proc.stderr, proc.stderr[-3000:]
    proc = kunlun_predict("--run-dir", str(run), "--output", str(tmp_path / "o"), "--input", str(tmp_path))
    assert proc.returncode == 2 and "--input" in proc.stderr and "data.source=synthetic" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


def test_predict_component_runs_the_predict_entry_point_on_every_rank():
    from kunlun.launch.components import predict as predict_component

    where = dict(run_dir="/shared/runs/a", output="/shared/scores", input="/data/new/*.parquet")
    app = predict_component("parallel.sparse.strategy=1d", **where, columns="request_id,user_id", resume=True, j="2x4")
    cmd = app.roles[0].args[-1]
    assert "--nnodes 2 --nproc_per_node 4" in cmd
    assert "-m kunlun.launch.predict_cli --run-dir /shared/runs/a --output /shared/scores --checkpoint latest --rows-per-part 1000000 --no-progress" in cmd
    assert "--input '/data/new/*.parquet' --columns request_id,user_id --resume parallel.sparse.strategy=1d" in cmd
    assert "--split" not in cmd and "--overwrite" not in cmd


def test_kunlun_help_lists_predict():
    proc = subprocess.run([str(BIN / "kunlun"), "--help"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "kunlun predict --run-dir" in proc.stdout
    for flag in ("--input GLOB", "--resume", "--columns"):
        assert flag in proc.stdout, flag
