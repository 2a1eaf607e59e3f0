"""``kunlun predict`` on a run over the user's own Parquet files (``own_data``): raw
pass-through ``--columns`` and ``--input`` (other files, with or without labels, Parquet or CSV).

One small run (one process, 10 steps, ``keep_best=false``) is trained once per module; its
scores of the test split (one file, 400-row row groups) are the reference every ``--input``
run must reproduce exactly (same model, same rows, one process).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import BIN, REPO, job_env, run_single
from own_data import csv_text, write_dataset

MODEL = """\
model:
  tower: dlrm
  embedding_dim: 16
  dlrm:
    bottom_mlp: [16]
    top_mlp: [32]
trainer:
  max_steps: 10
  eval_every_n_steps: 10
checkpoint:
  every_n_steps: 10
  keep_best: false
logging:
  progress_bar: false
"""
TEST_ROWS = 1500  # eval_batch_size 512: 3 batches, the last one padded
RAW = ["user_id", "item_id", "ts", "tags", "notes", "affinity"]  # declared, list-valued, ignored and undeclared columns


def kunlun_predict(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kunlun"), "predict", *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def fails(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def read_sorted(out: Path) -> pa.Table:
    """Every part of ``out``, rows sorted by ``example``."""
    parts = sorted(out.glob("part-r*-*.parquet"))
    assert parts, sorted(p.name for p in out.iterdir())
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table.take(pa.array(np.argsort(table["example"].to_numpy(), kind="stable")))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Dict[str, object]:
    root = tmp_path_factory.mktemp("predict-files")
    files = write_dataset(root / "data", train_rows=3000, eval_rows=1000, test_rows=TEST_ROWS, train_files=2, row_group_size=400)
    job = root / "data" / "job.yaml"
    job.write_text(job.read_text() + MODEL)
    run = root / "run"
    proc = run_single([f"run_dir={run}"], config=str(job))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "run": run, "test": pq.read_table(files["test"][0])}


@pytest.fixture(scope="module")
def reference(data) -> pa.Table:
    """The test split scored with pass-through columns, in two parts of 1,024 and 476 rows."""
    out = data["root"] / "ref"
    ok(kunlun_predict("--run-dir", str(data["run"]), "--output", str(out), "--rows-per-part", "600", "--columns", ",".join(RAW)))
    assert sorted(p.name for p in out.glob("part-*")) == ["part-r0-00000.parquet", "part-r0-00001.parquet"]
    return read_sorted(out)


@pytest.mark.slow
def test_columns_copies_the_raw_file_values_of_each_scored_row(data, reference):
    test = data["test"]
    assert reference.schema.names == ["example", "label", "score", *RAW]
    assert np.array_equal(reference["example"].to_numpy(), np.arange(TEST_ROWS))
    for name in RAW:  # file row = example (one file): values and Arrow types as stored, not hashed ids
        assert reference[name].type == test.schema.field(name).type, name
        assert reference[name].to_pylist() == test[name].to_pylist(), name
    assert reference["item_id"].to_pylist()[:3] == test["item_id"].to_pylist()[:3] and min(reference["item_id"].to_pylist()) >= 10**12
    assert reference["label"].to_pylist() == [float(v) for v in test["clicked"].to_pylist()]
    assert json.loads((data["root"] / "ref" / "_SUCCESS.json").read_text())["columns"] == ["example", "label", "score", *RAW]


@pytest.mark.slow
def test_input_files_with_and_without_labels_score_like_the_split(data, reference, tmp_path):
    test = data["test"]
    labelled, bare = tmp_path / "labelled", tmp_path / "bare"
    labelled.mkdir()
    bare.mkdir()
    # The test rows in other files and row groups, the last 800 first: natural order reads
    # day_2 before day_10, and example e is the e-th row over the files in that order.
    pq.write_table(test.slice(700), labelled / "day_2.parquet", row_group_size=300)
    pq.write_table(test.slice(0, 700), labelled / "day_10.parquet", row_group_size=250)
    pq.write_table(test.drop_columns(["clicked"]), bare / "part.parquet", row_group_size=333)

    out = tmp_path / "out_labelled"
    ok(kunlun_predict("--run-dir", str(data["run"]), "--input", str(labelled / "*.parquet"), "--output", str(out), "--columns", "user_id,ts"))
    got = read_sorted(out)
    assert got.schema.names == ["example", "label", "score", "user_id", "ts"]
    assert np.array_equal(got["example"].to_numpy(), np.arange(TEST_ROWS))
    rows = pa.array((np.arange(TEST_ROWS) + 700) % TEST_ROWS)  # the test-split row of each example
    assert np.abs(got["score"].to_numpy() - reference.take(rows)["score"].to_numpy()).max() < 1e-6  # same model and rows
    assert got["label"].equals(reference.take(rows)["label"]) and got["ts"].equals(reference.take(rows)["ts"])
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["split"] is None and success["input"] == [str(labelled / "day_2.parquet"), str(labelled / "day_10.parquet")]

    out = tmp_path / "out_bare"
    ok(kunlun_predict("--run-dir", str(data["run"]), "--input", str(bare), "--output", str(out), "--columns", "user_id"))
    got = read_sorted(out)
    assert got.schema.names == ["example", "score", "user_id"]  # no label column to write
    assert np.array_equal(got["score"].to_numpy(), reference["score"].to_numpy())
    assert got["user_id"].equals(reference["user_id"])
    assert json.loads((out / "_SUCCESS.json").read_text())["columns"] == ["example", "score", "user_id"]


@pytest.mark.slow
def test_input_csv_files_pass_columns_through_as_text(data, reference, tmp_path):
    test = data["test"]
    cols = {name: test[name].to_pylist() for name in test.schema.names}
    names = test.schema.names
    (tmp_path / "labelled.csv").write_text(csv_text(cols, names))
    (tmp_path / "bare.csv").write_text(csv_text(cols, [n for n in names if n != "clicked"]))
    csv = ["data.source=csv", "data.files.csv.rows_per_block=333"]  # the Parquet run's schema, read as CSV
    for name, labels in (("labelled", True), ("bare", False)):
        out = tmp_path / f"out_{name}"
        where = ["--input", str(tmp_path / f"{name}.csv"), "--output", str(out)]
        ok(kunlun_predict("--run-dir", str(data["run"]), *where, "--columns", "item_id,price,tags", *csv))
        got = read_sorted(out)
        assert got.schema.names == ["example", *(["label"] if labels else []), "score", "item_id", "price", "tags"]
        assert np.array_equal(got["score"].to_numpy(), reference["score"].to_numpy())
        # CSV fields pass through as their text: "1000000000123", "" for a null price, "t1|t2"
        assert all(got[c].type == pa.string() for c in ("item_id", "price", "tags"))
        assert got["item_id"].to_pylist() == [str(v) for v in test["item_id"].to_pylist()]
        assert got["price"].to_pylist() == ["" if v is None else repr(v) for v in test["price"].to_pylist()]
        assert got["tags"].to_pylist() == ["|".join(v) for v in test["tags"].to_pylist()]


@pytest.mark.slow
def test_two_ranks_pass_the_columns_of_their_own_rows(data, reference, tmp_path):
    out = tmp_path / "out_2"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "kunlun.launch.predict_cli"]
    cmd += ["--run-dir", str(data["run"]), "--output", str(out), "--rows-per-part", "300", "--columns", ",".join(RAW)]
    ok(subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300))
    got = read_sorted(out)
    assert {p.name.split("-")[1] for p in out.glob("part-*")} == {"r0", "r1"}
    assert np.array_equal(got["example"].to_numpy(), np.arange(TEST_ROWS))
    assert np.abs(got["score"].to_numpy() - reference["score"].to_numpy()).max() < 1e-6
    for name in RAW:
        assert got[name].equals(reference[name]), name


@pytest.mark.slow
def test_bad_columns_and_inputs_exit_2_naming_them(data, tmp_path):
    run = str(data["run"])
    out = tmp_path / "out"
    proc = kunlun_predict("--run-dir", run, "--output", str(out), "--columns", "user_id,request_uuid")
    fails(proc, "--columns", "'request_uuid'", "the file's columns", "'user_id'", "'ts'")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--columns", "score"), "'score'", "output column")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--columns", "ts,,user_id"), "--columns", "empty name")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--input", str(tmp_path / "nothing" / "*.parquet")), "--input", "matches no files")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--input", str(tmp_path), "--split", "test"), "--split", "--input")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(data["test"].slice(0, 10), mixed / "a.parquet")
    pq.write_table(data["test"].slice(10, 10).drop_columns(["clicked"]), mixed / "b.parquet")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--input", str(mixed)), "b.parquet", "lacks", "clicked")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    fails(kunlun_predict("--run-dir", run, "--output", str(out), "--input", str(tmp_path / "broken.parquet")), "broken.parquet", "not a readable Parquet file")
    assert not out.exists()  # nothing written
