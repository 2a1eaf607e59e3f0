"""The trainer's counters are DCP state (``TrainProgress``, a ``Stateful``): saved with the
model and optimizers, loaded on resume, checked against ``meta.json``; checkpoints written
before they were DCP state still resume from ``meta.json``."""

from __future__ import annotations

import torch

from jobs import latest_checkpoint, load_checkpoint_tensors
from kunlun.trainer.config import load_config

COMMON = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0", "logging.log_every_n_steps=2", "checkpoint.every_n_steps=3"]


def _trainer(run_dir, *overrides):
    from kunlun.trainer.trainer import Trainer

    return Trainer(load_config("tiny", [f"run_dir={run_dir}", *COMMON, *overrides]))


def _train(run_dir, *overrides):
    t = _trainer(run_dir, *overrides)
    try:
        t.train()
        return t
    finally:
        t.close()


def test_counters_are_saved_with_dcp_and_restored_on_resume(tmp_path):
    _train(tmp_path / "r", "trainer.max_steps=3")
    ckpt = latest_checkpoint(tmp_path / "r")
    saved = load_checkpoint_tensors(ckpt)
    assert int(saved["progress.step"]) == 3 and int(saved["progress.examples_consumed"]) == 3 * 64
    t = _trainer(tmp_path / "r", "trainer.max_steps=6")
    try:
        assert t.checkpointer.has_state(ckpt, "progress")
        assert (t.step, t.examples_consumed) == (3, 3 * 64)
    finally:
        t.close()


def test_a_checkpoint_without_the_counters_in_dcp_resumes_from_meta(tmp_path, monkeypatch):
    from kunlun.trainer.trainer import Trainer

    original = Trainer._state
    monkeypatch.setattr(Trainer, "_state", lambda self: {k: v for k, v in original(self).items() if k != "progress"})
    _train(tmp_path / "r", "trainer.max_steps=3")
    monkeypatch.setattr(Trainer, "_state", original)
    ckpt = latest_checkpoint(tmp_path / "r")
    t = _trainer(tmp_path / "r", "trainer.max_steps=6")
    try:
        assert not t.checkpointer.has_state(ckpt, "progress")
        assert (t.step, t.examples_consumed) == (3, 3 * 64)
        t.train()
        assert t.step == 6
    finally:
        t.close()
    assert int(load_checkpoint_tensors(latest_checkpoint(tmp_path / "r"))["progress.step"]) == 6
    assert torch.is_tensor(load_checkpoint_tensors(latest_checkpoint(tmp_path / "r"))["progress.examples_consumed"])
