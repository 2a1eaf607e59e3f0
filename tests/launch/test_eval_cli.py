"""``kunlun eval``: score a run's checkpoint after training, at any world size.

Two tiny runs are trained once per module: ``run_1`` on one process (``keep_best=false``:
the final test scores the last step) and ``run_2`` on two processes with 2D sparse
parallelism, whose best step is made an early one (``early_stopping.mode=max`` on NE: the
worst step is "best"), so ``best`` and ``latest`` are different checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import BIN, REPO, final_metrics, job_env, run_single, run_torchrun, run_torchx

COMMON = [
    "trainer.max_steps=20",
    "trainer.eval_every_n_steps=5",
    "checkpoint.every_n_steps=10",
    "checkpoint.keep=2",
    "logging.log_every_n_steps=5",
]
TWO_D = ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2"]


def kunlun_eval(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``kunlun eval ARGS`` in one process (the console script)."""
    return subprocess.run([str(BIN / "kunlun"), "eval", *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def snapshot(run: Path) -> Dict[str, Tuple]:
    """Every entry under ``checkpoints/`` with its size and mtime, and the bytes of the
    files training wrote at the top of the run folder."""
    snap: Dict[str, Tuple] = {}
    for p in sorted((run / "checkpoints").rglob("*")):
        st = p.stat()
        snap[str(p.relative_to(run))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    for name in ("config.yaml", "final_metrics.json"):
        snap[name] = ((run / name).read_bytes(),)
    return snap


def split_metrics(final: Dict[str, float], prefix: str) -> Dict[str, float]:
    return {k[len(prefix) + 1 :]: v for k, v in final.items() if k.startswith(prefix + "/") and k != f"{prefix}/step"}


def assert_close(got: Dict[str, float], want: Dict[str, float], tol: float, what: str) -> None:
    assert set(got) == set(want) and {"auc", "ne", "logloss", "examples"} <= set(got), (what, sorted(got), sorted(want))
    bad = {k: (got[k], want[k]) for k in want if not math.isclose(got[k], want[k], rel_tol=0, abs_tol=tol)}
    assert not bad, f"{what}: differ beyond {tol}: {bad}"


def report(run: Path, ckpt: str, split: str) -> dict:
    return json.loads((run / "eval" / f"{ckpt}-{split}.json").read_text())


@pytest.fixture(scope="module")
def run_1(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run_1"
    proc = run_single([f"run_dir={run}", *COMMON, "checkpoint.keep_best=false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def run_2(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run_2"
    run_torchrun(2, [f"run_dir={run}", *COMMON, *TWO_D, "trainer.early_stopping.mode=max"])
    return run


@pytest.mark.slow
def test_latest_at_one_process_reproduces_the_final_test_exactly_and_writes_json_and_tensorboard(run_1):
    final = final_metrics(run_1)
    assert final["test/step"] == final["train/step"] == 20  # keep_best=false: the last step was tested
    before = snapshot(run_1)

    out = ok(kunlun_eval("--run-dir", str(run_1), "--checkpoint", "latest", "--split", "test"))
    rep = report(run_1, "step_00000020", "test")
    assert rep["step"] == 20 and rep["split"] == "test" and rep["world_size"] == 1
    assert rep["checkpoint"] == str((run_1 / "checkpoints" / "step_00000020").resolve())
    assert rep["metrics"] == split_metrics(final, "test")  # bit for bit: same weights, data, process count
    assert "test @ step 20" in out and f"auc {rep['metrics']['auc']:.6f}" in out  # the console

    ok(kunlun_eval("--run-dir", str(run_1), "--checkpoint", "latest", "--split", "valid"))  # 'valid' = the trainer's 'eval'
    rep_eval = report(run_1, "step_00000020", "eval")
    assert rep_eval["metrics"] == split_metrics(final, "eval")

    acc = EventAccumulator(str(run_1 / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for split, rep_ in (("test", rep), ("eval", rep_eval)):
        for metric in ("auc", "ne", "logloss"):
            events = acc.Scalars(f"eval_ckpt/{split}/{metric}")
            assert [e.step for e in events] == [20]
            assert events[0].value == pytest.approx(rep_["metrics"][metric], rel=1e-6)  # TensorBoard stores float32
    # The run's own curves are intact (no purge of the steps after the evaluated one).
    assert [e.step for e in acc.Scalars("eval/auc")] == [5, 10, 15, 20]
    assert snapshot(run_1) == before


@pytest.mark.slow
def test_best_is_the_checkpoint_the_final_test_ran_on(run_2):
    """2 ranks, 2D, best step 5 of 20: ``best`` gives the final test/* and eval/* of the
    run, ``latest`` its last validation (``last_eval/*``); scored on 1 process (the 2D
    layout overridden to 1D), within 1e-6 of the 2-process numbers."""
    final = final_metrics(run_2)
    best_step = int(final["best/step"])
    assert best_step == final["test/step"] < final["train/step"] == 20
    before = snapshot(run_2)
    _fails_with(["--run-dir", str(run_2)], "parallel.sparse.sharding_group_size", "parallel.sparse.strategy=1d")  # 2D group of 2 on 1 process

    for split, want in (("test", "test"), ("eval", "eval")):
        ok(kunlun_eval("--run-dir", str(run_2), "--checkpoint", "best", "--split", split, "parallel.sparse.strategy=1d"))
        rep = report(run_2, f"step_{best_step:08d}", split)
        assert rep["step"] == best_step and rep["world_size"] == 1 and rep["overrides"] == ["parallel.sparse.strategy=1d"]
        assert_close(rep["metrics"], split_metrics(final, want), 1e-6, f"best/{split} at 1 process vs the 2-process run")

    ok(kunlun_eval("--run-dir", str(run_2), "--checkpoint", "latest", "--split", "eval", "parallel.sparse.strategy=1d"))
    rep = report(run_2, "step_00000020", "eval")
    assert rep["step"] == 20
    assert_close(rep["metrics"], split_metrics(final, "last_eval"), 1e-6, "latest/eval at 1 process vs the 2-process run")
    # best and latest really are different weights here
    assert abs(final["eval/ne"] - final["last_eval/ne"]) > 1e-4
    assert snapshot(run_2) == before


@pytest.mark.slow
def test_one_process_checkpoint_scored_on_two_processes_through_torchx(run_1):
    final = final_metrics(run_1)
    before = snapshot(run_1)
    ok(run_torchx("run", "-s", "local_cwd", "./launch/components.py:eval", "-j", "1x2", "--run_dir", str(run_1), "--checkpoint", "20"))
    rep = report(run_1, "step_00000020", "test")
    assert rep["world_size"] == 2 and rep["step"] == 20
    assert_close(rep["metrics"], split_metrics(final, "test"), 1e-6, "1-process checkpoint at 2 processes")
    assert snapshot(run_1) == before


@pytest.mark.slow
def test_torchrun_module_entry_point_scores_on_two_processes(run_2):
    final = final_metrics(run_2)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "kunlun.launch.eval_cli", "--run-dir", str(run_2), "--checkpoint", "best"]
    ok(subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300))
    rep = report(run_2, f"step_{int(final['best/step']):08d}", "test")
    assert rep["world_size"] == 2
    assert rep["metrics"] == split_metrics(final, "test")  # the run's own layout and world size: exact


def _fails_with(args: List[str], *needles: str) -> None:
    proc = kunlun_eval(*args)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


@pytest.mark.slow
def test_bad_inputs_exit_2_naming_the_problem_and_change_nothing(run_1, tmp_path):
    _fails_with(["--run-dir", str(tmp_path / "nope")], "--run-dir", str(tmp_path / "nope"), "no such folder")
    _fails_with(["--run-dir", str(tmp_path)], "config.yaml")  # a folder that is not a run

    before = snapshot(run_1)
    _fails_with(["--run-dir", str(run_1), "--checkpoint", "step_00000099"], "'step_00000099'", "step_00000010", "step_00000020")
    _fails_with(["--run-dir", str(run_1), "--checkpoint", "best"], "best.json")  # keep_best=false: no best step recorded
    _fails_with(["--run-dir", str(run_1), "--split", "train"], "--split 'train'")
    _fails_with(["--run-dir", str(run_1), "checkpoint.resume=never"], "checkpoint.resume=never", "--checkpoint")
    # overrides that change the model: the checkpoint is of another model, each parameter named
    _fails_with(["--run-dir", str(run_1), "model.embedding_dim=8"], "step_00000020 was saved from a different model", "checkpoint [16] vs model [8]")
    assert snapshot(run_1) == before

    # A damaged checkpoint: one byte of a shard flipped. Beside it, an interrupted save
    # (.tmp-step_*) that a training start would clean up: evaluation must leave it alone.
    run = tmp_path / "damaged"
    shutil.copytree(run_1, run)
    shutil.rmtree(run / "eval", ignore_errors=True)  # reports of the other tests
    ckpt = run / "checkpoints" / "step_00000020"
    shard = sorted((ckpt / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (run / "checkpoints" / ".tmp-step_00000030" / "dcp").mkdir(parents=True)
    before = snapshot(run)
    _fails_with(["--run-dir", str(run), "--checkpoint", "latest"], str(shard), "sha256")
    assert snapshot(run) == before
    assert not (run / "eval").exists()

    # The older checkpoint still scores, and the interrupted save is still there afterwards.
    ok(kunlun_eval("--run-dir", str(run), "--checkpoint", "step_00000010", "--split", "eval"))
    assert report(run, "step_00000010", "eval")["step"] == 10
    assert snapshot(run) == before


def test_kunlun_help_lists_eval():
    proc = subprocess.run([sys.executable, "-m", "kunlun.launch.cli", "--help"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "kunlun eval --run-dir" in proc.stdout


def test_eval_component_runs_the_eval_entry_point_on_every_rank():
    from kunlun.launch.components import eval as eval_component

    app = eval_component("parallel.sparse.strategy=1d", run_dir="/shared/runs/a", checkpoint="best", split="eval", j="2x4")
    cmd = app.roles[0].args[-1]
    assert "--nnodes 2 --nproc_per_node 4" in cmd
    assert "-m kunlun.launch.eval_cli --run-dir /shared/runs/a --checkpoint best --split eval parallel.sparse.strategy=1d" in cmd
