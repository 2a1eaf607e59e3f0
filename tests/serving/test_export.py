"""``kunlun export`` + ``kunlun.serving``: the exported model scores like the trainer.

Reference scores come from ``kunlun predict`` (the trainer's evaluation forward pass; its own
tests tie its Parquet scores to ``test/auc``). Runs are trained once per module:

* tiny synthetic preset (one process): fp32 export equals predict to 1e-5 and reproduces
  ``test/auc`` to 1e-5; fp16 and int8 tables within the stated bounds;
* MovieLens-100K (network policy, see conftest): fp32 parity;
* the user's own Parquet data (``own_data``): raw rows (a ``pyarrow.Table`` and a list of
  dicts) through the training-time id mapping equal predict; bad rows are clear errors;
* a 2D job on 2 ranks (torchrun): its checkpoint exports in one process and equals a
  1-process predict of the same checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env, run_single, run_torchrun
from kunlun.data.errors import DataError
from kunlun.data.sources import build_source
from kunlun.serving import ExportError, load
from kunlun.trainer.config import load_config
from kunlun.trainer.metrics import auc as _auc

TRAIN = ["trainer.max_steps=10", "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=10", "checkpoint.keep_best=false"]
FP32_TOL = 1e-5  # max |Δ probability|, exported fp32 tables vs the trainer
# Served and trainer scores differ by ~1e-7 (other kernels: plain lookups, the exported graph);
# a barely trained model's scores sit within ~0.01 of each other, so near-ties can flip pairs.
AUC_TOL = 1e-5
# Bounds for the stored table precisions (measured on the tiny preset: fp16 2e-6, int8 4.5e-5;
# MovieLens int8 5e-4, see BENCHMARKS.md "Serving export").
LOW_PRECISION_TOL = {"fp16": 1e-4, "int8": 2e-3}
LOW_PRECISION_AUC = 0.002  # |Δ test AUC| allowed by fp16/int8 tables


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return _auc(torch.as_tensor(scores), torch.as_tensor(labels))


def kunlun(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kunlun"), *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def predicted(run: Path, out: Path, *extra: str) -> Dict[str, np.ndarray]:
    """``kunlun predict`` of the test split of ``run``'s latest checkpoint, ordered by example."""
    ok(kunlun("predict", "--run-dir", str(run), "--split", "test", "--output", str(out), *extra))
    tables = [pq.read_table(p) for p in sorted(out.glob("part-r*-*.parquet"))]
    example = np.concatenate([t["example"].to_numpy() for t in tables])
    score = np.concatenate([t["score"].to_numpy() for t in tables])
    label = np.concatenate([t["label"].to_numpy() for t in tables])
    order = np.argsort(example)
    return {"example": example[order], "score": score[order], "label": label[order]}


def export(run: Path, out: Path, *extra: str) -> str:
    """``kunlun export`` in this process (``launch.export_cli.main``: the command's own code
    without a new interpreter's start-up); the CLI itself runs in ``tiny``."""
    rc, err = export_main("--run-dir", str(run), "--out", str(out), *extra)
    assert rc == 0, err[-5000:]
    return err


def export_main(*args: str):
    """``(exit status, stderr)`` of ``kunlun export args`` run in this process."""
    import contextlib
    import io

    from kunlun.launch.export_cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


class Proc:
    """An in-process command's result, shaped like ``subprocess.CompletedProcess``."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def served_scores(folder: Path, run: Path, n: int) -> np.ndarray:
    """``kunlun.serving`` scores of test examples 0..n-1, read through the run's own source."""
    cfg = load_config(str(run / "config.yaml"), [])
    block = build_source(cfg.data, cfg.seed).read("test", np.arange(n))
    return load(folder).score(block, batch_size=1000).double().numpy().reshape(-1)


# ------------------------------------------------------------------- tiny preset
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    proc = run_single([f"run_dir={run}", *TRAIN])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = predicted(run, root / "predict")
    exports = {}
    exports["fp32"] = root / "export-fp32"
    ok(kunlun("export", "--run-dir", str(run), "--out", str(exports["fp32"])))  # the command line, once
    for dtype in ("fp16", "int8"):
        exports[dtype] = root / f"export-{dtype}"
        export(run, exports[dtype], "--embedding-dtype", dtype)
    return run, ref, exports


@pytest.mark.slow
def test_tiny_fp32_export_scores_equal_the_trainer(tiny):
    run, ref, exports = tiny
    assert np.array_equal(ref["example"], np.arange(len(ref["example"])))
    got = served_scores(exports["fp32"], run, len(ref["example"]))
    diff = np.abs(got - ref["score"]).max()
    assert diff <= FP32_TOL, f"served vs predict: max |Δp| {diff:.3g}"
    assert abs(auc(got, ref["label"]) - final_metrics(run)["test/auc"]) <= AUC_TOL
    info = json.loads((exports["fp32"] / "manifest.json").read_text())
    assert info["step"] == 10 and set(info["files"]) >= {"tower.pt2", "tables.pt", "schema.json", "data.yaml", "config.yaml", "metrics.json"}
    assert torch.export.load(str(exports["fp32"] / "tower.pt2")).example_inputs is None  # no training examples in the artifact
    metrics = json.loads((exports["fp32"] / "metrics.json").read_text())
    assert metrics["step"] == 10 and metrics["test"]["test/auc"] == final_metrics(run)["test/auc"]  # keep_best=false: tested at 10


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_tiny_low_precision_tables_stay_within_their_bounds(tiny, dtype):
    run, ref, exports = tiny
    got = served_scores(exports[dtype], run, len(ref["example"]))
    diff = np.abs(got - ref["score"]).max()
    d_auc = auc(got, ref["label"]) - auc(ref["score"], ref["label"])
    print(f"{dtype}: max |Δp| {diff:.3g}, Δ test AUC {d_auc:+.5f}")
    assert 0 < diff <= LOW_PRECISION_TOL[dtype], f"{dtype}: max |Δp| {diff:.3g}"  # > 0: the tables really are stored at lower precision
    assert abs(d_auc) <= LOW_PRECISION_AUC
    sizes = {d: (exports[d] / "tables.pt").stat().st_size for d in exports}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.45 * sizes["fp32"], sizes


@pytest.mark.slow
def test_aoti_package_scores_like_the_exported_program(tiny, tmp_path):
    """``--aoti``: the tower compiled by AOTInductor (C++ on this machine) is what ``load``
    runs by default, and scores like the trainer; ``backend="export"`` still runs tower.pt2."""
    run, ref, exports = tiny
    export(run, tmp_path / "aoti", "--aoti")
    assert (tmp_path / "aoti" / "tower.aoti.pt2").is_file()
    assert load(tmp_path / "aoti").backend == "aoti" and load(tmp_path / "aoti", backend="export").backend == "export"
    got = served_scores(tmp_path / "aoti", run, len(ref["example"]))
    assert np.abs(got - ref["score"]).max() <= FP32_TOL
    with pytest.raises(ExportError, match="backend='aoti' needs an export made with --aoti"):
        load(exports["fp32"], backend="aoti")


@pytest.mark.slow
def test_damaged_export_is_detected_by_the_manifest(tiny, tmp_path):
    import shutil

    _, _, exports = tiny
    for case in ("flip", "truncate", "delete", "extra", "no manifest"):
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(exports["fp32"], folder)
        tables = folder / "tables.pt"
        if case == "flip":
            data = bytearray(tables.read_bytes())
            data[len(data) // 2] ^= 0xFF
            tables.write_bytes(bytes(data))
            want = "tables.pt: sha256 differs"
        elif case == "truncate":
            tables.write_bytes(tables.read_bytes()[:-10])
            want = "tables.pt: "
        elif case == "delete":
            (folder / "tower.pt2").unlink()
            want = "tower.pt2: listed in manifest.json but missing"
        elif case == "extra":
            (folder / "tables2.pt").write_bytes(b"x")
            want = "files not in manifest.json: ['tables2.pt']"
        else:
            (folder / "manifest.json").unlink()
            want = "manifest.json: missing"
        with pytest.raises(ExportError, match=want.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load(folder)


@pytest.mark.slow
def test_export_refuses_bad_requests_with_clear_errors(tiny, tmp_path):
    run, _, exports = tiny
    # another model than the checkpoint's
    proc = Proc(*export_main("--run-dir", str(run), "--out", str(tmp_path / "a"), "model.embedding_dim=8"))
    assert proc.returncode == 2 and "saved from a different model" in proc.stderr, proc.stderr[-2000:]
    assert "ctx_item.weight: checkpoint [400, 16] vs model [400, 8]" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".tmp-*"))
    proc = Proc(*export_main("--run-dir", str(run), "--out", str(tmp_path / "b"), "--embedding-dtype", "int4"))
    assert proc.returncode == 2 and "--embedding-dtype 'int4': expected one of ['fp32', 'fp16', 'int8']" in proc.stderr
    proc = Proc(*export_main("--run-dir", str(run), "--out", str(tmp_path / "c"), "data.id_policy=wrap"))
    assert proc.returncode == 2 and "data.id_policy" in proc.stderr and "'wrap'" in proc.stderr, proc.stderr[-2000:]
    # an existing output: refused without --overwrite; a folder that is not an export is never replaced
    proc = Proc(*export_main("--run-dir", str(run), "--out", str(exports["fp32"])))
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = Proc(*export_main("--run-dir", str(run), "--out", str(foreign), "--overwrite"))
    assert proc.returncode == 2 and "not a kunlun export" in proc.stderr and (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_serving_imports_and_scores_without_the_trainer_torchrec_or_fbgemm(tiny, tmp_path):
    """A fresh interpreter where importing the trainer, parallel, launch, TorchRec or FBGEMM
    fails loads the export and scores test rows (read through the synthetic source, numpy)."""
    run, ref, exports = tiny
    script = f"""
import sys, importlib.abc
BLOCKED = ("torchrec", "fbgemm_gpu", "kunlun.trainer", "kunlun.parallel", "kunlun.launch", "torch.distributed.checkpoint")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(BLOCKED):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np
from omegaconf import OmegaConf
import kunlun.serving as serving
from kunlun.data.config import DataConfig
from kunlun.data.sources.synthetic import SyntheticSource
model = serving.load({str(exports["fp32"])!r})
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load({str(exports["fp32"] / "data.yaml")!r})))
seed = OmegaConf.load({str(exports["fp32"] / "config.yaml")!r}).seed
block = SyntheticSource(cfg.synthetic, seed=seed).read("test", np.arange(64))
np.save({str(tmp_path / "scores.npy")!r}, model.score(block).double().numpy().reshape(-1))
print("loaded:", sorted(m for m in sys.modules if m.startswith(("torchrec", "fbgemm", "kunlun.trainer"))))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout
    got = np.load(tmp_path / "scores.npy")
    assert np.abs(got - ref["score"][:64]).max() <= FP32_TOL


# ------------------------------------------------------------------- MovieLens
@pytest.mark.slow
@pytest.mark.network
def test_movielens_export_scores_equal_the_trainer(tmp_path):
    run = tmp_path / "run"
    proc = run_single([f"run_dir={run}", "trainer.max_steps=10", "trainer.eval_every_n_steps=10", "checkpoint.keep_best=false"], config="movielens")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = predicted(run, tmp_path / "predict")
    export(run, tmp_path / "export")
    got = served_scores(tmp_path / "export", run, len(ref["example"]))
    assert np.abs(got - ref["score"]).max() <= FP32_TOL
    assert abs(auc(got, ref["label"]) - final_metrics(run)["test/auc"]) <= AUC_TOL


# ------------------------------------------------------------------- own data (raw rows)
OWN_MODEL = """\
model:
  tower: kunlun
  embedding_dim: 16
  kunlun: {dim: 16, kv_rank: 16, pffn_kv_len: 8, wukong_mlp: 32, head_mlp: [32], default_event: {dim: 16, num_seeds: 4, num_tokens: 2}}
trainer:
  max_steps: 20
  eval_every_n_steps: 20
checkpoint:
  every_n_steps: 0
  keep_best: false
logging:
  progress_bar: false
"""


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    from own_data import write_dataset

    root = tmp_path_factory.mktemp("own")
    files = write_dataset(root / "data", train_rows=3000, eval_rows=500, test_rows=700, train_files=1, row_group_size=250)
    job = root / "data" / "job.yaml"
    job.write_text(job.read_text() + OWN_MODEL)
    run = root / "run"
    proc = run_single([f"run_dir={run}"], config=str(job))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = predicted(run, root / "predict")
    export(run, root / "export")
    return pq.read_table(files["test"][0]), ref, load(root / "export")


@pytest.mark.slow
def test_raw_rows_are_scored_with_the_training_id_mapping(own):
    test_rows, ref, model = own
    assert len(ref["score"]) == test_rows.num_rows
    got = model.score(test_rows).double().numpy().reshape(-1)
    assert np.abs(got - ref["score"]).max() <= FP32_TOL
    # a list of dicts (raw values: string user ids, large integer item ids, lists), labels absent
    rows = test_rows.drop_columns(["clicked"]).slice(0, 50).to_pylist()
    assert "clicked" not in rows[0] and isinstance(rows[0]["user_id"], str)
    got_rows = model.score(rows).double().numpy().reshape(-1)
    assert np.abs(got_rows - ref["score"][:50]).max() <= FP32_TOL
    # one row alone scores like it does in a batch
    assert abs(float(model.score(rows[7:8])) - ref["score"][7]) <= FP32_TOL


@pytest.mark.slow
def test_bad_raw_rows_are_clear_errors(own):
    test_rows, _, model = own
    rows = test_rows.slice(0, 5).to_pylist()
    with pytest.raises(DataError, match=r"column 'item_id' is missing \(declared at data\.files\.schema\.columns\[3\]"):
        model.score([{k: v for k, v in r.items() if k != "item_id"} for r in rows])
    bad = [dict(r) for r in rows]
    bad[3]["item_id"] = "not-a-number"
    with pytest.raises(DataError, match=r"rows\[3\]: column 'item_id' = 'not-a-number': expected an integer \(int64\)"):
        model.score(bad)
    bad = [dict(r) for r in rows]
    bad[2]["item_cat"] = 99  # identity table with 8 rows
    with pytest.raises(DataError, match=r"rows\[2\]: column 'item_cat' = 99: expected an id in \[0, 8\)"):
        model.score(bad)
    with pytest.raises(DataError, match=r"rows\[1\]: a str: expected a dict"):
        model.score([rows[0], "oops"])
    with pytest.raises(DataError, match=r"column 'click_items' = 5: expected a list of int64"):
        model.score(test_rows.slice(0, 3).set_column(test_rows.column_names.index("click_items"), "click_items", pa.array([5, 6, 7])))


# ------------------------------------------------------------------- 2D, 2 ranks
@pytest.mark.slow
def test_2d_two_rank_checkpoint_exports_in_one_process(tmp_path):
    run = tmp_path / "run"
    run_torchrun(2, [f"run_dir={run}", *TRAIN, "parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=1"])
    assert json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())["sparse_strategy"] == "2d"
    ref = predicted(run, tmp_path / "predict", "parallel.sparse.strategy=1d")
    export(run, tmp_path / "export")
    got = served_scores(tmp_path / "export", run, len(ref["example"]))
    assert np.abs(got - ref["score"]).max() <= FP32_TOL
    assert abs(auc(got, ref["label"]) - auc(ref["score"], ref["label"])) <= AUC_TOL
    # the job's own final test ran on 2 ranks (other summation orders): near-ties may flip
    assert abs(auc(got, ref["label"]) - final_metrics(run)["test/auc"]) <= 1e-4


def test_int8_rowwise_quantization_round_trip():
    """Row-wise 8-bit: each row within half a step of its own range; constant rows exact."""
    from kunlun.serving.format import Table, encode_tables

    torch.manual_seed(0)
    w = torch.randn(50, 16) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0.25
    stored = encode_tables({"t": w}, "int8")
    assert stored["t.q"].dtype == torch.uint8 and stored["t.scale"].shape == (50,)
    back = Table("t", stored, "int8").rows(torch.arange(50))
    step = (w.max(1).values - w.min(1).values) / 255
    assert ((back - w).abs() <= step[:, None] / 2 + 1e-6).all()
    assert torch.equal(back[7], w[7])
