"""``trainer.precision`` (bf16 autocast of the dense tower) and ``model.compile``.

bf16 on CPU: a few training steps of every attention tower track the fp32 run (the
tolerance below), the tower really computes in bf16, and master weights, optimizer state,
loss and logits stay fp32. compile: the compiled tower trains to the eager numbers, and 20
batches of different history lengths compile a bounded number of graphs.
"""

from __future__ import annotations

import pytest
import torch
from tower_configs import SMALL

from kunlun.trainer.config import load_config

COMMON = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0", "checkpoint.every_n_steps=0", "logging.log_every_n_steps=1"]
# bf16 keeps 8 bits of mantissa: per-step losses of a barely trained tiny model agree to a few
# 1e-3 (measured: 8e-5 DLRM to 3.1e-3 InterFormer); the bound leaves room for other seeds, not for a
# wrong dtype path (an fp16 overflow or a dropped autocast region shows as NaN or > 0.05).
BF16_LOSS_TOL = 0.02


def _train(tmp_path, name: str, *overrides: str, setup=None):
    """Train in process (``setup(trainer)`` first, if given); returns (trainer, per-step
    losses, final metrics)."""
    from kunlun.trainer.trainer import Trainer

    cfg = load_config("tiny", [f"run_dir={tmp_path / name}", "trainer.max_steps=6", *COMMON, *overrides])
    trainer = Trainer(cfg)
    if setup is not None:
        setup(trainer)
    losses = []
    forward = trainer._train_forward

    def record(batch):
        loss, out = forward(batch)
        losses.append(float(loss.detach()))
        return loss, out

    trainer._train_forward = record
    try:
        final = trainer.train()
        return trainer, losses, final
    finally:
        trainer.close()


@pytest.mark.parametrize("tower", ["kunlun", "hstu", "interformer", "dlrm"])
def test_bf16_training_tracks_fp32_and_keeps_fp32_state(tmp_path, tower):
    _, fp32, _ = _train(tmp_path, "fp32", "trainer.precision=fp32", *SMALL[tower])
    seen = set()

    def spy_on_linears(trainer):
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))

    trainer, bf16, final = _train(tmp_path, "bf16", "trainer.precision=bf16", *SMALL[tower], setup=spy_on_linears)
    assert trainer.precision == "bf16"
    assert torch.bfloat16 in seen, f"no Linear of the {tower} tower computed in bf16: {seen}"
    assert len(bf16) == len(fp32) == 6
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < BF16_LOSS_TOL, (fp32, bf16)
    # fp32 master weights and optimizer state; fp32 metrics.
    assert all(p.dtype == torch.float32 for p in trainer.model.module.tower.parameters())
    for state in trainer.optimizer.state_dict()["state"].values():
        for v in state.values() if isinstance(state, dict) else ():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32
    assert torch.isfinite(torch.tensor(final["test/ne"]))


def test_precision_auto_is_fp32_on_cpu_and_mfu_uses_the_compute_dtype_peak():
    from kunlun.trainer.perf import peak_tflops, resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    if torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    p = peak_tflops(torch.device("cpu"), torch.bfloat16)
    assert p["peak"] == p["probe"] > 0  # CPU: the measured matmul rate of the compute dtype


# ---------------------------------------------------------------------------- compile
# Graphs dynamo may compile for one tower over 20 batches of different history lengths: the
# first batch, then once more with the jagged totals made symbolic. Measured: 2 for kunlun,
# hstu and interformer. A branch on a sequence total, a .item()/.tolist() or a Python loop
# over samples shows up as one graph per batch (or graph breaks) and fails this.
MAX_GRAPHS = 2


@pytest.mark.parametrize("tower", ["kunlun", "hstu", "interformer"])
def test_compiled_tower_compiles_a_bounded_number_of_graphs_over_20_batch_shapes(tower):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from kunlun.data.loader import ShardedBatches
    from kunlun.data.sources import build_source
    from kunlun.model.rec_model import RecModel

    torch._dynamo.reset()
    counters.clear()
    # backend=eager: dynamo's capture and guards (what decides recompiles) without Inductor's
    # code generation, which is timed in BENCHMARKS.md, not here.
    cfg = load_config("tiny", [*SMALL[tower], "model.compile=true", "model.compile_backend=eager"])
    source = build_source(cfg.data, 0)
    torch.manual_seed(0)
    compiled = RecModel(source.schema, cfg.model, embedding_device=torch.device("cpu"))
    cfg.model.compile = False
    torch.manual_seed(0)
    eager = RecModel(source.schema, cfg.model, embedding_device=torch.device("cpu"))
    batches = ShardedBatches(source, "train", 64, rank=0, world_size=1, seed=0, shuffle=True)
    totals = set()
    for i in range(20):
        batch = batches.batch(i)
        totals.add(int(batch.sequences.values().numel()))
        loss_c, _ = compiled(batch)
        loss_c.backward()
        loss_e, _ = eager(batch)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    assert len(totals) > 10, "the batches must differ in history lengths for this test to mean anything"
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= MAX_GRAPHS, f"{tower}: {graphs} graphs compiled over {len(totals)} distinct totals"
    assert not counters["graph_break"], f"{tower}: graph breaks {dict(counters['graph_break'])}"
    torch._dynamo.reset()


def test_trainer_with_a_compiled_tower_trains_like_the_eager_one(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    _, eager, _ = _train(tmp_path, "eager", *SMALL["kunlun"])
    _, compiled, _ = _train(tmp_path, "compiled", *SMALL["kunlun"], "model.compile=true", "model.compile_backend=eager")
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, abs=1e-6)
