"""benchmarks/scaling.py: the fits on known data, and a miniature sweep end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from jobs import load_benchmark

scaling = load_benchmark("scaling")


def test_power_law_fit_recovers_exponent_and_prefactor():
    c = np.geomspace(1e12, 1e14, 6)
    fit = scaling.fit_scaling(c, 3.0 * c**-0.02)
    assert fit["power_b"] == pytest.approx(0.02, rel=1e-9)
    assert fit["power_a"] == pytest.approx(3.0, rel=1e-9)
    assert fit["power_r2"] == pytest.approx(1.0)
    assert fit["decades"] == pytest.approx(2.0)
    # NE(C) = NE0 - eta * log10(C / 1e9): a straight line is recovered exactly too.
    line = scaling.fit_scaling(c, 0.9 - 0.01 * np.log10(c / 1e9))
    assert line["loglin_eta"] == pytest.approx(0.01, rel=1e-9) and line["loglin_ne0"] == pytest.approx(0.9, rel=1e-9)


def test_fit_confidence_interval_covers_truth_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    c = np.geomspace(1e12, 1e14, 5)
    covered = 0
    for _ in range(400):
        ne = 2.0 * c**-0.015 * np.exp(rng.normal(0, 0.004, len(c)))
        lo, hi = scaling.fit_scaling(c, ne)["power_b_ci95"]
        covered += lo <= 0.015 <= hi
    assert 0.92 <= covered / 400 <= 0.98  # 95% intervals with n - 2 = 3 degrees of freedom


def test_slope_ratio_and_t_quantiles():
    r, lo, hi = scaling.slope_ratio(0.02, 0.001, 0.01, 0.001)
    assert r == pytest.approx(2.0) and lo < 2.0 < hi
    assert scaling.t975(3) == pytest.approx(3.182) and scaling.t975(12) == pytest.approx(2.228) and scaling.t975(100) == 1.96
    with pytest.raises(ValueError, match=">= 3 points"):
        scaling.fit_line([1, 2], [1, 2])


def test_every_default_ladder_spans_enough_decades():
    for tower, widths in scaling.WIDTHS.items():
        flops = [scaling.planned_flops(tower, w)["forward_flops"] for w in widths]
        assert len(widths) >= 5 and flops == sorted(flops), tower
        assert scaling.check_span(flops, tower) >= 1.5
    with pytest.raises(SystemExit, match="decades"):
        scaling.check_span([1.0, 2.0], "dlrm")


MINI_STEPS = 3
MINI_NOISE_SEEDS = (1,)  # the seed spread needs the base run and one other seed
MINI_LAYERS = (1, 2, 4)  # the depth fit and its interval need 3 points


@pytest.mark.slow
def test_miniature_sweep_ablations_and_report(tmp_path, monkeypatch):
    """Real training runs (few steps): sweep two towers x 3 widths, ablations, report files.
    Each run is a process (start-up dominates), so the miniature trims the run lists that
    only need to be long enough to compute their statistic: one noise seed (not
    NOISE_SEEDS) and 3 layer counts (not LAYERS)."""
    monkeypatch.setattr(scaling, "NOISE_SEEDS", MINI_NOISE_SEEDS)
    real_layer_runs = scaling.layer_runs
    monkeypatch.setattr(scaling, "layer_runs", lambda common=(): real_layer_runs(common, layers=MINI_LAYERS))
    small = [
        f"trainer.max_steps={MINI_STEPS}",
        "data.synthetic.train_examples=2000",
        "data.synthetic.eval_examples=512",
        "data.synthetic.test_examples=512",
    ]
    args = ["--out", str(tmp_path), "--towers", "kunlun,interformer", "--widths", "8,12,16", "--min-decades", "0.3", "--set", *small]
    scaling.main(["sweep", *args])
    scaling.main(["ablate", *args])
    scaling.main(["layers", *args])
    scaling.main(["throughput", *args, "--throughput-steps", "2"])
    tput = json.loads((tmp_path / "ablation_throughput.json").read_text())
    mtime = (tmp_path / "sweep" / "kunlun-w8" / "final_metrics.json").stat().st_mtime
    scaling.main(["sweep", *args])  # records exist: nothing is retrained
    assert (tmp_path / "sweep" / "kunlun-w8" / "final_metrics.json").stat().st_mtime == mtime
    scaling.main(["report", *args])

    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert sorted((r["tower"], int(r["width"])) for r in rows) == sorted((t, w) for t in ("kunlun", "interformer") for w in (8, 12, 16))
    for r in rows:
        assert float(r["train_flops"]) == pytest.approx(3 * float(r["gflops_per_example_fwd"]) * 1e9 * MINI_STEPS * 256, rel=1e-6)
        assert 0 < float(r["eval_ne"]) < 2 and float(r["examples_per_sec"]) > 0
    summary = json.loads((tmp_path / "scaling.json").read_text())
    assert set(summary["fits"]) == {"kunlun", "interformer"}
    assert all(math.isfinite(f["power_b_se"]) for f in summary["fits"].values())
    assert "efficiency_loglin_eta" in summary and 0 < summary["bayes_floor_eval_ne"] < 1
    assert len(summary["seed_spread"]["eval_ne"]) == 1 + len(MINI_NOISE_SEEDS) and summary["seed_spread"]["std"] > 0
    depth = summary["layers"]
    assert [r["layers"] for r in depth["rows"]] == list(MINI_LAYERS) and len(depth["ci95"]) == 2
    assert depth["rows"][-1]["gflops_per_example_fwd"] > depth["rows"][0]["gflops_per_example_fwd"]
    png = tmp_path / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    ablations = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "ablations.csv"))}
    assert set(ablations) == set(scaling.ABLATIONS) - set(scaling.GPU_ONLY_ABLATIONS)
    base = ablations["kunlun (all on)"]
    assert all(float(r["examples_per_sec"]) == pytest.approx(tput[name]) for name, r in ablations.items())
    assert float(base["feature_flops_pct"]) == 0.0 and float(base["feature_ne_gain_pct"]) == 0.0
    # CompSkip, the window and event personalisation each save FLOPs (the paper's direction).
    for variant in ("CompSkip off", "full attention (no window)", "event personalisation off"):
        assert float(ablations[variant]["feature_flops_pct"]) < 0, variant
    ne_gain = float(ablations["PMA instead of HSP"]["feature_ne_gain_pct"])
    assert ne_gain == pytest.approx(
        100 * (float(ablations["PMA instead of HSP"]["eval_ne"]) - float(base["eval_ne"])) / float(ablations["PMA instead of HSP"]["eval_ne"])
    )
