"""The learning-rate schedule (``torch.optim.lr_scheduler.LambdaLR`` over the sparse and dense
optimizers): the rate each update actually uses, in the TBE kernels (the fused sparse
update inside backward) and in the dense optimizer, is ``base · lr_factor(step)`` at every
step, under every runner, and after a resume."""

from __future__ import annotations

import pytest

from kunlun.trainer.config import load_config
from kunlun.trainer.optim import lr_factor

COMMON = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0", "checkpoint.every_n_steps=0", "logging.log_every_n_steps=1"]
SCHEDULE = ["optim.warmup_steps=3", "optim.schedule=linear", "trainer.max_steps=8", "optim.sparse_lr=0.4", "optim.dense_lr=0.02"]


def _rates_seen(run_dir, *overrides):
    """Per step trained: (step, TBE kernels' rates during its backward, dense rate at its update)."""
    from kunlun.trainer.trainer import Trainer

    trainer = Trainer(load_config("tiny", [f"run_dir={run_dir}", *COMMON, *SCHEDULE, *overrides]))
    kernels = [emb._emb_module for m in trainer.model.modules() for lookup in getattr(m, "_lookups", []) for emb in getattr(lookup, "_emb_modules", [])]
    assert kernels, "no TBE kernel found"
    seen = []
    forward, dense = trainer._train_forward, dict(trainer.optimizer.optimizers)["dense"]

    def record(batch):
        # The runner's zero_grad has run: the kernels hold the rate their backward will apply.
        seen.append((trainer.step, sorted({round(k.get_learning_rate(), 9) for k in kernels}), dense.param_groups[0]["lr"]))
        return forward(batch)

    trainer._train_forward = record
    try:
        trainer.train()
        return trainer, seen
    finally:
        trainer.close()


@pytest.mark.parametrize("pipeline", ["none", "sparse_dist"])
def test_every_update_uses_the_scheduled_rate_also_after_a_resume(tmp_path, pipeline):
    trainer, seen = _rates_seen(tmp_path / "r", f"trainer.pipeline={pipeline}", "checkpoint.every_n_steps=4", "trainer.max_steps=4")
    o = trainer.cfg.optim
    _, resumed = _rates_seen(tmp_path / "r", f"trainer.pipeline={pipeline}")  # steps 4..7 from step_4
    assert [s for s, _, _ in seen + resumed] == list(range(8))
    for step, sparse, dense_lr in seen + resumed:
        f = lr_factor(step, o, 8)
        assert sparse == [pytest.approx(0.4 * f, rel=1e-6)], (step, sparse, f)
        assert dense_lr == pytest.approx(0.02 * f, rel=1e-9), (step, dense_lr, f)
