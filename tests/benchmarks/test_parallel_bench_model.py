"""benchmarks/parallel_bench.py: the analytic touched-rows sync model and its projection.

Pure functions only (no process group): formulas checked against hand-computed values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs import load_benchmark

pb = load_benchmark("parallel_bench")


def test_touched_sync_bytes_formula():
    # M = 4 replicas, U = 1000 union rows of D = 16, the busiest replica touched 600 rows
    got = pb.touched_sync_bytes_per_rank(4, 1000, 600, 16)
    assert got["ids"] == 3 * 8 * (1 + 600)
    assert got["values"] == pytest.approx(2 * 3 / 4 * 1000 * (16 * 4 + 4))
    assert got["total"] == pytest.approx(got["ids"] + got["values"])


def test_touched_sync_without_replicas_is_free():
    assert pb.touched_sync_bytes_per_rank(1, 1000, 600, 16) == {"ids": 0.0, "values": 0.0, "total": 0.0}


def test_touched_sync_of_every_row_costs_the_full_sync_plus_the_ids():
    rows, dim, m = 5000, 32, 2
    full = pb.sync_bytes_per_rank(rows * (dim * pb.EMB_BYTES + pb.STATE_BYTES), m)
    got = pb.touched_sync_bytes_per_rank(m, rows, rows, dim)  # ids exchange forced (no rows)
    assert got["values"] == pytest.approx(full)
    assert got["ids"] == (m - 1) * 8 * (rows + 1)
    # knowing the shard's rows, the sync falls back to averaging every row: the full sync's
    # bytes plus the counts
    got = pb.touched_sync_bytes_per_rank(m, rows, rows, dim, rows=rows)
    assert got["exchange"] == "all" and got["values"] == pytest.approx(full) and got["ids"] == (m - 1) * 8


def test_touched_sync_exchanges_a_bitmap_when_ids_would_cost_more():
    m, dim, rows = 4, 16, 100_000
    got = pb.touched_sync_bytes_per_rank(m, 12_000, 10_000, dim, rows=rows)  # ids 240 KB > bitmap 150 KB
    assert got["exchange"] == "bitmap"
    assert got["ids"] == pytest.approx(3 * 8 + 1.5 * rows)
    assert got["values"] == pytest.approx(1.5 * 12_000 * (dim * 4 + 4))
    assert pb.touched_sync_bytes_per_rank(m, 1_200, 1_000, dim, rows=rows)["exchange"] == "ids"


def test_unique_rows_is_capped_by_the_table():
    assert pb.unique_rows(0.5, 100, 1000) == 50
    assert pb.unique_rows(0.5, 10_000, 1000) == 1000


def test_uniform_unique_rate():
    assert pb.uniform_unique_rate(0, 10) == 1.0
    assert pb.uniform_unique_rate(1e-9, 1e6) == pytest.approx(1.0)
    assert pb.uniform_unique_rate(1000, 1000) == pytest.approx(1 - math.exp(-1))
    # matches a simulation of uniform draws
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 20_000, 40_000)
    assert np.unique(draws).size / draws.size == pytest.approx(pb.uniform_unique_rate(40_000, 20_000), rel=0.01)


def test_unique_id_curve_windows_and_tables():
    batches = [
        {"a": np.array([1, 1, 2]), "b": np.array([7])},
        {"a": np.array([2, 3]), "b": np.array([7, 8])},
        {"a": np.array([9]), "b": np.array([], dtype=np.int64)},
        {"a": np.array([1, 9])},
    ]
    curve = pb.unique_id_curve(batches, [1, 2, 4, 8])
    assert 8 not in curve  # longer than the batches
    # k = 1: ids 4, 4, 1, 2 (mean 2.75); unique 3, 4, 1, 2 (mean 2.5)
    assert curve[1]["windows"] == 4
    assert curve[1]["ids"] == pytest.approx(2.75)
    assert curve[1]["unique"] == pytest.approx(2.5)
    assert curve[1]["rate"] == pytest.approx(2.5 / 2.75)
    # k = 2: windows {a: 1,1,2,2,3; b: 7,7,8} -> 8 ids, 3+2 unique; {a: 9,1,9} -> 3 ids, 2 unique
    assert curve[2]["windows"] == 2
    assert curve[2]["ids"] == pytest.approx((8 + 3) / 2)
    assert curve[2]["unique"] == pytest.approx((5 + 2) / 2)
    assert curve[2]["per_table"]["b"] == pytest.approx([1.5, 1.0])
    # k = 4: a = {1, 2, 3, 9}, b = {7, 8}
    assert curve[4]["unique"] == 6 and curve[4]["ids"] == 11


def test_rate_at_interpolates_in_log_log():
    curve = {1: 0.5, 4: 0.125, 16: 0.1}
    assert pb.rate_at(curve, 1) == 0.5
    assert pb.rate_at(curve, 0.25) == 0.5  # below the shortest period: its rate
    assert pb.rate_at(curve, 2) == pytest.approx(0.25)  # rate ~ k^-1 between 1 and 4
    assert pb.rate_at(curve, 4) == pytest.approx(0.125)
    assert pb.rate_at(curve, 1000) == 0.1  # beyond the longest: held


def test_smallest_period():
    assert pb.smallest_period(lambda k: 100 / k, 10) == 10
    assert pb.smallest_period(lambda k: 100 / k, 9.9) == 11
    assert pb.smallest_period(lambda k: 5.0, 10) == 1
    assert pb.smallest_period(lambda k: 20 + 1 / k, 10) is None


def test_predict_touched_strategy():
    feats = [pb.FeatureTraffic(True, False, 1.0, 8)]
    kw = dict(b=16, feats=feats, num_input_dists=1, table_bytes=4000, optimizer_bytes=125, dense_bytes=400)
    full = pb.predict("2d", 4, 2, **kw)
    touched = pb.predict("2d_touched", 4, 2, **kw, touched_rows=(10, 6), dim=8)
    assert touched["a2a"] == full["a2a"] and touched["memory"] == full["memory"]
    assert touched["sync_parts"] == {"ids": 8 * 7, "values": pytest.approx(10 * (8 * 4 + 4))}
    assert touched["total"] == pytest.approx(touched["a2a"] + touched["ddp"] + 8 * 7 + 10 * 36)
    every4 = pb.predict("2d_touched", 4, 2, **kw, sync_every=4, touched_rows=(10, 6), dim=8)
    assert every4["sync"] == pytest.approx(touched["sync"] / 4)
    with pytest.raises(ValueError):
        pb.predict("2d_touched", 4, 2, **kw)


def test_prod_touched_rows():
    t, s, k = 4096, 64, 1
    ids_all = t * pb.PROD["b"] * k * pb.prod_ids_per_example()
    ids_group = s * pb.PROD["b"] * k * pb.prod_ids_per_example()
    u, n = pb.prod_touched_rows(t, s, k, "measured", {1: 0.25, 4: 0.1})
    assert u == pytest.approx(0.25 * ids_all / s)
    assert n == pytest.approx(0.25 * ids_group / s)
    # the uniform bound never exceeds the rows a rank holds
    u, n = pb.prod_touched_rows(t, s, 1024, "uniform")
    assert u <= pb.prod_rows() / s and n <= pb.prod_rows() / s
    assert u == pytest.approx(pb.prod_rows() / s, rel=1e-6)  # every row touched in 1024 steps


def test_project_reports_both_sync_kinds():
    rows = pb.project(pooled_row_wise=True, curve={k: 0.5 for k in pb.SYNC_PERIODS})
    assert len(rows) == 9
    for row in rows:
        kinds = row["sync_kinds"]
        assert set(kinds) == {"full", "touched_measured", "touched_uniform"}
        for kind in kinds.values():
            assert set(kind["per_k"]) == set(pb.SYNC_PERIODS)
            ratios = [kind["per_k"][k]["ratio"] for k in pb.SYNC_PERIODS]
            assert ratios == sorted(ratios, reverse=True)  # a rarer sync never costs more per step
        # full sync every step equals the per-step projection
        assert kinds["full"]["per_k"][1]["total"] == pytest.approx(row["2d"]["total"])
    # without a measured curve only the bound is projected
    assert set(pb.project(pooled_row_wise=False)[0]["sync_kinds"]) == {"full", "touched_uniform"}


def test_largest_rate():
    assert pb.largest_rate(lambda r: 10 * r, 2.5) == pytest.approx(0.25)
    assert pb.largest_rate(lambda r: 10 * r, 20) == 1.0
    assert pb.largest_rate(lambda r: 1 + r, 0.5) == 0.0


def test_rate_needed_for_table_wise_prod_is_tiny():
    # pooled TW/CW: 2D saves little all-to-all, so a touched sync every step must touch very few rows
    for row in pb.project(pooled_row_wise=False):
        assert 0 < row["rate_needed"]["le_1d"] < 2e-3
        assert row["rate_needed"]["le_half"] == 0.0  # a2a + DDP alone exceed half of 1D's total
