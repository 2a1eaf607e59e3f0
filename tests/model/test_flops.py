"""Analytic FLOPs over jagged batches: history-length statistics instead of one mean length.

A tower's forward FLOPs per example are affine in ``L``, ``L²`` (full self-attention) and the
``|i − j| ≤ w`` band size (windowed attention), so the per-example count over a batch must
equal the mean of the per-sample counts — which ``mean(L)``-based accounting undercounts.
The cross-checks against ``torch.utils.flop_counter`` (equal lengths) live in
``test_kunlun.py`` and ``test_baselines.py``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from tower_configs import SMALL

from kunlun.data.sources import build_source
from kunlun.model.flops import LengthStats, band_pairs
from kunlun.model.modules.window_attention import WindowSelfAttention
from kunlun.model.rec_model import RecModel
from kunlun.model.towers.hstu import HSTULayer
from kunlun.trainer.config import load_config
from kunlun.trainer.perf import BACKWARD_FLOPS_FACTOR, TRAIN_FLOPS_FACTOR, average_sequence_lengths


def brute_band(length: int, window):
    i = np.arange(length)
    diff = np.abs(i[:, None] - i[None, :])
    return int((diff <= (length if window is None else window)).sum())


def test_band_pairs_counts_every_pair_in_the_window():
    for length in range(0, 12):
        for window in (None, 0, 1, 3, 5, 11, 20):
            assert band_pairs(length, window) == brute_band(length, window), (length, window)
    lengths = np.array([0, 1, 4, 9, 30])
    assert np.array_equal(band_pairs(lengths, 3), [brute_band(int(n), 3) for n in lengths])


def test_length_stats_is_the_mean_and_carries_the_sample():
    lengths = np.random.default_rng(0).integers(0, 100, 1000)
    s = LengthStats(lengths)
    assert isinstance(s, float) and float(s) == pytest.approx(lengths.mean())
    assert round(s, 1) == round(float(lengths.mean()), 1)  # the trainer's log line
    assert s.mean_sq == pytest.approx(float((lengths.astype(float) ** 2).mean()))
    assert s.mean_sq > 1.3 * s.mean**2  # uniform lengths: E[L²] ≈ (4/3)·E[L]²
    assert s.band(None) == s.mean_sq
    assert s.band(5) == pytest.approx(np.mean([brute_band(int(n), 5) for n in lengths]))
    assert s.plus(1).mean_sq == pytest.approx(float(((lengths + 1.0) ** 2).mean()))
    assert pickle.loads(pickle.dumps(s)).mean_sq == s.mean_sq
    c = LengthStats.of(6.0)
    assert (c.mean, c.mean_sq, c.band(2)) == (6.0, 36.0, 6 * 5 - 2 * 3)
    assert LengthStats.of(s) is s and LengthStats([]).mean_sq == 0.0


@pytest.mark.parametrize("window", [None, 0, 3, 16])
def test_attention_flops_are_the_exact_per_sample_sum(window):
    """Uniform random lengths: B · flops(stats) = Σ_b flops(L_b), and the attention term is
    exactly 4·d · Σ_b (pairs of sample b)."""
    lengths = np.random.default_rng(1).integers(0, 60, 64)
    b, d = len(lengths), 16
    stats = LengthStats(lengths)
    attn = WindowSelfAttention(d, 2, window)
    per_sample = sum(attn.flops_per_example(int(n)) for n in lengths)
    assert b * attn.flops_per_example(stats) == pytest.approx(per_sample, rel=1e-12)
    pairs = sum(brute_band(int(n), window) for n in lengths)
    assert b * attn.flops_per_example(stats) == pytest.approx(8 * d * d * lengths.sum() + 4 * d * pairs, rel=1e-12)
    if window is None:  # the former mean(L)² count is short by Var(L)/E[L]² (~1/3 here)
        assert attn.flops_per_example(float(lengths.mean())) < 0.95 * attn.flops_per_example(stats)
    hstu = HSTULayer(d, 2, 60)
    assert b * hstu.flops_per_example(stats) == pytest.approx(sum(hstu.flops_per_example(int(n)) for n in lengths), rel=1e-12)


@pytest.fixture(scope="module")
def tiny_source():
    return build_source(load_config("tiny").data, 0)


@pytest.mark.parametrize("name", ["kunlun", "hstu", "interformer", "dlrm"])
def test_tower_flops_are_the_mean_of_per_sample_flops(name, tiny_source):
    """The whole tower, with the length sample the trainer uses: the per-example count is the
    mean of the per-sample counts (every tower's FLOPs are affine in L, L² and the band)."""
    torch.manual_seed(0)
    cfg = load_config("tiny", SMALL[name])
    tower = RecModel(tiny_source.schema, cfg.model, embedding_device=torch.device("cpu")).tower
    stats = average_sequence_lengths(tiny_source, num_examples=256)
    names = list(stats)
    n = len(stats[names[0]].lengths)
    assert n > 0 and all(len(s.lengths) == n for s in stats.values())
    per_sample = [tower.flops_per_example({k: float(stats[k].lengths[i]) for k in names}) for i in range(n)]
    assert tower.flops_per_example(stats) == pytest.approx(float(np.mean(per_sample)), rel=1e-9)
    if name != "dlrm":  # self-attention: the mean-length count is lower
        assert tower.flops_per_example({k: float(v) for k, v in stats.items()}) <= tower.flops_per_example(stats)


def test_one_backward_convention():
    assert TRAIN_FLOPS_FACTOR == 1.0 + BACKWARD_FLOPS_FACTOR == 3.0
