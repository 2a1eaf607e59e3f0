"""2D replica sync of only the touched rows (``parallel.sparse.sync=touched``) and replica
placement (``parallel.sparse.replica_placement``), on 4 CPU ranks (gloo)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from jobs import BIN, REPO, final_metrics, job_env, latest_checkpoint, load_checkpoint_tensors, run_torchrun
from kunlun.parallel.layout import ParallelLayout
from kunlun.trainer.config import ConfigError, load_config

TWO_D = ["parallel.sparse.strategy=2d", "parallel.sparse.sharding_group_size=2"]
QUIET = ["logging.progress_bar=false", "trainer.eval_every_n_steps=0"]
# The final eval and test only feed equality checks here: small splits do.
SMALL_EVAL = ["data.synthetic.eval_examples=512", "data.synthetic.test_examples=512"]


def test_inter_node_placement_swaps_the_groups_and_the_layout_says_where_replicas_sit():
    intra = ParallelLayout(world_size=8, sharding_group_size=4, local_world_size=4)
    assert intra.replica_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "each within one host of 4 ranks" in intra.describe()
    inter = ParallelLayout(world_size=8, sharding_group_size=4, placement="inter_node", local_world_size=4)
    assert inter.sharding_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert inter.replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "spanning up to 2 hosts of 4 ranks: the sync crosses hosts" in inter.describe()
    # every rank is in exactly one sharding and one replica group, and they meet once
    for lay in (intra, inter):
        for s in lay.sharding_groups():
            for r in lay.replica_groups():
                assert len(set(s) & set(r)) == 1


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("parallel.sparse.sync=some", "['full', 'touched']"),
        ("parallel.sparse.replica_placement=rack", "['intra_node', 'inter_node']"),
        ("parallel.sparse.sync_reduce=max", "['mean', 'sum_delta']"),
        ("parallel.sparse.sync=full parallel.sparse.sync_reduce=sum_delta", "mean unless parallel.sparse.sync=touched"),
    ],
)
def test_sync_and_placement_values_are_checked(override, allowed):
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", override.split())
    assert override.split()[-1].split("=")[0] in str(ei.value) and allowed in str(ei.value)


def test_touched_sync_is_the_default():
    assert load_config("tiny").parallel.sparse.sync == "touched"


def _checked_run(run_dir, *extra):
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=4",
        str(REPO / "tests" / "dist_scripts" / "touched_sync_check.py"),
        "tiny",
        f"run_dir={run_dir}",
        "checkpoint.every_n_steps=0",
        *QUIET,
        *SMALL_EVAL,
        *TWO_D,
        "parallel.sparse.sync=touched",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, [json.loads((run_dir / f"touched_rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("placement, every, batch, exchange", [("intra_node", 3, 64, "bitmap"), ("inter_node", 1, 8, "ids")])
def test_touched_sync_is_bitwise_a_full_sync_and_sends_only_changed_rows(tmp_path, placement, every, batch, exchange):
    """At every sync the touched-rows result equals a full sync from the same state, bit for
    bit (weights and AdaGrad state); every row that changed on some replica is in the union
    sent, the union is far from all rows, and a sync right after a sync sends nothing. The
    two cases exchange the row sets as a bitmap (many rows touched) and as ids (few)."""
    out, reports = _checked_run(
        tmp_path / "r",
        "trainer.max_steps=9",
        f"data.batch_size={batch}",
        f"parallel.sparse.sync_every_n_steps={every}",
        f"parallel.sparse.replica_placement={placement}",
    )
    assert f"replica placement {placement}" in out and f"touched sync every {every} step(s)" in out
    for rep in reports:
        syncs = rep["syncs"]
        train_syncs = [s for s in syncs if s["step"] <= 9]
        assert [s["step"] for s in train_syncs] == list(range(every, 10, every))
        for s in syncs:
            assert s["bitwise_equal_to_reference"], (rep["rank"], s)
            assert s["changed_outside_union"] == 0 and s["rows_sent"] == s["rows_marked_union"], s
        for s in train_syncs:
            # the tiny preset's tables are small (a few hundred local rows), yet a step's
            # lookups touch well under all of them
            assert 0 < s["rows_changed"] <= s["rows_sent"] < s["rows_total"], s
            assert s["value_bytes"] > 0
        assert rep["second_sync_rows"] == 0 and rep["second_sync_unchanged"]
        assert rep["exchanges"][exchange] >= len(train_syncs), rep["exchanges"]
        # a replica that trained on nothing since the last sync: it sent no rows of its own,
        # took the other replica's changes, and every replica ends identical
        idle = rep["idle_replica"]
        assert (idle["local_rows"] == 0) == idle["idle"], idle
        assert idle["sync"]["bitwise_equal_to_reference"] and idle["sync"]["rows_sent"] > 0 and idle["replicas_identical"], idle


@pytest.mark.slow
def test_sum_delta_adds_every_replicas_change_and_keeps_replicas_identical(tmp_path):
    """``sync_reduce=sum_delta``: after every sync each row (touched or not) is bitwise
    ``w0 + Σ_r (w_r − w0)`` from the replicas' states, which leaves the replicas identical;
    the same rows are sent as with the mean."""
    out, reports = _checked_run(tmp_path / "r", "trainer.max_steps=6", "parallel.sparse.sync_every_n_steps=2", "parallel.sparse.sync_reduce=sum_delta")
    assert "replicas combined by sum_delta" in out
    for rep in reports:
        assert [s["step"] for s in rep["syncs"] if s["step"] <= 6] == [2, 4, 6]
        for s in rep["syncs"]:
            assert s["bitwise_equal_to_reference"], (rep["rank"], s)
            assert s["changed_outside_union"] == 0
        assert rep["second_sync_rows"] == 0 and rep["second_sync_unchanged"]
        assert rep["idle_replica"]["sync"]["bitwise_equal_to_reference"] and rep["idle_replica"]["replicas_identical"]


def _state(run):
    return load_checkpoint_tensors(latest_checkpoint(run))


def _assert_equal_states(a, b, atol=0.0):
    assert a.keys() == b.keys()
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert len(tensors) > 10
    for k in tensors:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_touched_sync_trains_resumes_and_reshards_like_full_sync(tmp_path):
    """A whole run with the touched sync ends bitwise where the full-sync run ends; resumed
    in a new job from its step-4 checkpoint it ends there too (to 1e-6); its checkpoint loads
    at 2 ranks in 1D and evaluates the same."""
    common = [
        "trainer.max_steps=10",
        # checkpoints at steps 4 (a sync step: the resume point below), 8 and 10, all kept
        "checkpoint.every_n_steps=4",
        "checkpoint.keep=3",
        *QUIET,
        *SMALL_EVAL,
        *TWO_D,
        "parallel.sparse.sync_every_n_steps=2",
    ]
    full, touched, resumed = tmp_path / "full", tmp_path / "touched", tmp_path / "resumed"
    run_torchrun(4, [f"run_dir={full}", *common, "parallel.sparse.sync=full"])
    run_torchrun(4, [f"run_dir={touched}", *common, "parallel.sparse.sync=touched"])
    _assert_equal_states(_state(full), _state(touched))
    assert final_metrics(full)["test/auc"] == final_metrics(touched)["test/auc"]
    # what the touched sync averaged, in final_metrics.json (rank 0's shards)
    assert 0 < final_metrics(touched)["parallel/sync_rows_fraction"] < 1 and final_metrics(touched)["parallel/sync_bytes_per_sync"] > 0
    assert "parallel/sync_rows_fraction" not in final_metrics(full)

    # Stopped at step 4 (a sync step): a new job given only the touched run's step-4
    # checkpoint resumes from it and trains on to step 10. (One job fewer than stopping a
    # separate run at max_steps=4: the checkpoint is the same state, written mid-run.)
    step4 = touched / "checkpoints" / "step_00000004"
    assert (step4 / "meta.json").exists(), sorted(p.name for p in (touched / "checkpoints").iterdir())
    shutil.copytree(step4, resumed / "checkpoints" / step4.name)
    proc = run_torchrun(4, [f"run_dir={resumed}", *common, "parallel.sparse.sync=touched"])
    assert f"resumed from {resumed / 'checkpoints' / step4.name}" in proc.stdout
    assert latest_checkpoint(resumed).name == "step_00000010"
    # (resuming is exact up to float summation order, ~1e-8 here)
    _assert_equal_states(_state(touched), _state(resumed), atol=1e-6)

    proc = run_torchrun(2, [f"run_dir={touched}", "trainer.max_steps=10", "checkpoint.every_n_steps=0", *QUIET, *SMALL_EVAL, "parallel.sparse.strategy=1d"])
    assert "saved at 4 ranks, now 2" in proc.stdout
    m2, m4 = final_metrics(touched), final_metrics(full)
    for k in ("test/auc", "test/ne", "test/logloss"):
        assert m2[k] == pytest.approx(m4[k], abs=1e-6), k


def test_the_row_set_exchange_is_the_cheapest_in_bytes():
    """ids (8 bytes per touched row per peer) while few rows are touched, a one-byte-per-row
    bitmap from about R/(4M) touched rows, and a plain full average when even the fewest
    possible union rows would cost as much as all rows."""
    from kunlun.parallel.touched_sync import choose_exchange

    rows, row_bytes = 100_000, 68.0  # D = 16 fp32 + one AdaGrad float
    assert choose_exchange(2, rows, row_bytes, 0) == "ids"
    assert choose_exchange(2, rows, row_bytes, 1_000) == "ids"  # 8 KB of ids < 100 KB bitmap
    assert choose_exchange(2, rows, row_bytes, 20_000) == "bitmap"  # 160 KB of ids > 100 KB bitmap
    assert choose_exchange(8, rows, row_bytes, 5_000) == "bitmap"  # ids 7*8*5k = 280 KB > 175 KB
    # (bitmap + widest rows) >= all rows: 1.75*(100k + 97.5k*68) >= 1.75*100k*68
    assert choose_exchange(8, rows, row_bytes, 98_600) == "all"
    assert choose_exchange(8, rows, row_bytes, 98_400) == "bitmap"
