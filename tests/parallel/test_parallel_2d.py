"""2D sparse parallelism (DMPCollection on CPU/gloo), FSDP dense, momentum-scaled AdaGrad,
1D <-> 2D checkpoints and multi-node launch."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from jobs import BIN, REPO, final_metrics, free_port, job_env, latest_checkpoint, load_checkpoint_tensors, run_torchrun, run_torchx
from kunlun.parallel.layout import ParallelLayout
from kunlun.parallel.planner import build_sharders
from kunlun.trainer.config import ConfigError, load_config, validate

TWO_D = ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2"]
QUIET = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0"]
# Final eval/test that only feed equality checks (or none): small splits do.
SMALL_EVAL = ["data.synthetic.eval_examples=512", "data.synthetic.test_examples=512"]


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


SCRIPTS = REPO / "tests" / "dist_scripts"


def _torchrun_script(nproc: int, script: str, args: list) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPTS / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _replica_reports(nproc: int, run, overrides: list) -> list:
    """Run train_and_compare_replicas.py (see its docstring) and read every rank's report."""
    _torchrun_script(nproc, "train_and_compare_replicas.py", ["tiny", f"run_dir={run}", "checkpoint.every_n_steps=0", *QUIET, *SMALL_EVAL, *overrides])
    return [json.loads((run / f"replicas_rank{r}.json").read_text()) for r in range(nproc)]


REPLICA_STEPS = 7


@pytest.fixture(scope="module")
def two_d_replica_reports(tmp_path_factory):
    """``sync -> reports`` of a 4-rank 2D run of REPLICA_STEPS steps with that sync period,
    each run once per module and shared by the tests that read it."""
    cache: dict = {}

    def get(sync: int) -> list:
        if sync not in cache:
            run = tmp_path_factory.mktemp(f"replicas_sync{sync}")
            cache[sync] = _replica_reports(4, run, [f"trainer.max_steps={REPLICA_STEPS}", *TWO_D, f"parallel.sparse.sync_every_n_steps={sync}"])
        return cache[sync]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("sync", [1, 3, 0])
def test_replicas_start_identical_and_are_identical_exactly_at_sync_steps(two_d_replica_reports, sync):
    """Start-up broadcast: replicas that drew different initial tables (per-rank seeds) are
    bitwise identical once the model is built. Sync period: after step s replicas (weights
    and AdaGrad state) are bitwise identical iff s is a multiple of the period, and differ
    otherwise, so periods 1, 3 and never (0) give three different patterns over 7 steps."""
    steps = REPLICA_STEPS
    reports = two_d_replica_reports(sync)
    for r in reports:
        assert r["after_construction"]["identical"], f"rank {r['rank']}: replicas differ after construction: {r['after_construction']}"
        assert r["after_construction"]["replicas"] == 2 and r["after_construction"]["numel"] > 1000, r
        # Control: without the broadcast the replicas would have started apart.
        assert not r["pre_broadcast"]["identical"] and r["pre_broadcast"]["max_diff"] > 1e-3, r["pre_broadcast"]
        expected = [bool(sync) and s % sync == 0 for s in range(1, steps + 1)]
        got = [st["identical"] for st in r["steps"]]
        assert [st["step"] for st in r["steps"]] == list(range(1, steps + 1))
        assert got == expected, f"rank {r['rank']}, sync every {sync}: replicas identical after steps 1..{steps}: {got}, expected {expected}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy,nproc,scale", [("2d", 4, math.sqrt(2)), ("1d", 2, 1.0)])
def test_built_model_fused_adagrad_runs_with_lr_and_eps_times_sqrt_m(tmp_path, two_d_replica_reports, strategy, nproc, scale):
    """The fused row-wise AdaGrad of the model the Trainer builds (read from every FBGEMM
    TBE module, at construction and after training) uses lr·√M and eps·√M in 2D (M = 2
    replica groups) and the configured lr and eps in 1D. The 2D case reads the reports of
    the sync-every-step run above (trained REPLICA_STEPS steps) instead of a job of its own."""
    cfg = load_config("tiny")
    if strategy == "2d":
        reports = two_d_replica_reports(1)
    else:
        reports = _replica_reports(nproc, tmp_path / strategy, ["trainer.max_steps=1", "parallel.sparse.strategy=1d"])
    assert len(reports) == nproc
    want = [pytest.approx(cfg.optim.sparse_lr * scale, rel=1e-6), pytest.approx(cfg.optim.sparse_eps * scale, rel=1e-6)]
    for r in reports:
        assert r["sparse_lr_scale"] == pytest.approx(scale)
        for when in ("fused_at_construction", "fused_after_training"):
            assert r[when], f"rank {r['rank']}: no TBE module found"
            assert all(lr_eps == want for lr_eps in r[when]), f"rank {r['rank']} {when}: [lr, eps] = {r[when]}, want {want}"


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    """Bitwise equal flattened checkpoint states (tensors and plain values), same keys."""
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    bad = [k for k in want if not (torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k])]
    assert not bad, f"{what}: {len(bad)} of {len(want)} entries differ, e.g. {bad[:5]}"
    # The comparison covers the tables, their row-wise AdaGrad state and the dense tower.
    assert any(k.startswith("model.") and "embedding" in k and k.endswith(".weight") for k in want), sorted(want)
    assert any(k.startswith("optim.") and "momentum1" in k for k in want), sorted(want)
    assert any(k.startswith("model.") and "tower" in k for k in want), sorted(want)


def _assert_same_metrics(got: dict, want: dict, what: str) -> None:
    """Every eval/* and test/* metric of ``want`` (a final_metrics.json) equals ``got``."""
    keys = sorted(k for k in want if k.split("/")[0] in ("eval", "test") and k != "test/step")
    assert keys and all(k in got for k in keys), (what, keys, sorted(got))
    diff = {k: (got[k], want[k]) for k in keys if got[k] != pytest.approx(want[k], rel=1e-6, abs=1e-7)}
    assert not diff, f"{what}: metrics differ (got, want): {diff}"


@pytest.mark.slow
def test_fsdp_dense_with_2d_sparse_trains_checkpoints_and_reshards_to_1d_and_back(tmp_path):
    """2D sparse + FSDP dense at 4 ranks -> 1D at 2 ranks -> 2D+FSDP at 4 ranks: each
    resumed job holds exactly the saved state (every table, AdaGrad state and dense tensor,
    bitwise), its eval and test metrics on the loaded weights equal those of the job that
    saved, and it trains on."""
    run = tmp_path / "r"
    common = [f"run_dir={run}", "checkpoint.every_n_steps=0", *QUIET, *SMALL_EVAL]
    proc = run_torchrun(4, [*common, "trainer.max_steps=10", *TWO_D, "parallel.dense.strategy=fsdp"])
    assert "2D sparse: 4 ranks = 2 replica groups x sharding groups of 2" in proc.stdout
    assert "dense: fsdp" in proc.stdout
    m_2d, ckpt_2d = final_metrics(run), latest_checkpoint(run)
    meta = json.loads((ckpt_2d / "meta.json").read_text())
    assert meta["sparse_strategy"] == "2d" and meta["world_size"] == 4
    saved_2d = load_checkpoint_tensors(ckpt_2d)
    # 2D checkpoint at 4 ranks -> 1D at 2 ranks: loads exactly, then trains on to step 16.
    d1 = tmp_path / "reloaded_1d"
    proc = _torchrun_script(2, "resume_dump_and_train.py", [str(d1), "tiny", *common, "trainer.max_steps=16"])
    assert "saved at 4 ranks, now 2" in proc.stdout
    _assert_same_state(load_checkpoint_tensors(d1), saved_2d, "2D -> 1D")
    _assert_same_metrics(json.loads((d1 / "metrics.json").read_text()), m_2d, "2D -> 1D")
    m_1d, ckpt_1d = final_metrics(run), latest_checkpoint(run)
    assert m_1d["train/examples_consumed"] == 16 * 64 and ckpt_1d.name == "step_00000016"
    # ... and the 1D checkpoint back into 2D (+FSDP) at 4 ranks, then on to step 20.
    d2 = tmp_path / "reloaded_2d"
    proc = _torchrun_script(4, "resume_dump_and_train.py", [str(d2), "tiny", *common, "trainer.max_steps=20", *TWO_D, "parallel.dense.strategy=fsdp"])
    assert "saved at 2 ranks, now 4" in proc.stdout
    _assert_same_state(load_checkpoint_tensors(d2), load_checkpoint_tensors(ckpt_1d), "1D -> 2D")
    _assert_same_metrics(json.loads((d2 / "metrics.json").read_text()), m_1d, "1D -> 2D")
    assert final_metrics(run)["train/examples_consumed"] == 20 * 64


@pytest.mark.slow
def test_two_nodes_by_two_processes_through_torchx(tmp_path):
    """``make train NNODES=2 NPROC=2 ARGS="parallel.sparse.strategy=2d ..."`` on one machine."""
    run = tmp_path / "r"
    proc = run_torchx(
        "run",
        "-s",
        "local_cwd",
        "./launch/components.py:train",
        "-j",
        "2x2",
        "--rdzv_port",
        str(free_port()),  # two "nodes" on one machine: a c10d store on a port of its own
        "--config",
        "tiny",
        f"run_dir={run}",
        "trainer.max_steps=10",
        "checkpoint.every_n_steps=0",
        *QUIET,
        *TWO_D,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "world 4 (gloo on cpu)" in out and "2 replica groups" in out
    assert {p.name for p in (latest_checkpoint(run) / "dcp").glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}


@pytest.mark.slow
def test_quality_parity_2d_vs_1d_with_and_without_momentum_scaling(tmp_path):
    """Same global batch (64), steps, data and seed: 2D (2 replica groups), with and without
    momentum scaling, reaches the eval NE of 1D within the seed-to-seed spread of the gap."""
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
    # Measured 2D - 1D eval NE gaps (this setup, seeds 0/1/2/3): scaled -0.00018, -0.00024,
    # -0.00283, +0.00155 (std 0.0018); unscaled -0.00075, +0.00073, -0.00041, +0.00046
    # (std 0.0007). This run is seed 0. Bound: ~3x the larger seed-to-seed std of the gap.
    bound = 0.005
    assert abs(ne["2d_scaled"] - ne["1d"]) < bound, ne
    assert abs(ne["2d_unscaled"] - ne["1d"]) < bound, ne
