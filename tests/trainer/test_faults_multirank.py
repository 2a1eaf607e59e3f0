"""Faults at 2 ranks (gloo, torchrun): SIGTERM, a non-finite loss and a full disk on ONE rank,
and a torn shard of one rank. Every rank must stop, skip or fall back the same way, and what
is saved must be consistent.

Faults are injected on one rank only by ``tests/dist_scripts/faults_driver.py`` (it patches
that rank before the trainer is built and runs the real ``kunlun.launch.main``), which writes
each rank's exit status, message, step and a digest of its dense weights. Runs use
``data.shuffle=false`` so that global batch ``b`` is train positions ``[64b, 64b+64)``, and
are compared with an uninterrupted 2-rank run of the same 12 steps where the state must match.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import List

import pytest
import torch

from jobs import BIN, REPO, job_env, latest_checkpoint, load_checkpoint_tensors, run_torchrun
from kunlun.trainer.checkpoint import Checkpointer
from kunlun.trainer.config import load_config

pytestmark = pytest.mark.slow

STEPS = 12
ARGS = [
    f"trainer.max_steps={STEPS}",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep=2",
    "data.shuffle=false",
    "logging.progress_bar=false",
    "trainer.eval_every_n_steps=0",
    "logging.log_every_n_steps=4",
]
DRIVER = "tests/dist_scripts/faults_driver.py"


def run_driver(tmp_path: Path, run: Path, fault: str, rank: int, step: int, *extra: str, timeout: int = 150):
    """2 ranks with ``fault`` injected on ``rank`` at ``step``: the torchrun process and each
    rank's outcome (``faults_driver.py``), rank 0 first."""
    out = tmp_path / f"outcome-{run.name}-{fault}"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", DRIVER, str(out), fault, str(rank), str(step), "--"]
    cmd += ["--config", "tiny", f"run_dir={run}", *ARGS, *extra]
    job = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # ranks that disagree wait in a collective: kill the job whole
        os.killpg(job.pid, signal.SIGKILL)
        for pid in _pids_with(str(out)):  # torchrun starts the ranks in sessions of their own
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        raise AssertionError(f"no result after {timeout}s (ranks waiting for each other?):\n{stdout[-3000:]}{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)
    text = proc.stdout[-4000:] + proc.stderr[-6000:]
    outcomes = []
    for r in range(2):
        f = out / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no outcome (torchrun status {proc.returncode}):\n{text}"
        outcomes.append(json.loads(f.read_text()))
    return proc, outcomes


def _pids_with(marker: str) -> List[int]:
    """Processes whose command line has ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def assert_torchrun_saw(proc, code: int) -> None:
    """torchrun's failure report: the first rank to exit exited with ``code``, and so did every
    other one, unless torchrun's agent SIGTERMed it (-15) after that first exit, while it was
    already shutting down (each rank's own status is in its outcome file)."""
    text = proc.stderr + proc.stdout
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)
    codes = {int(r): int(c) for r, c in found}
    assert proc.returncode != 0 and set(codes) == {0, 1}, text[-3000:]
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", text, re.S)
    assert root and int(root.group(1)) == code and set(codes.values()) <= {code, -15}, text[-3000:]


def checkpoints(run: Path) -> List[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "best.json")


def verify(ckpt: Path) -> None:
    """The manifest check ``resume=auto`` makes (sizes, sha256, DCP metadata types)."""
    Checkpointer(ckpt.parent.parent, load_config("tiny").checkpoint, rank=0, world_size=1).verify(ckpt)


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same model and optimizer state (every rank's shards)."""
    sa, sb = load_checkpoint_tensors(a), load_checkpoint_tensors(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    ma, mb = (json.loads((c / "meta.json").read_text()) for c in (a, b))
    assert (ma["step"], ma["examples_consumed"]) == (mb["step"], mb["examples_consumed"])


def assert_two_rank_checkpoint(ckpt: Path, step: int) -> None:
    """Committed, verifies, and holds both ranks' parts: shards, RNG files, manifest, meta."""
    verify(ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng/rank0.pt", "rng/rank1.pt"} <= set(manifest), sorted(manifest)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["step"], meta["examples_consumed"], meta["world_size"]) == (step, step * 64, 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of the same job (checkpoints at steps 8 and 12)."""
    run = tmp_path_factory.mktemp("reference") / "r"
    run_torchrun(2, [f"run_dir={run}", *ARGS])
    assert checkpoints(run) == ["step_00000008", "step_00000012"]
    return run


# --------------------------------------------------------------------- SIGTERM
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_with_one_checkpoint(tmp_path, reference):
    run = tmp_path / "r"
    proc, outcomes = run_driver(tmp_path, run, "sigterm", rank=1, step=4)
    # Only rank 1 got the signal; both finish step 4, save step 5 together and exit 75.
    assert [o["exit"] for o in outcomes] == [75, 75], [o["stderr"] for o in outcomes]
    assert_torchrun_saw(proc, 75)
    for o in outcomes:
        assert (o["step"], o["examples_consumed"]) == (5, 5 * 64)
        assert "preempted" in o["stderr"] and "step_00000005 at step 5; rerun the same command to resume" in o["stderr"]
    assert outcomes[0]["dense_sha256"] == outcomes[1]["dense_sha256"]
    assert checkpoints(run) == ["step_00000004", "step_00000005"]
    assert_two_rank_checkpoint(run / "checkpoints" / "step_00000005", 5)
    # Rerunning the same command resumes at step 5 and ends where an uninterrupted run does.
    resumed = run_torchrun(2, [f"run_dir={run}", *ARGS])
    assert "resumed from" in resumed.stdout and "step_00000005: step 5," in resumed.stdout
    assert_same_state(latest_checkpoint(run), latest_checkpoint(reference))


# ------------------------------------------------------------------------ NaNs
def test_nan_loss_on_one_rank_stops_every_rank_at_that_step_with_a_diagnostic(tmp_path):
    run = tmp_path / "r"
    proc, outcomes = run_driver(tmp_path, run, "nan", rank=1, step=6)
    assert [o["exit"] for o in outcomes] == [3, 3], [o["stderr"] for o in outcomes]
    assert_torchrun_saw(proc, 3)
    for o in outcomes:
        assert o["step"] == 6 and "non-finite values at step 6 (global batch 6)" in o["stderr"]
        assert "nonfinite-step00000006.json" in o["stderr"]
    assert outcomes[0]["dense_sha256"] == outcomes[1]["dense_sha256"]
    diag = json.loads((run / "diagnostics" / "nonfinite-step00000006.json").read_text())
    assert (diag["step"], diag["global_batch_index"], diag["examples_consumed"]) == (6, 6, 6 * 64)
    by_rank = {r["rank"]: r for r in diag["per_rank"]}
    assert by_rank[1]["loss"] and by_rank[1]["dense_features"]  # the rank that saw the NaN
    assert not by_rank[0]["loss"] and not by_rank[0]["dense_features"]
    # Nothing was saved after the NaN: the last checkpoint is step 4's, consistent and finite.
    assert checkpoints(run) == ["step_00000004"]
    ckpt = run / "checkpoints" / "step_00000004"
    assert_two_rank_checkpoint(ckpt, 4)
    state = load_checkpoint_tensors(ckpt)
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_nan_loss_on_one_rank_is_skipped_by_every_rank_under_skip_policy(tmp_path):
    run = tmp_path / "r"
    proc, outcomes = run_driver(tmp_path, run, "nan", 1, 6, "trainer.nonfinite_policy=skip")
    assert proc.returncode == 0 and [o["exit"] for o in outcomes] == [0, 0], [o["stderr"] for o in outcomes]
    for o in outcomes:
        assert (o["step"], o["skipped_steps"], o["examples_consumed"]) == (STEPS, 1, STEPS * 64)
    # The dense (data-parallel) weights stayed identical on both ranks: both skipped step 6.
    assert outcomes[0]["dense_sha256"] == outcomes[1]["dense_sha256"]
    for r in range(2):
        log_text = (run / "logs" / f"rank{r}.log").read_text()
        assert "skipping step 6: non-finite" in log_text and "skipping step 7" not in log_text
    assert_two_rank_checkpoint(latest_checkpoint(run), STEPS)
    state = load_checkpoint_tensors(latest_checkpoint(run))
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


# ------------------------------------------------------------------- full disk
@pytest.mark.parametrize("where", ["enospc_dcp", "enospc_rng"])
def test_disk_full_on_one_rank_during_save_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path, reference, where):
    """The disk fills up on rank 1 while it writes its part of step 8's checkpoint: inside DCP
    (its shard) or in kunlun's own write (its RNG file)."""
    run = tmp_path / "r"
    proc, outcomes = run_driver(tmp_path, run, where, rank=1, step=8)
    assert [o["exit"] for o in outcomes] == [2, 2], [o["stderr"] for o in outcomes]
    assert_torchrun_saw(proc, 2)
    for o in outcomes:
        assert o["step"] == 8
        msg = o["stderr"]
        # Every rank names the rank whose disk filled up and the OS error, not just "failed".
        assert re.search(r"saving checkpoint \S+/step_00000008 failed \(rank 1: OSError: \[Errno 28\] No space left on device\)", msg), msg
        assert "the partial files were removed and the previous checkpoint" in msg and "step_00000004 is intact" in msg, msg
    # The partial folder is gone on every rank's behalf; step 4 is complete and loadable.
    assert checkpoints(run) == ["step_00000004"]
    assert_two_rank_checkpoint(run / "checkpoints" / "step_00000004", 4)
    assert load_checkpoint_tensors(run / "checkpoints" / "step_00000004")
    if where == "enospc_dcp":  # and a rerun resumes from it and ends where an uninterrupted run does
        resumed = run_torchrun(2, [f"run_dir={run}", *ARGS])
        assert "step_00000004: step 4," in resumed.stdout
        assert_same_state(latest_checkpoint(run), latest_checkpoint(reference))


# ------------------------------------------------------- torn / corrupted checkpoint
def test_torn_shard_of_one_rank_makes_every_rank_fall_back_to_the_previous_checkpoint(tmp_path, reference):
    run = tmp_path / "r"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "logs")
    shard = run / "checkpoints" / "step_00000012" / "dcp" / "__1_0.distcp"  # rank 1's shard
    data = bytearray(shard.read_bytes())
    for i in range(100, 110):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc, outcomes = run_driver(tmp_path, run, "none", rank=0, step=0)
    assert proc.returncode == 0 and [o["exit"] for o in outcomes] == [0, 0], [o["stderr"] for o in outcomes]
    rank0_log = (run / "logs" / "rank0.log").read_text()
    assert "step_00000012 is unusable" in rank0_log and "__1_0.distcp: sha256 differs from the manifest (corrupted)" in rank0_log
    # Both ranks resumed from step 8 (never one from 8 and one fresh), then trained 8 -> 12.
    assert [o["resumed_from"] for o in outcomes] == [str(run / "checkpoints" / "step_00000008")] * 2
    for r in range(2):
        assert "resumed from " + str(run / "checkpoints" / "step_00000008") + ": step 8," in (run / "logs" / f"rank{r}.log").read_text()
    assert outcomes[0]["dense_sha256"] == outcomes[1]["dense_sha256"]
    # The torn step 12 was replaced by a good one (a re-save of the same step) equal to the reference.
    assert checkpoints(run) == ["step_00000008", "step_00000012"]
    assert_two_rank_checkpoint(run / "checkpoints" / "step_00000012", 12)
    assert_same_state(run / "checkpoints" / "step_00000012", reference / "checkpoints" / "step_00000012")
