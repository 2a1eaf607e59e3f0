"""Multi-process training on CPU/gloo through torchrun: resume and resharding.

Run A trains N steps uninterrupted; run B trains N/2, stops, resumes with
``checkpoint.resume=auto`` and finishes: B's final weights, optimizer state and metrics
must equal A's and it must have consumed exactly the same examples.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from jobs import final_metrics, latest_checkpoint, load_checkpoint_tensors, run_single, run_torchrun

pytestmark = pytest.mark.slow

N = 24
COMMON = ["trainer.eval_every_n_steps=0", "logging.log_every_n_steps=4", "logging.progress_bar=false"]


def _assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    n_tensors = 0
    for k in sorted(a):
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            n_tensors += 1
            assert va.shape == vb.shape, k
            torch.testing.assert_close(va, vb, atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        else:
            assert va == vb, f"{k}: {va!r} != {vb!r}"
    assert n_tensors > 10


def test_resume_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_torchrun(2, [f"run_dir={a}", f"trainer.max_steps={N}", "checkpoint.every_n_steps=0", "checkpoint.resume=never", *COMMON])
    run_torchrun(2, [f"run_dir={b}", f"trainer.max_steps={N // 2}", "checkpoint.every_n_steps=0", *COMMON])
    first = latest_checkpoint(b)
    assert first is not None and first.name == f"step_{N // 2:08d}"
    proc = run_torchrun(2, [f"run_dir={b}", f"trainer.max_steps={N}", "checkpoint.every_n_steps=0", *COMMON])
    assert f"resumed from {first}" in proc.stdout

    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    assert ca.name == cb.name == f"step_{N:08d}"
    meta_a = json.loads((ca / "meta.json").read_text())
    meta_b = json.loads((cb / "meta.json").read_text())
    # Same data position: nothing skipped or repeated.
    assert meta_a["examples_consumed"] == meta_b["examples_consumed"] == N * 64
    _assert_same_state(load_checkpoint_tensors(ca), load_checkpoint_tensors(cb))
    ma, mb = final_metrics(a), final_metrics(b)
    for k in ("test/auc", "test/ne", "test/logloss", "eval/auc", "eval/ne"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k
    assert mb["train/examples_consumed"] == N * 64


def test_checkpoint_saved_at_two_ranks_resumes_at_one(tmp_path):
    run = tmp_path / "r"
    run_torchrun(2, [f"run_dir={run}", f"trainer.max_steps={N // 2}", "checkpoint.every_n_steps=0", *COMMON])
    metrics_2 = final_metrics(run)
    saved = latest_checkpoint(run)
    # Load the 2-rank checkpoint in one process without training: the resharded tables
    # must give exactly the same evaluation.
    w_saved = load_checkpoint_tensors(saved)
    proc = run_single([f"run_dir={run}", f"trainer.max_steps={N // 2}", "checkpoint.every_n_steps=0", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved at 2 ranks, now 1" in proc.stdout
    metrics_1 = final_metrics(run)
    for k in ("test/auc", "test/ne", "test/logloss", "eval/auc"):
        assert metrics_1[k] == pytest.approx(metrics_2[k], abs=1e-5), k
    # Then keep training at one rank from the same data position.
    proc = run_single([f"run_dir={run}", f"trainer.max_steps={N}", "checkpoint.every_n_steps=0", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = latest_checkpoint(run)
    assert last.name == f"step_{N:08d}"
    assert json.loads((last / "meta.json").read_text())["examples_consumed"] == N * 64
    assert json.loads((last / "meta.json").read_text())["world_size"] == 1
    # Table weights moved on from the 2-rank state.
    w_last = load_checkpoint_tensors(last)
    key = "model.ebc.embedding_bags.ctx_item.weight"
    assert w_last[key].shape == w_saved[key].shape == (400, 16)
    assert not torch.equal(w_saved[key], w_last[key])


def test_kunlun_tower_trains_checkpoints_and_resumes_on_two_ranks(tmp_path):
    """The Kunlun tower through the whole spine: DMP on 2 ranks, DCP save, resume."""
    run = tmp_path / "k"
    common = [f"run_dir={run}", "checkpoint.every_n_steps=0", "trainer.eval_every_n_steps=0", "logging.progress_bar=false"]
    proc = run_torchrun(2, [*common, "trainer.max_steps=15"], config="kunlun-tiny")
    assert re.search(r"tower kunlun: \d+(\.\d+)? [kMGT]FLOPs/example", proc.stdout), proc.stdout[-2000:]
    profile = ["logging.profile.start_step=18", "logging.profile.num_steps=4"]
    proc = run_torchrun(2, [*common, "trainer.max_steps=30", *profile], config="kunlun-tiny")
    assert "resumed from" in proc.stdout and "step_00000015" in proc.stdout
    m = final_metrics(run)
    assert m["train/examples_consumed"] == 30 * 64
    assert m["perf/train_flops"] == pytest.approx(3 * m["perf/forward_flops_per_example"] * 30 * 64)
    assert m["perf/forward_flops_per_example"] > 0 and m["model/dense_params"] > 0

    # The profiled window (steps 18..21 of the resumed run) on both ranks: a trace with the
    # trainer's regions and a time split whose categories cover the whole step.
    for rank in (0, 1):
        summary = json.loads((run / "profile" / f"summary_rank{rank}.json").read_text())
        assert summary["steps"] == 4
        shares = summary["host_share"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.02)
        for cat in ("data", "embedding", "dense_compute", "optimizer", "communication"):
            assert shares[cat] > 0, (cat, shares)
        assert summary["outside_dense_compute_share"] == pytest.approx(1 - shares["dense_compute"])
        names = {e.get("name") for e in json.loads((run / "profile" / f"trace_rank{rank}.json").read_text())["traceEvents"]}
        assert {"kunlun/step", "kunlun/data", "kunlun/embedding_lookup", "kunlun/dense_tower", "kunlun/backward", "kunlun/optimizer"} <= names
    assert m["profile/dense_compute_share"] == pytest.approx(json.loads((run / "profile" / "summary_rank0.json").read_text())["host_share"]["dense_compute"])
    assert m["test/auc"] > 0.55  # the planted signal is learnable (oracle AUC ≈ 0.79)
    state = load_checkpoint_tensors(latest_checkpoint(run))
    assert any(k.startswith("model.tower.events.click.pffn.0") for k in state)
