"""AUC, normalized entropy and log loss against direct computations; EvalAccumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kunlun.trainer.metrics import EvalAccumulator, auc, log_loss, normalized_entropy


def brute_auc(scores, labels, weights=None) -> float:
    """Weighted P(score_pos > score_neg) + 1/2 P(tie), over all (positive, negative) pairs."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    num = den = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            pair = w[i] * w[j]
            den += pair
            num += pair * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def np_log_loss(logits, labels, weights=None) -> float:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((w * ce).sum() / w.sum())


def np_ne(logits, labels, weights=None) -> float:
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    p = (w * y).sum() / w.sum()
    return np_log_loss(logits, labels, weights) / float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def t(x):
    return torch.as_tensor(np.asarray(x))


# ============================================================================ AUC
def test_auc_hand_examples():
    assert auc(t([0.1, 0.4, 0.35, 0.8]), t([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)
    assert auc(t([1.0, 2.0, 3.0]), t([0.0, 1.0, 1.0])) == 1.0
    assert auc(t([3.0, 2.0, 1.0]), t([0.0, 1.0, 1.0])) == 0.0
    assert auc(t([0.5, 0.5, 0.5, 0.5]), t([0.0, 1.0, 0.0, 1.0])) == 0.5  # all tied


def test_auc_with_ties_vs_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        s = rng.integers(0, 5, n).astype(np.float32)  # many ties
        y = rng.integers(0, 2, n).astype(np.float32)
        y[0], y[1] = 0, 1
        assert auc(t(s), t(y)) == pytest.approx(brute_auc(s, y), abs=1e-12)


def test_auc_weighted_vs_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        s = np.round(rng.normal(size=n), 1)  # continuous with some ties
        y = (rng.random(n) < 0.4).astype(np.float32)
        y[0], y[1] = 0, 1
        w = rng.random(n) * 3
        assert auc(t(s), t(y), t(w)) == pytest.approx(brute_auc(s, y, w), abs=1e-12)


def test_auc_integer_weights_equal_repetition():
    s = np.array([0.2, 0.9, 0.5, 0.5, 0.1])
    y = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    w = np.array([2, 1, 3, 1, 1])
    rep = np.repeat(np.arange(5), w)
    assert auc(t(s), t(y), t(w.astype(np.float32))) == pytest.approx(auc(t(s[rep]), t(y[rep])), abs=1e-12)
    assert auc(t(s), t(y), t(w.astype(np.float32))) != pytest.approx(auc(t(s), t(y)), abs=1e-3)


def test_auc_random_large_vs_brute_force_and_invariances():
    rng = np.random.default_rng(2)
    n = 400
    y = (rng.random(n) < 0.3).astype(np.float32)
    s = rng.normal(size=n) + y  # informative scores
    ref = brute_auc(s, y)
    assert 0.6 < ref < 0.9
    assert auc(t(s), t(y)) == pytest.approx(ref, abs=1e-12)
    perm = rng.permutation(n)
    assert auc(t(s[perm]), t(y[perm])) == pytest.approx(ref, abs=1e-12)  # order free
    assert auc(t(np.exp(s)), t(y)) == pytest.approx(ref, abs=1e-12)  # monotone invariant
    assert auc(t(-s), t(y)) == pytest.approx(1 - ref, abs=1e-12)
    assert auc(t(s.astype(np.float32)), t(y)) == pytest.approx(ref, abs=1e-6)


def test_auc_nan_for_single_class():
    assert math.isnan(auc(t([0.1, 0.2, 0.3]), t([1.0, 1.0, 1.0])))
    assert math.isnan(auc(t([0.1, 0.2, 0.3]), t([0.0, 0.0, 0.0])))
    # a class present only with weight 0 is missing, too
    assert math.isnan(auc(t([0.1, 0.2, 0.3]), t([0.0, 1.0, 0.0]), t([1.0, 0.0, 1.0])))


# ============================================================================ log loss / NE
def test_log_loss_vs_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3, size=300)
    y = (rng.random(300) < 0.35).astype(np.float32)
    w = rng.random(300)
    assert log_loss(t(x), t(y)) == pytest.approx(np_log_loss(x, y), rel=1e-10)
    assert log_loss(t(x), t(y), t(w)) == pytest.approx(np_log_loss(x, y, w), rel=1e-10)
    assert log_loss(t([0.0]), t([1.0])) == pytest.approx(math.log(2))
    assert log_loss(t([0.0, 2.0]), t([1.0, 0.0]), t([3.0, 1.0])) == pytest.approx((3 * math.log(2) + math.log1p(math.exp(2))) / 4)


def test_log_loss_extreme_logits_finite():
    v = log_loss(t([100.0, -100.0]), t([0.0, 1.0]))
    assert v == pytest.approx(100.0)


def test_normalized_entropy_vs_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=500)
    y = (rng.random(500) < 0.2).astype(np.float32)
    w = rng.random(500) + 0.1
    assert normalized_entropy(t(x), t(y)) == pytest.approx(np_ne(x, y), rel=1e-10)
    assert normalized_entropy(t(x), t(y), t(w)) == pytest.approx(np_ne(x, y, w), rel=1e-10)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.8])
def test_ne_of_base_rate_prediction_is_one(rate):
    n = 1000
    y = np.zeros(n, dtype=np.float32)
    y[: int(rate * n)] = 1
    logit = math.log(rate / (1 - rate))
    assert normalized_entropy(t(np.full(n, logit)), t(y)) == pytest.approx(1.0, abs=1e-9)
    # a worse constant is above 1, a perfectly separating score far below
    assert normalized_entropy(t(np.full(n, logit + 1)), t(y)) > 1.01
    assert normalized_entropy(t(np.where(y == 1, 8.0, -8.0)), t(y)) < 0.01


def test_ne_uses_weighted_base_rate():
    y = np.array([1.0, 0.0, 0.0, 0.0])
    w = np.array([3.0, 1.0, 1.0, 1.0])  # weighted rate 0.5
    assert normalized_entropy(t(np.zeros(4)), t(y), t(w)) == pytest.approx(1.0, abs=1e-12)
    assert normalized_entropy(t(np.zeros(4)), t(y)) != pytest.approx(1.0, abs=1e-3)


# ============================================================================ accumulator
def _data(n, labels=1, seed=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.4).astype(np.float32)
    x = (rng.normal(size=(n, labels)) + 1.5 * y - 0.5).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_accumulator_matches_direct_functions():
    x, y = _data(300)
    acc = EvalAccumulator(["label"])
    for lo in range(0, 300, 64):
        acc.update(x[lo : lo + 64], y[lo : lo + 64], torch.ones(len(x[lo : lo + 64])))
    out = acc.compute()
    assert out["examples"] == 300.0
    assert out["auc"] == pytest.approx(auc(x[:, 0], y[:, 0]), abs=1e-12)
    assert out["ne"] == pytest.approx(normalized_entropy(x[:, 0], y[:, 0]), rel=1e-9)
    assert out["logloss"] == pytest.approx(log_loss(x[:, 0], y[:, 0]), rel=1e-9)
    assert out["auc"] == pytest.approx(brute_auc(x[:, 0].numpy(), y[:, 0].numpy()), abs=1e-9)
    assert out["logloss"] == pytest.approx(np_log_loss(x[:, 0].numpy(), y[:, 0].numpy()), rel=1e-6)
    assert set(out) == {"examples", "auc", "ne", "logloss"}


def test_accumulator_ignores_weight_zero_padding():
    x, y = _data(100, seed=6)
    ref = EvalAccumulator(["label"])
    ref.update(x, y, torch.ones(100))
    expected = ref.compute()
    # pad the last batch with weight-0 copies of example 0 (as ShardedBatches does), plus
    # padding with extreme logits that would move every metric if it counted
    pad_x = torch.cat([x[:1].repeat(12, 1), torch.full((4, 1), 50.0)])
    pad_y = torch.cat([y[:1].repeat(12, 1), torch.zeros(4, 1)])
    acc = EvalAccumulator(["label"])
    acc.update(x[:64], y[:64], torch.ones(64))
    acc.update(torch.cat([x[64:], pad_x]), torch.cat([y[64:], pad_y]), torch.cat([torch.ones(36), torch.zeros(16)]))
    got = acc.compute()
    assert got["examples"] == 100.0
    for k in ("auc", "ne", "logloss"):
        assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k
    # the same padding with weight 1 does change the result (so the check above can fail)
    bad = EvalAccumulator(["label"])
    bad.update(torch.cat([x, pad_x]), torch.cat([y, pad_y]), torch.ones(116))
    assert bad.compute()["logloss"] > expected["logloss"] + 0.1


def test_accumulator_multi_label_reports_per_task_and_mean():
    x, y = _data(200, labels=2, seed=7)
    acc = EvalAccumulator(["click", "like"])
    acc.update(x, y, torch.ones(200))
    out = acc.compute()
    for j, name in enumerate(["click", "like"]):
        assert out[f"{name}/auc"] == pytest.approx(auc(x[:, j], y[:, j]), abs=1e-12)
        assert out[f"{name}/ne"] == pytest.approx(normalized_entropy(x[:, j], y[:, j]), rel=1e-9)
        assert out[f"{name}/logloss"] == pytest.approx(log_loss(x[:, j], y[:, j]), rel=1e-9)
    assert out["auc"] == pytest.approx((out["click/auc"] + out["like/auc"]) / 2)
    assert out["ne"] == pytest.approx((out["click/ne"] + out["like/ne"]) / 2)
    assert out["click/auc"] != out["like/auc"]


def _gather_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from kunlun.model.tasks import TaskSpec

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def no_pickles(*args, **kwargs):
        raise AssertionError("metrics must gather tensors, not pickled objects")

    dist.all_gather_object = no_pickles  # type: ignore[assignment]
    x, y, w, d = _rank_data()
    lo, hi = (0, 130) if rank == 0 else (130, 300)  # unequal row counts
    specs = [TaskSpec("click", "click", 0, "binary", 1.0), TaskSpec("watch", "watch", 1, "regression", 1.0)]
    acc = EvalAccumulator(specs)
    acc.update(x[lo:hi], y[lo:hi], w[lo:hi], d[lo:hi])
    got = acc.compute()
    if rank == 0:
        torch.save(got, out_path)
    dist.destroy_process_group()


def _rank_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 2, generator=g)
    y = torch.stack([(torch.rand(300, generator=g) < 0.4).float(), torch.randn(300, generator=g)], dim=1)
    y[::7, 0] = float("nan")
    return x, y, torch.rand(300, generator=g) + 0.5, torch.randint(1, 4, (300,), generator=g)


@pytest.mark.slow
def test_two_ranks_gather_tensors_and_match_one_process(tmp_path):
    """2 gloo ranks with 130 and 170 rows (NaN labels, domains): the gathered metrics equal
    one process's over all 300 rows, with ``all_gather_object`` made to fail."""
    import torch.multiprocessing as mp

    from jobs import free_port
    from kunlun.model.tasks import TaskSpec

    out = tmp_path / "metrics.pt"
    mp.spawn(_gather_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    x, y, w, d = _rank_data()
    ref = EvalAccumulator([TaskSpec("click", "click", 0, "binary", 1.0), TaskSpec("watch", "watch", 1, "regression", 1.0)])
    ref.update(x, y, w, d)
    want = ref.compute()
    assert set(got) == set(want) and "click/2/auc" in got
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
