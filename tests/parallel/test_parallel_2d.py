"""2D sparse parallelism (DMPCollection on CPU/gloo), FSDP dense, momentum-scaled AdaGrad,
1D <-> 2D checkpoints and multi-node launch."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from jobs import BIN, REPO, final_metrics, job_env, latest_checkpoint, run_torchrun
from kunlun.parallel.layout import ParallelLayout
from kunlun.parallel.planner import build_sharders
from kunlun.trainer.config import ConfigError, load_config, validate

TWO_D = ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2"]
QUIET = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0"]


def test_layout_matches_dmpcollection_convention():
    lay = ParallelLayout(world_size=4, sharding_group_size=2)
    assert lay.num_replica_groups == 2
    assert lay.sharding_groups() == [[0, 2], [1, 3]]
    assert lay.replica_groups() == [[0, 1], [2, 3]]
    lay8 = ParallelLayout(world_size=8, sharding_group_size=4)
    assert lay8.sharding_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay8.replica_group_of(5) == [4, 5]
    assert "2 replica groups x sharding groups of 4" in lay8.describe()
    with pytest.raises(ValueError, match="does not divide"):
        ParallelLayout(world_size=6, sharding_group_size=4)


def test_group_size_must_divide_world_size():
    cfg = load_config("tiny", [*TWO_D[:1], "parallel.sparse.sharding_group_size=3"])
    with pytest.raises(ConfigError, match=r"'parallel.sparse.sharding_group_size' = 3 .* a divisor of the world size \(4 processes\)"):
        validate(cfg, world_size=4)


def test_momentum_scaling_sets_lr_and_eps_times_sqrt_m():
    cfg = load_config("tiny")
    m = 4
    sharders = build_sharders(cfg.optim, lr_scale=math.sqrt(m), eps_scale=math.sqrt(m))
    fp = sharders[0].fused_params
    assert fp["learning_rate"] == pytest.approx(cfg.optim.sparse_lr * 2)
    assert fp["eps"] == pytest.approx(cfg.optim.sparse_eps * 2)
    # FBGEMM's update lr·g/(√v + eps) with the scaled values equals η·g/(√(v/M) + ε).
    eta, eps, g, v = cfg.optim.sparse_lr, cfg.optim.sparse_eps, 0.3, 2.5
    assert fp["learning_rate"] * g / (math.sqrt(v) + fp["eps"]) == pytest.approx(eta * g / (math.sqrt(v / m) + eps))


def _replica_reports(run_dir):
    return [json.loads((run_dir / f"replicas_rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("sync", [1, 3, 0])
def test_replicas_identical_after_sync_and_diverge_without(tmp_path, sync):
    run = tmp_path / f"sync{sync}"
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=4",
        "tests/dist_scripts/train_and_compare_replicas.py",
        "tiny",
        f"run_dir={run}",
        "trainer.max_steps=12",
        "checkpoint.every_n_steps=0",
        *QUIET,
        *TWO_D,
        f"parallel.sparse.sync_every_n_steps={sync}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = _replica_reports(run)
    assert all(r["replicas"] == 2 and r["numel"] > 1000 for r in reports)
    if sync:  # 12 steps: the last step is a sync step for periods 1 and 3
        assert all(r["identical"] and r["max_diff"] == 0.0 for r in reports), reports
    else:
        assert all(not r["identical"] and r["max_diff"] > 1e-3 for r in reports), reports


@pytest.mark.slow
def test_fsdp_dense_with_2d_sparse_trains_checkpoints_and_reshards_to_1d_and_back(tmp_path):
    run = tmp_path / "r"
    common = [f"run_dir={run}", "checkpoint.every_n_steps=0", *QUIET]
    proc = run_torchrun(4, [*common, "trainer.max_steps=10", *TWO_D, "parallel.dense.strategy=fsdp"])
    assert "2D sparse: 4 ranks = 2 replica groups x sharding groups of 2" in proc.stdout
    assert "dense: fsdp" in proc.stdout
    m_2d = final_metrics(run)
    meta = json.loads((latest_checkpoint(run) / "meta.json").read_text())
    assert meta["sparse_strategy"] == "2d" and meta["world_size"] == 4
    # 2D checkpoint at 4 ranks -> 1D at 2 ranks: loads exactly (same eval), then trains on.
    proc = run_torchrun(2, [*common, "trainer.max_steps=10"])
    assert "saved at 4 ranks, now 2" in proc.stdout
    assert final_metrics(run)["test/auc"] == pytest.approx(m_2d["test/auc"], abs=1e-5)
    proc = run_torchrun(2, [*common, "trainer.max_steps=16"])
    m_1d = final_metrics(run)
    assert m_1d["train/examples_consumed"] == 16 * 64
    # ... and the 1D checkpoint back into 2D (+FSDP) at 4 ranks.
    proc = run_torchrun(4, [*common, "trainer.max_steps=16", *TWO_D, "parallel.dense.strategy=fsdp"])
    assert "saved at 2 ranks, now 4" in proc.stdout
    assert final_metrics(run)["test/auc"] == pytest.approx(m_1d["test/auc"], abs=1e-5)
    proc = run_torchrun(4, [*common, "trainer.max_steps=20", *TWO_D, "parallel.dense.strategy=fsdp"])
    assert final_metrics(run)["train/examples_consumed"] == 20 * 64


@pytest.mark.slow
def test_two_nodes_by_two_processes_through_torchx(tmp_path):
    """``make train NNODES=2 NPROC=2 ARGS="parallel.sparse.strategy=2d ..."`` on one machine."""
    run = tmp_path / "r"
    proc = subprocess.run(
        [
            str(BIN / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "./launch/components.py:train",
            "-j",
            "2x2",
            "--config",
            "tiny",
            f"run_dir={run}",
            "trainer.max_steps=10",
            "checkpoint.every_n_steps=0",
            *QUIET,
            *TWO_D,
        ],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "world 4 (gloo on cpu)" in out and "2 replica groups" in out
    assert {p.name for p in (latest_checkpoint(run) / "dcp").glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}


@pytest.mark.slow
def test_quality_parity_2d_vs_1d_with_and_without_momentum_scaling(tmp_path):
    """Same global batch (64), steps and data: 2D (2 replica groups) with momentum scaling
    must reach an eval NE within 0.015 of 1D; the unscaled 2D number is recorded beside it."""
    common = [
        "trainer.max_steps=200",
        "checkpoint.every_n_steps=0",
        "checkpoint.resume=never",
        *QUIET,
        "data.synthetic.num_users=2000",
        "data.synthetic.num_items=2000",
    ]
    ne = {}
    for name, extra in {
        "1d": ["parallel.sparse.strategy=1d"],
        "2d_scaled": TWO_D,
        "2d_unscaled": [*TWO_D, "parallel.sparse.momentum_scaling=false"],
    }.items():
        run = tmp_path / name
        run_torchrun(4, [f"run_dir={run}", *common, *extra])
        ne[name] = final_metrics(run)["eval/ne"]
    print("eval NE at 200 steps:", json.dumps(ne))
    assert ne["1d"] < 0.99  # learned something
    assert abs(ne["2d_scaled"] - ne["1d"]) < 0.015, ne
    assert abs(ne["2d_unscaled"] - ne["1d"]) < 0.05, ne
