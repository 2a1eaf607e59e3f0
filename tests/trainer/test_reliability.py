"""Faults: killed ranks, torn and corrupted checkpoints, SIGTERM, NaNs, a full disk, bad
input, and a fuzzed reader. Each test drives the real trainer (in-process for a single
rank, or torchrun / torchx subprocesses)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env, latest_checkpoint, load_checkpoint_tensors, run_single
from kunlun.data.errors import BadRowTracker, DataError
from kunlun.trainer.checkpoint import CheckpointError
from kunlun.trainer.config import load_config

COMMON = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0", "logging.log_every_n_steps=5"]


def steps_of(run_dir: Path):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# --------------------------------------------------------------- in-process helpers
def make_trainer(run_dir: Path, *overrides: str):
    from kunlun.trainer.trainer import Trainer

    cfg = load_config("tiny", [f"run_dir={run_dir}", *COMMON, *overrides])
    return Trainer(cfg)


def train_in_process(run_dir: Path, *overrides: str):
    trainer = make_trainer(run_dir, *overrides)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


# ------------------------------------------------------------------ killed rank
@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        [],  # 1D, plain loop
        # 2D (two replicas of every table, touched-rows sync every 4 steps) under TorchRec's
        # pipeline: the restart must land on the trained batch, not the read-ahead ones.
        ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=1", "trainer.pipeline=sparse_dist"],
    ],
    ids=["1d", "2d-sparse_dist"],
)
def test_sigkilled_rank_is_restarted_and_run_matches_uninterrupted(tmp_path, layout):
    """2 ranks via ``torchx run --max_restarts 1``; SIGKILL one worker after a checkpoint."""
    steps = 400
    args = [f"trainer.max_steps={steps}", "checkpoint.every_n_steps=100", "checkpoint.keep=5", *COMMON, *layout]
    ref = tmp_path / "ref"
    subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "kunlun.launch.main", "--config", "tiny", f"run_dir={ref}", *args],
        cwd=REPO,
        env=job_env(),
        check=True,
        capture_output=True,
        timeout=400,
    )
    run = tmp_path / "killed"
    log_path = tmp_path / "torchx.out"
    with open(log_path, "w") as log_file:  # a file, not a pipe: a full pipe would block the job
        job = subprocess.Popen(
            [
                str(BIN / "torchx"),
                "run",
                "-s",
                "local_cwd",
                "./launch/components.py:train",
                "-j",
                "1x2",
                "--max_restarts",
                "1",
                "--config",
                "tiny",
                f"run_dir={run}",
                *args,
            ],
            cwd=REPO,
            env=job_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            killed = None
            deadline = time.time() + 300
            while time.time() < deadline and killed is None and job.poll() is None:
                if (run / "checkpoints" / "step_00000100" / "meta.json").exists():
                    for pid in _worker_pids(str(run)):
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                        break
                time.sleep(0.05)
            job.wait(timeout=400)
        finally:
            if job.poll() is None:  # never leave a hung job behind
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    out = log_path.read_text(errors="replace")
    assert killed is not None, "no worker found to kill\n" + out[-3000:]
    assert job.returncode == 0, out[-5000:]
    assert "resumed from" in out, out[-3000:]
    a, b = latest_checkpoint(ref), latest_checkpoint(run)
    assert a.name == b.name == f"step_{steps:08d}"
    assert json.loads((b / "meta.json").read_text())["examples_consumed"] == steps * 64
    sa, sb = load_checkpoint_tensors(a), load_checkpoint_tensors(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    for k in ("test/auc", "test/ne", "eval/logloss"):
        assert final_metrics(ref)[k] == pytest.approx(final_metrics(run)[k], abs=1e-6)


def _worker_pids(marker: str):
    """Trainer worker processes (not the torchrun agent) whose command line has ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [c.decode(errors="replace") for c in cmd]
        if any(marker in c for c in text) and "kunlun.launch.main" in text and not any(c.endswith("torchrun") for c in text):
            pids.append(int(d.name))
    return sorted(pids)


# ------------------------------------------------------- torn / corrupted checkpoints
def test_crash_inside_save_leaves_previous_checkpoint_in_use(tmp_path):
    run = tmp_path / "r"
    crash = (
        "import os, sys\n"
        "import kunlun.trainer.checkpoint as c\n"
        "orig = c.Checkpointer._commit\n"
        "def commit(self, tmp, final, step, meta):\n"
        "    if step == 20:\n"
        "        os._exit(9)  # the process dies with the DCP shards written but not committed\n"
        "    return orig(self, tmp, final, step, meta)\n"
        "c.Checkpointer._commit = commit\n"
        "from kunlun.launch.main import main\n"
        f"sys.exit(main(['--config', 'tiny', 'run_dir={run}', 'trainer.max_steps=30', 'checkpoint.every_n_steps=10', *{COMMON!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9
    assert steps_of(run) == [".tmp-step_00000020", "step_00000010"]
    proc = run_single([f"run_dir={run}", "trainer.max_steps=30", "checkpoint.every_n_steps=10", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removing incomplete checkpoint" in proc.stdout and "resumed from" in proc.stdout
    assert "step_00000010: step 10" in proc.stdout
    assert ".tmp-step_00000020" not in steps_of(run)


def test_corrupted_shard_is_reported_and_previous_checkpoint_used(tmp_path):
    run = tmp_path / "r"
    proc = run_single([f"run_dir={run}", "trainer.max_steps=20", "checkpoint.every_n_steps=10", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard = next((run / "checkpoints" / "step_00000020" / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    for i in range(100, 110):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_single([f"run_dir={run}", "trainer.max_steps=25", "checkpoint.every_n_steps=10", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (run / "logs" / "rank0.log").read_text()
    assert "sha256 differs from the manifest (corrupted)" in log_text and "__0_0.distcp" in log_text
    assert "resumed from" in proc.stdout and "step_00000010: step 10" in proc.stdout


class _RunsCommand:
    """A pickle that runs a shell command when loaded (the attack on DCP's .metadata)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def _plant_malicious_metadata(ckpt, marker) -> None:
    """Replace ``dcp/.metadata`` with a code-running pickle and rewrite the manifest to match,
    as whoever can write the checkpoint folder can."""
    import pickle

    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}")))
    _rewrite_manifest_entry(ckpt, "dcp/.metadata")


def _assert_planted_file_is_refused(tmp_path, plant, plain_load, refusal: str, log_detail: str) -> None:
    """Shared attack drill. ``plant(ckpt, marker) -> file`` replaces one checkpoint file with
    a pickle that runs ``touch marker`` and rewrites the manifest to match; ``plain_load(file)``
    is what an unguarded reader would do. Checks: the attack is real (a plain load runs it);
    ``resume=auto`` refuses the file (``refusal`` and ``log_detail`` in the log), runs nothing
    and resumes from the previous checkpoint; named explicitly, the checkpoint is an error
    (exit 2) naming the file, still without running anything."""
    run, marker = tmp_path / "r", tmp_path / "pwned"
    proc = run_single([f"run_dir={run}", "trainer.max_steps=20", "checkpoint.every_n_steps=10", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    crafted = plant(run / "checkpoints" / "step_00000020", marker)
    plain_load(crafted)
    assert marker.exists()
    marker.unlink()

    proc = run_single([f"run_dir={run}", "trainer.max_steps=25", "checkpoint.every_n_steps=10", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()  # nothing executed
    log_text = (run / "logs" / "rank0.log").read_text()
    assert f"{crafted}: {refusal}" in log_text and log_detail in log_text, log_text[-3000:]
    assert "resumed from" in proc.stdout and "step_00000010: step 10" in proc.stdout

    named = latest_checkpoint(run)
    planted = plant(named, marker)
    proc = run_single([f"run_dir={tmp_path / 'x'}", f"checkpoint.resume={named}", *COMMON])
    assert proc.returncode == 2 and f"{planted.relative_to(named.parent)}: {refusal}" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def _rewrite_manifest_entry(ckpt, rel: str) -> None:
    import hashlib

    f = ckpt / rel
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest[rel] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_crafted_checkpoint_metadata_runs_nothing_and_the_previous_checkpoint_is_used(tmp_path):
    """The per-rank RNG files load with ``weights_only=True``: one replaced by a pickle whose
    ``__reduce__`` runs a command (manifest rewritten to match) is refused, nothing runs;
    ``resume=auto`` uses the previous checkpoint, a named one is an error (exit 2)."""
    import pickle

    def plant(ckpt, marker):
        _plant_malicious_metadata(ckpt, marker)
        return ckpt / "dcp" / ".metadata"

    _assert_planted_file_is_refused(
        tmp_path,
        plant,
        lambda f: pickle.loads(f.read_bytes()),
        "refusing to load the checkpoint metadata",
        "posix.system is not part of DCP checkpoint metadata",
    )


def test_rng_file_replaced_by_a_pickle_is_refused_and_runs_nothing(tmp_path):
    """The per-rank RNG files load with ``weights_only=True``: one replaced by a pickle whose
    ``__reduce__`` runs a command (manifest rewritten to match) is refused, nothing runs;
    ``resume=auto`` uses the previous checkpoint, a named one is an error (exit 2)."""

    def plant(ckpt, marker):
        torch.save(_RunsCommand(f"touch {marker}"), ckpt / "rng" / "rank0.pt")
        _rewrite_manifest_entry(ckpt, "rng/rank0.pt")
        return ckpt / "rng" / "rank0.pt"

    _assert_planted_file_is_refused(tmp_path, plant, lambda f: torch.load(f, weights_only=False), "refusing to load the RNG state", "posix.system")


def test_explicit_corrupted_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "r"
    assert run_single([f"run_dir={run}", "trainer.max_steps=10", *COMMON]).returncode == 0
    meta = run / "checkpoints" / "step_00000010" / "rng" / "rank0.pt"
    meta.write_bytes(meta.read_bytes()[:-3])  # truncated
    proc = run_single([f"run_dir={tmp_path / 'other'}", f"checkpoint.resume={run / 'checkpoints' / 'step_00000010'}", *COMMON])
    assert proc.returncode == 2
    assert "rank0.pt" in proc.stderr and "truncated" in proc.stderr


# ------------------------------------------------------------- retention vs saves
def test_failed_save_deletes_no_old_checkpoint_even_with_keep_1(tmp_path, monkeypatch):
    """``checkpoint.keep`` rotates only after the new checkpoint is committed: with keep=1 a
    save that fails (disk full) leaves the one old checkpoint in place."""
    import kunlun.trainer.checkpoint as ckpt

    orig = ckpt.dcp.save
    calls = {"n": 0}

    def save(state, storage_writer):
        calls["n"] += 1
        orig(state, storage_writer=storage_writer)
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", save)
    run = tmp_path / "r"
    with pytest.raises(CheckpointError, match=r"step_00000005 is intact"):
        train_in_process(run, "trainer.max_steps=20", "checkpoint.every_n_steps=5", "checkpoint.keep=1")
    assert steps_of(run) == ["step_00000005"]


def test_crash_between_commit_and_rotation_deletes_nothing_and_the_rerun_rotates(tmp_path):
    """The process dies after step 10's checkpoint is committed, before rotation (keep=1):
    both checkpoints are complete; the rerun resumes from the new one and rotation catches up."""
    run = tmp_path / "r"
    args = [f"run_dir={run}", "checkpoint.every_n_steps=5", "checkpoint.keep=1", *COMMON]
    crash = (
        "import os, sys\n"
        "import kunlun.trainer.checkpoint as c\n"
        "orig = c.Checkpointer._retain\n"
        "def retain(self):\n"
        "    if (self.root / 'step_00000010').exists():\n"
        "        os._exit(9)  # step 10 is committed, rotation has not run\n"
        "    return orig(self)\n"
        "c.Checkpointer._retain = retain\n"
        "from kunlun.launch.main import main\n"
        f"sys.exit(main(['--config', 'tiny', 'trainer.max_steps=15', *{args!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert steps_of(run) == ["step_00000005", "step_00000010"]
    assert all((run / "checkpoints" / s / "meta.json").is_file() for s in steps_of(run))
    proc = run_single(["trainer.max_steps=15", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_00000010: step 10" in proc.stdout
    assert [s for s in steps_of(run) if s.startswith("step_")] == ["step_00000015"]


def test_resave_of_the_same_step_replaces_the_old_one_only_once_the_new_one_is_committed(tmp_path, monkeypatch):
    """Resuming from an older checkpoint re-saves a step that exists: the old folder stays in
    use until the new one is committed (a failed re-save leaves it untouched), and is then
    replaced without leftovers."""
    import kunlun.trainer.checkpoint as ckpt

    run = tmp_path / "r"
    args = ("trainer.max_steps=10", "checkpoint.every_n_steps=5", "checkpoint.keep=2")
    train_in_process(run, *args)
    assert [d for d in steps_of(run) if d != "best.json"] == ["step_00000005", "step_00000010"]
    step10 = run / "checkpoints" / "step_00000010"
    before = json.loads((step10 / "meta.json").read_text())["saved_at"]
    resume = f"checkpoint.resume={run / 'checkpoints' / 'step_00000005'}"

    orig = ckpt.dcp.save

    def full_disk(state, storage_writer):
        orig(state, storage_writer=storage_writer)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    with pytest.raises(CheckpointError, match="step_00000010 failed"):
        train_in_process(run, *args, resume)
    assert [d for d in steps_of(run) if d != "best.json"] == ["step_00000005", "step_00000010"]  # no .tmp- / .replaced- left
    assert json.loads((step10 / "meta.json").read_text())["saved_at"] == before
    trainer = make_trainer(run, *args)
    try:
        trainer.checkpointer.verify(step10)  # the old step 10, intact
    finally:
        trainer.close()

    monkeypatch.setattr(ckpt.dcp, "save", orig)
    train_in_process(run, *args, resume)
    assert [d for d in steps_of(run) if d != "best.json"] == ["step_00000005", "step_00000010"]
    assert json.loads((step10 / "meta.json").read_text())["saved_at"] > before  # the new one

    # A crash between the re-save's two renames leaves only .replaced-step_10: the next start
    # puts it back (and drops it when the new step_10 made it).
    saved_at = json.loads((step10 / "meta.json").read_text())["saved_at"]
    os.rename(step10, run / "checkpoints" / ".replaced-step_00000010")
    trainer = make_trainer(run, *args)
    try:
        assert trainer.resumed_from == step10 and trainer.step == 10
    finally:
        trainer.close()
    assert json.loads((step10 / "meta.json").read_text())["saved_at"] == saved_at
    shutil.copytree(step10, run / "checkpoints" / ".replaced-step_00000010")
    make_trainer(run, *args).close()
    assert [d for d in steps_of(run) if d != "best.json"] == ["step_00000005", "step_00000010"]


# --------------------------------------------------------------------- SIGTERM
def test_sigterm_finishes_the_step_saves_and_exits_75(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "kunlun.launch.main", "--config", "tiny", f"run_dir={run}", "trainer.max_steps=100000", "checkpoint.every_n_steps=0", *COMMON]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:  # files, not pipes, so the job can never block on output
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=err_file)
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None:
            logf = run / "logs" / "rank0.log"
            if logf.exists() and "step 10 |" in logf.read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = err_path.read_text(errors="replace")
    assert proc.returncode == 75, err[-3000:]
    assert "preempted" in err and "rerun the same command to resume" in err
    saved = latest_checkpoint(run)
    step = json.loads((saved / "meta.json").read_text())["step"]
    assert step >= 10 and json.loads((saved / "meta.json").read_text())["examples_consumed"] == step * 64
    resumed = run_single([f"run_dir={run}", f"trainer.max_steps={step + 5}", "checkpoint.every_n_steps=0", *COMMON])
    assert resumed.returncode == 0 and f"step {step}," in resumed.stdout


# ------------------------------------------------------------------------ NaNs
def _poison_batch(monkeypatch, global_batch: int, batch_size: int = 64):
    """Make the dense features of train positions in ``global_batch`` NaN (shuffle off)."""
    from kunlun.data.sources.synthetic import SyntheticSource

    orig = SyntheticSource.read

    def read(self, split, indices):
        block = orig(self, split, indices)
        if split == "train":
            hit = (indices // batch_size) == global_batch
            block.dense[hit] = np.nan
        return block

    monkeypatch.setattr(SyntheticSource, "read", read)


PIPELINES = ["none", "sparse_dist", "semi_sync"]  # trainer.pipeline values that run on CPU


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_nan_batch_stops_with_a_diagnostic(tmp_path, monkeypatch, pipeline):
    from kunlun.trainer.trainer import NonFiniteError

    _poison_batch(monkeypatch, global_batch=7)
    trainer = make_trainer(tmp_path / "r", "data.shuffle=false", "trainer.max_steps=20", "checkpoint.every_n_steps=5", f"trainer.pipeline={pipeline}")
    try:
        with pytest.raises(NonFiniteError, match="step 7 \\(global batch 7\\)"):
            trainer.train()
    finally:
        trainer.close()
    diag = json.loads((tmp_path / "r" / "diagnostics" / "nonfinite-step00000007.json").read_text())
    assert diag["global_batch_index"] == 7 and diag["examples_consumed"] == 7 * 64
    assert {"dense_features", "loss", "logits"} <= set(diag["nonfinite"])
    # The weights of the last checkpoint are finite: the NaN never reached an update.
    assert steps_of(tmp_path / "r") == ["step_00000005"]
    saved = load_checkpoint_tensors(tmp_path / "r" / "checkpoints" / "step_00000005")
    weights = {k: v for k, v in saved.items() if k.startswith("model.") and isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights.values())


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_nan_batch_skipped_under_skip_policy(tmp_path, monkeypatch, pipeline):
    _poison_batch(monkeypatch, global_batch=3)
    trainer, final = train_in_process(
        tmp_path / "r", "data.shuffle=false", "trainer.max_steps=12", "trainer.nonfinite_policy=skip", f"trainer.pipeline={pipeline}"
    )
    assert trainer.skipped_steps == 1 and trainer.step == 12
    assert final["train/examples_consumed"] == 12 * 64  # the bad batch is consumed, not retried
    state = load_checkpoint_tensors(latest_checkpoint(tmp_path / "r"))
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_too_many_consecutive_skips_stop(tmp_path, monkeypatch):
    from kunlun.trainer.trainer import NonFiniteError

    for b in (2, 3, 4):
        _poison_batch(monkeypatch, global_batch=b)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        train_in_process(tmp_path / "r", "data.shuffle=false", "trainer.max_steps=12", "trainer.nonfinite_policy=skip", "trainer.max_consecutive_skips=2")


# ------------------------------------------------------------------- full disk
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import kunlun.trainer.checkpoint as ckpt

    calls = {"n": 0}
    orig = ckpt.dcp.save

    def save(state, storage_writer):
        calls["n"] += 1
        if calls["n"] == 2:
            orig(state, storage_writer=storage_writer)  # shards partly on disk, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(state, storage_writer=storage_writer)

    monkeypatch.setattr(ckpt.dcp, "save", save)
    run = tmp_path / "r"
    with pytest.raises(CheckpointError, match=r"No space left on device.*step_00000005 is intact"):
        train_in_process(run, "trainer.max_steps=20", "checkpoint.every_n_steps=5")
    assert steps_of(run) == ["step_00000005"]  # no partial folder left behind
    monkeypatch.setattr(ckpt.dcp, "save", orig)
    trainer = make_trainer(run, "trainer.max_steps=20", "checkpoint.every_n_steps=5")
    try:
        assert trainer.step == 5 and trainer.resumed_from.name == "step_00000005"
    finally:
        trainer.close()


# ------------------------------------------------------------------- bad input
def test_checkpoint_of_a_different_model_names_the_parameters(tmp_path):
    run = tmp_path / "r"
    assert run_single([f"run_dir={run}", "trainer.max_steps=5", *COMMON]).returncode == 0
    proc = run_single([f"run_dir={run}", "trainer.max_steps=10", "model.embedding_dim=8", *COMMON])
    assert proc.returncode == 2
    assert "saved from a different model" in proc.stderr
    assert "ebc.embedding_bags.ctx_item.weight: checkpoint [400, 16] vs model [400, 8]" in proc.stderr


@pytest.mark.parametrize("bad", ["file", "below_file"])
def test_unusable_run_dir_is_named(tmp_path, bad):
    f = tmp_path / "a_file"
    f.write_text("x")
    run_dir = f if bad == "file" else f / "sub"
    proc = run_single([f"run_dir={run_dir}", "trainer.max_steps=2", *COMMON])
    assert proc.returncode == 2
    assert "config key 'run_dir'" in proc.stderr and str(run_dir) in proc.stderr


EMPTY_SPLIT_DATA = """\
data:
  source: parquet
  batch_size: 8
  eval_batch_size: 8
  files:
    paths: [{path}]
    split: rows
    eval_fraction: 0.01
    test_fraction: 0.2
    schema:
      tables: [{{name: item, num_embeddings: 100}}]
      columns:
        - {{name: label, role: label, dtype: int64}}
        - {{name: item_id, role: categorical, dtype: int64, table: item}}
        - {{name: price, role: dense, dtype: float32}}
model: {{tower: dlrm, embedding_dim: 8, dlrm: {{bottom_mlp: [8], top_mlp: [8]}}}}
"""


def test_empty_split_is_a_data_error_naming_the_split_and_the_source(tmp_path):
    """A split with no examples (here: 40 rows, eval_fraction 0.01 rounds to 0 rows) stops the
    job with a DataError naming the split and the source (exit 2), not a crash or a NaN AUC."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "rows.parquet"
    n = 40
    pq.write_table(pa.table({"label": [i % 2 for i in range(n)], "item_id": list(range(1, n + 1)), "price": [float(i) for i in range(n)]}), data)
    job = tmp_path / "job.yaml"
    job.write_text(EMPTY_SPLIT_DATA.format(path=data))
    proc = run_single([f"run_dir={tmp_path / 'r'}", "trainer.max_steps=2", *COMMON], config=str(job))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "kunlun: error: split 'eval' of the data source (FileSource) has no examples" in proc.stderr, proc.stderr[-3000:]


def test_ids_outside_a_table_error_or_modulo():
    from kunlun.data.loader import ShardedBatches
    from kunlun.data.sources import build_source

    cfg = load_config("tiny")
    src = build_source(cfg.data, 0)
    orig = src.read

    def read(split, indices):
        block = orig(split, indices)
        block.events["click"].items[:] = block.events["click"].items + 10_000
        return block

    src.read = read
    with pytest.raises(DataError, match=r"train example \d+: feature 'click.item' has id \d+ outside table 'seq_item' \(400 rows\)"):
        ShardedBatches(src, "train", 8, id_policy="error").batch(0)
    b = ShardedBatches(src, "train", 8, id_policy="modulo").batch(0)
    src.read = orig
    clean = ShardedBatches(src, "train", 8, id_policy="error").batch(0)
    # Exactly (id + 10_000) mod 400, not merely "inside the table" (clamping would pass that).
    expected = (clean.sequences["click.item"].values() + 10_000) % 400
    assert torch.equal(b.sequences["click.item"].values(), expected)


def test_no_environment_or_secrets_in_logs(tmp_path):
    env_secret = "kunlun-test-secret-value-93ab1"
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "kunlun.launch.main", "--config", "tiny", f"run_dir={run}", "trainer.max_steps=3", *COMMON]
    proc = subprocess.run(cmd, cwd=REPO, env={**job_env(), "AWS_SECRET_ACCESS_KEY": env_secret}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    everything = (
        proc.stdout + proc.stderr + "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file() and p.suffix in (".log", ".yaml", ".json"))
    )
    assert env_secret not in everything


# ------------------------------------------------------------------------ fuzz
_VALID_RATING = re.compile(r"^\s*(\d+)\s*\t\s*(\d+)\s*\t\s*([1-5](?:\.0*)?)\s*\t\s*(\d+(?:\.0*)?)\s*$")


def _mutate(lines, rng: random.Random):
    out = list(lines)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(out))
        kind = rng.choice(["truncate", "bytes", "drop_field", "extra_field", "swap_sep", "empty", "huge"])
        line = out[i]
        if kind == "truncate":
            out[i] = line[: rng.randrange(len(line) + 1)]
        elif kind == "bytes":
            out[i] = "".join(chr(rng.randrange(1, 0x2FF)) if rng.random() < 0.3 else c for c in line)
        elif kind == "drop_field":
            out[i] = "\t".join(line.split("\t")[:-1])
        elif kind == "extra_field":
            out[i] = line + "\t7"
        elif kind == "swap_sep":
            out[i] = line.replace("\t", ",")
        elif kind == "empty":
            out[i] = ""
        else:
            out[i] = "\t".join(["9" * rng.randint(20, 400)] + line.split("\t")[1:])
    if rng.random() < 0.3:  # a truncated file: cut in the middle of a line
        text = "\n".join(out)
        return text[: rng.randrange(len(text))]
    return "\n".join(out) + "\n"


def _strictly_valid(line: str) -> bool:
    """The independent strict check of one ratings line (regex and the id/time bounds)."""
    m = _VALID_RATING.match(line)
    if not m:
        return False
    row = tuple(int(g.split(".")[0]) for g in m.groups())
    return 1 <= row[0] <= 10**7 and 1 <= row[1] <= 10**7 and row[3] < 10**10


def test_fuzzed_rating_files_parse_exactly_or_fail_with_a_location(tmp_path):
    """Random corruptions of a ratings file: ``error`` policy raises DataError naming file and
    line; ``skip`` keeps exactly the rows an independent strict check accepts."""
    from kunlun.data.sources.movielens import _parse_ratings

    rng = random.Random(1234)
    base = [f"{1 + i % 7}\t{1 + (i * 13) % 50}\t{1 + i % 5}\t{880000000 + i * 97}" for i in range(60)]
    path = tmp_path / "u.data"
    for trial in range(150):
        text = _mutate(base, rng)
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        expected = []
        for line in text.splitlines():
            if _strictly_valid(line):
                expected.append(tuple(int(g.split(".")[0]) for g in _VALID_RATING.match(line).groups()))
        # Under ``error`` a file with any bad line must raise, naming the first one (lines as
        # the reader numbers them: split on "\n", 1-based, empty lines skipped).
        numbered = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.rstrip("\r")]
        first_bad = next((n for n, line in numbered if not _strictly_valid(line)), None)
        if first_bad is None and numbered:
            cols = _parse_ratings(path, "\t", False, BadRowTracker("error"))
            assert list(zip(*[c.tolist() for c in cols])) == expected, f"trial {trial}: silently different rows"
        else:
            with pytest.raises(DataError) as raised:
                _parse_ratings(path, "\t", False, BadRowTracker("error"))
            message = str(raised.value)
            if first_bad is None:
                assert "no valid ratings" in message, message
            else:
                assert f"{path}:{first_bad}: field '" in message, f"trial {trial}: {message}"
        try:
            cols = _parse_ratings(path, "\t", False, BadRowTracker("skip"))
            assert list(zip(*[c.tolist() for c in cols])) == expected, f"trial {trial}: skip kept wrong rows"
        except DataError as e:
            assert not expected and "no valid ratings" in str(e)


@pytest.mark.parametrize("pipeline", ["none", "sparse_dist"])
def test_nonfinite_dense_gradient_with_finite_loss_is_caught(tmp_path, pipeline):
    from kunlun.trainer.trainer import NonFiniteError

    trainer = make_trainer(tmp_path / "r", "trainer.max_steps=10", f"trainer.pipeline={pipeline}")
    try:
        name, param = next((n, p) for n, p in trainer.model.named_parameters() if "tower.top" in n and n.endswith("weight"))
        param.register_hook(lambda g: torch.full_like(g, float("inf")))
        with pytest.raises(NonFiniteError, match="step 0 .*dense_grads"):
            trainer.train()
    finally:
        trainer.close()
    diag = json.loads((tmp_path / "r" / "diagnostics" / "nonfinite-step00000000.json").read_text())
    assert "loss" not in diag["nonfinite"] and "dense_grads" in diag["nonfinite"]
    assert any(name.split("tower.")[-1] in g for r in diag["per_rank"] for g in r["dense_grads"])
