"""Launch through the real ``torchx run`` (local_cwd) and check Slurm / Kubernetes dryruns."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import REPO, final_metrics, latest_checkpoint, run_torchx

REQUIRED_SCALARS = {
    "train/loss",
    "train/examples_per_sec",
    "train/lr",
    "eval/auc",
    "eval/ne",
    "eval/logloss",
    "test/auc",
    "test/ne",
    "test/logloss",
    "perf/model_tflops",
    "perf/mfu",
}


@pytest.mark.slow
def test_torchx_local_two_processes_trains_checkpoints_and_logs(tmp_path, torchx_logs_in_tmp):
    run = tmp_path / "run"
    proc = run_torchx(
        "run",
        "-s",
        "local_cwd",
        "./launch/components.py:train",
        "-j",
        "1x2",
        "--config",
        "tiny",
        f"run_dir={run}",
        "trainer.max_steps=30",
        "trainer.eval_every_n_steps=10",
        "checkpoint.every_n_steps=10",
        "checkpoint.keep=2",
        "logging.log_every_n_steps=5",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "world 2 (gloo on cpu)" in out
    assert "sharding plan (2 ranks)" in out

    # Outputs all under run_dir.
    assert (run / "config.yaml").is_file()
    assert (run / "logs" / "rank0.log").is_file() and (run / "logs" / "rank1.log").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    best = json.loads((run / "checkpoints" / "best.json").read_text())["checkpoint"]
    # keep=2 dropped step 10, unless it is the best validation step (kept apart)
    assert ckpts == sorted({"step_00000020", "step_00000030", best}), ckpts
    dcp_files = {p.name for p in (latest_checkpoint(run) / "dcp").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= dcp_files

    # TensorBoard scalars, read back with TensorBoard's own reader.
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert REQUIRED_SCALARS <= tags, REQUIRED_SCALARS - tags
    loss_steps = [e.step for e in acc.Scalars("train/loss")]
    assert loss_steps == [5, 10, 15, 20, 25, 30]
    assert [e.step for e in acc.Scalars("eval/auc")] == [10, 20, 30]
    assert all(e.value > 0 for e in acc.Scalars("train/examples_per_sec"))
    test_auc = acc.Scalars("test/auc")[-1].value
    assert test_auc == pytest.approx(final_metrics(run)["test/auc"], abs=1e-6)
    assert "config/text_summary" in acc.Tags()["tensors"]
    # MFU = model TFLOP/s / (peak per rank x ranks), with the peak from a timed matmul probe
    # at start: a busy machine can move the probe, so check the arithmetic, not a range.
    peak = float(re.search(r"peak ([0-9.e+-]+) TFLOP/s per rank", out).group(1))
    for mfu, tflops in zip(acc.Scalars("perf/mfu"), acc.Scalars("perf/model_tflops")):
        assert tflops.value > 0 and mfu.value == pytest.approx(tflops.value / (2 * peak), rel=6e-3)  # the console prints the peak to 3 digits
    # torchx's own logs went to this test's temporary folder (tests/conftest.py), not runs/
    assert any(p.name == "stdout.log" or p.name.endswith(".log") for p in torchx_logs_in_tmp.rglob("*")), list(torchx_logs_in_tmp.rglob("*"))


def _dryrun(scheduler: str, *extra: str) -> str:
    proc = run_torchx(
        "run",
        "-s",
        scheduler,
        "--dryrun",
        *extra,
        "./launch/components.py:train",
        "-j",
        "2x8",
        "--gpu",
        "8",
        "--max_restarts",
        "2",
        "--image",
        "registry.example/kunlun:1",
        "--config",
        "movielens",
        "trainer.max_steps=10",
        "run_dir=/shared/runs/a",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_slurm_dryrun():
    out = _dryrun("slurm")
    # One hetjob group per node, 8 GPUs each, torchrun with c10d rendezvous on node 0.
    assert out.count("--gpus-per-task=8") == 2
    assert "#SBATCH hetjob" in out
    assert out.count("srun") == 1 and "--kill-on-bad-exit=1" in out
    assert "--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in out
    assert "--nnodes 2 --nproc_per_node 8" in out
    assert "torchrun --max_restarts 2" in out
    assert "-m kunlun.launch.main --config movielens trainer.max_steps=10 run_dir=/shared/runs/a" in out
    assert "PYTHONUNBUFFERED=1" in out


def test_kubernetes_dryrun():
    out = _dryrun("kubernetes", "--workspace", "", "-cfg", "queue=default")
    assert "kind: Job" in out and "schedulerName: volcano" in out
    assert out.count("nvidia.com/gpu: '8'") == 4  # limits + requests, 2 pods
    assert "image: registry.example/kunlun:1" in out
    assert "--nnodes 2 --nproc_per_node 8" in out
    assert "torchrun --max_restarts 2" in out
    assert "kunlun.launch.main --config movielens trainer.max_steps=10" in out


def test_make_train_passes_layout_and_overrides():
    """``make train NNODES=.. NPROC=.. ARGS=..`` reaches torchx with the right -j and overrides."""
    proc = subprocess.run(
        ["make", "-n", "train", "NNODES=1", "NPROC=4", "ARGS=trainer.max_steps=7 run_dir=runs/x", "MAX_RESTARTS=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    line = [text for text in proc.stdout.splitlines() if "torchx run" in text][0]
    assert "-j 1x4" in line and "components.py:train" in line
    assert "trainer.max_steps=7 run_dir=runs/x" in proc.stdout
    assert "--max_restarts 1" in proc.stdout
