"""Leak-free history statistics of MovieLens ratings: the source's dense features and the
logistic-regression baseline's (``benchmarks/movielens_baseline.py``) inputs, one code.

Every statistic of a rating at time ``t`` comes from ratings with a timestamp **strictly
earlier** than ``t`` (its own rating, same-second ratings and anything later never count),
of its user (whole history, last 5 and last 20 events, per genre of the target item) or of
its item (whole history, last 30 days), with Bayesian smoothing toward training-split
priors, and "baseline predictor" residuals (how the user rated items relative to their
average at the time, and the reverse).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

PRIOR = 10.0  # pseudo-events of the Bayesian averages of whole-history rates
RECENT_PRIOR = 3.0  # pseudo-events of the averages over the last K events
RESID_PRIOR = 5.0  # pseudo-events (at residual 0) of the mean residuals
RECENT_K = (5, 20)  # last-K windows of the user's history
ITEM_WINDOW_DAYS = 30  # recent item popularity window
# The features, in the order the source stacks them (keys of history_features' second result).
HISTORY_FEATURES = (
    "user_log_count",
    "user_mean_rating",
    "user_like_share",
    "item_log_count",
    "item_mean_rating",
    "item_like_share",
    *(f"user_last{k}_{stat}" for k in RECENT_K for stat in ("mean_rating", "like_share")),
    "user_genre_like_share",
    "user_genre_lift",
    "user_log_gap",
    "item_log_recent_count",
    "user_resid_rating",
    "user_resid_like",
    "item_resid_rating",
    "item_resid_like",
)
_SCALE = np.int64(10**10)  # timestamps are < 1e10 s (the source enforces it): (id, ts) packs into one int64


def genre_matrix(genre_len: np.ndarray, genre_val: np.ndarray, num_genres: int) -> np.ndarray:
    """``[num_items, num_genres]`` 0/1 from jagged per-item genre ids (column 0, "no genre", stays 0)."""
    g = np.zeros((len(genre_len), num_genres))
    g[np.repeat(np.arange(len(genre_len)), genre_len), genre_val] = 1.0
    g[:, 0] = 0.0
    return g


def _window_sums(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``values[lo:hi].sum(0)`` for every (lo, hi) pair, via one cumulative sum."""
    cs = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0, dtype=np.float64)])
    return cs[hi] - cs[lo]


def history_features(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    ts: np.ndarray,
    genres: np.ndarray,
    like_threshold: float,
    mean_rating: float,
    mean_like: float,
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """History statistics of every event, from events with a **strictly earlier** timestamp.

    Inputs: all ratings sorted by (user, timestamp, file order), as the source keeps them
    (``src._ex``); ``genres`` from :func:`genre_matrix`; ``mean_rating``/``mean_like``: the
    smoothing priors (constants). Returns ``(counts, features)``, both ``{name: [N]}``:
    ``counts`` are the raw sums the tests check against the ratings file, ``features``
    the named continuous inputs of the model.

    Windows are half-open index ranges into a sorted order: for the user, rows
    ``[first row of the user, first row of the user with ts >= t)``; for the item, the same
    over all ratings sorted by (item, ts). ``searchsorted(side="left")`` on the packed
    (id, ts) key gives the first row with a timestamp >= t, so the event itself and every
    same-second or later event lie outside.
    """
    ratings = ratings.astype(np.float64)
    like = (ratings >= like_threshold).astype(np.float64)
    one = np.ones_like(ratings)
    ukey = users * _SCALE + ts
    if np.any(np.diff(ukey) < 0):
        raise ValueError("events must be sorted by (user, timestamp)")
    lo = np.searchsorted(ukey, users * _SCALE, side="left")
    hi = np.searchsorted(ukey, ukey, side="left")
    counts: Dict[str, np.ndarray] = {}
    counts["u_n"], counts["u_sum"], counts["u_like"] = _window_sums(np.stack([one, ratings, like], 1), lo, hi).T
    for k in RECENT_K:  # the user's last k strictly earlier events
        counts[f"u{k}_n"], counts[f"u{k}_sum"], counts[f"u{k}_like"] = _window_sums(np.stack([one, ratings, like], 1), np.maximum(lo, hi - k), hi).T
    counts["u_gap"] = np.where(hi > lo, ts - ts[np.maximum(hi - 1, 0)], 0)  # seconds since the latest one; 0: none
    # User x genre: earlier events of the user per genre, summed over the target item's genres.
    eg = genres[items]
    counts["g_n"] = (_window_sums(eg, lo, hi) * eg).sum(1)
    counts["g_like"] = (_window_sums(eg * like[:, None], lo, hi) * eg).sum(1)

    order = np.lexsort((ts, items))
    ikey = items[order] * _SCALE + ts[order]
    ilo = np.searchsorted(ikey, items * _SCALE, side="left")
    ihi = np.searchsorted(ikey, items * _SCALE + ts, side="left")
    counts["i_n"], counts["i_sum"], counts["i_like"] = _window_sums(np.stack([one, ratings, like], 1)[order], ilo, ihi).T
    days = np.int64(ITEM_WINDOW_DAYS * 86400)
    counts["i_recent_n"] = (ihi - np.searchsorted(ikey, items * _SCALE + np.maximum(ts - days, 0), side="left")).astype(np.float64)

    def smooth(total, count, prior, prior_n):
        return (total + prior_n * prior) / (count + prior_n)

    features: Dict[str, np.ndarray] = {}
    features["user_log_count"] = np.log1p(counts["u_n"])
    features["user_mean_rating"] = smooth(counts["u_sum"], counts["u_n"], mean_rating, PRIOR)
    features["user_like_share"] = smooth(counts["u_like"], counts["u_n"], mean_like, PRIOR)
    features["item_log_count"] = np.log1p(counts["i_n"])
    features["item_mean_rating"] = smooth(counts["i_sum"], counts["i_n"], mean_rating, PRIOR)
    features["item_like_share"] = smooth(counts["i_like"], counts["i_n"], mean_like, PRIOR)
    for k in RECENT_K:
        features[f"user_last{k}_mean_rating"] = smooth(counts[f"u{k}_sum"], counts[f"u{k}_n"], mean_rating, RECENT_PRIOR)
        features[f"user_last{k}_like_share"] = smooth(counts[f"u{k}_like"], counts[f"u{k}_n"], mean_like, RECENT_PRIOR)
    features["user_genre_like_share"] = smooth(counts["g_like"], counts["g_n"], features["user_like_share"], PRIOR)
    features["user_genre_lift"] = features["user_genre_like_share"] - features["user_like_share"]
    features["user_log_gap"] = np.log1p(counts["u_gap"].astype(np.float64))
    features["item_log_recent_count"] = np.log1p(counts["i_recent_n"])
    # Residuals ("baseline predictor" biases): how the user rated earlier items relative to
    # those items' averages at the time (themselves from strictly earlier events), and how
    # the item was rated relative to its raters' averages at the time.
    resid_u = _window_sums(np.stack([ratings - features["item_mean_rating"], like - features["item_like_share"]], 1), lo, hi)
    features["user_resid_rating"] = resid_u[:, 0] / (counts["u_n"] + RESID_PRIOR)
    features["user_resid_like"] = resid_u[:, 1] / (counts["u_n"] + RESID_PRIOR)
    resid_i = _window_sums(np.stack([ratings - features["user_mean_rating"], like - features["user_like_share"]], 1)[order], ilo, ihi)
    features["item_resid_rating"] = resid_i[:, 0] / (counts["i_n"] + RESID_PRIOR)
    features["item_resid_like"] = resid_i[:, 1] / (counts["i_n"] + RESID_PRIOR)
    return counts, features
