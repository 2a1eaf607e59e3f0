"""Classical baseline on MovieLens-100K: L2-regularised logistic regression.

    .venv/bin/python benchmarks/movielens_baseline.py [--seeds 0,1,2] [--json out.json]

Data, split and labels are the framework's own: the source is built from
``configs/movielens.yaml`` (``build_source``), examples come from its ``read(split, ...)``
blocks and its per-split row indices, so train / eval / test (81,140 / 9,430 / 9,430
examples; per user the last 10 events by (timestamp, file order) are test, the 10 before
eval) and ``label = rating >= 4`` are exactly what the neural towers see. The script
asserts that the blocks and the parsed arrays it reads agree.

Model: a sparse linear model (a torch CSR design matrix, one weight per feature value,
plus a bias), trained full-batch with L-BFGS (exact gradient from two sparse products) to
convergence on mean log loss + ``l2/2 · ||w||²`` (bias not penalised), on the training
split only.

Features (one weight per value):

* one-hot: user id, item id and every context feature the source exposes: age bucket,
  gender, occupation, zip region, genres (multi-hot), release decade, hour of day, weekday;
* history statistics (:func:`history_features`) of the **user** (their earlier ratings)
  and of the **item** (every user's earlier ratings of it): count (log1p), mean rating and
  like share, the last two smoothed toward the training-split mean by a Bayesian average,
  ``(sum + PRIOR·mean) / (n + PRIOR)``;
* recency: the user's mean rating and like share over their last 5 and last 20 earlier
  events (smoothed), log time since their previous event, the item's log count of ratings
  in the last 30 days;
* residuals ("baseline predictor" biases): the user's mean of (rating − the item's
  smoothed mean at that time) and (like − the item's like share at that time) over their
  earlier events, and the item's mean of (rating − the rater's mean at that time), shrunk
  toward 0;
* user-genre affinity: the user's like share over earlier events that share a genre with
  the target item (smoothed toward the user's overall share), and its lift over it;
* the source's dense features (log #history, mean history rating, like share, years since
  release).

Continuous statistics are encoded as one-hot quantile buckets (edges from the training
split), as standardised values, or both; the encoding and the L2 strength are chosen on the
**eval split only** (lowest eval NE), then test is reported once.

Leak-freeness: every history statistic of an example at time ``t`` is computed from events
with timestamp **strictly earlier** than ``t`` — the same rule the source uses for its user
histories. Its own rating, same-second ratings (same session) and anything later are never
counted. Events of any split may count when strictly earlier in time (e.g. another user's
eval rating from last year for an item's statistics): they are observable at time ``t``.
The smoothing prior and bucket edges are constants fitted on the training split, like the
model's weights. ``tests/benchmarks/test_movielens_baseline.py`` checks the counts behind every
feature against a brute-force count over the raw ratings file, and that re-rating or
adding events at or after a time T leaves every feature of the examples at or before T
unchanged.

Metrics: ``kunlun.trainer.metrics.EvalAccumulator`` (the trainer's AUC, NE, log loss), so
the numbers are comparable with the towers' ``final_metrics.json``. The problem is convex:
``--seeds`` only changes the random initialisation (of the first fit of each L2 path; later
fits are warm-started), so the spread over seeds measures how well L-BFGS converged (it
should be ~0), not data or model variance. ``--json``'s top level holds the means over
seeds (``test_auc``, ``test_ne``, ``eval_ne``, ... and ``*_std``), as
``benchmarks/movielens_quality.py report --baseline`` reads them.

Results: BENCHMARKS.md, "MovieLens-100K quality".
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kunlun.data.sources import build_source
from kunlun.data.sources.movielens_history import (  # noqa: F401 (re-exported for the tests)
    ITEM_WINDOW_DAYS,
    PRIOR,
    RECENT_K,
    RECENT_PRIOR,
    RESID_PRIOR,
    history_features,
)
from kunlun.data.sources.movielens_history import genre_matrix as _genre_matrix
from kunlun.trainer.config import load_config
from kunlun.trainer.metrics import EvalAccumulator

SPLITS = ("train", "eval", "test")
CONTEXT = ("user_id", "item_id", "age", "gender", "occupation", "zip_region", "genres", "decade", "hour", "weekday")
N_BUCKETS = 16
L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
ENCODINGS = ("buckets", "raw", "both")


# ------------------------------------------------------------------------ data
def load_source(overrides: Sequence[str] = ()):
    """The MovieLens source exactly as the training job builds it (``configs/movielens.yaml``)."""
    cfg = load_config("movielens", list(overrides))
    return build_source(cfg.data, cfg.seed)


def genre_matrix(src) -> np.ndarray:
    """``[num_items, num_genres]`` 0/1 of the source's items (column 0, "no genre", stays 0)."""
    return _genre_matrix(src.i_genre_len, src.i_genre_val, int(src.schema.table_sizes["genre"]))


@dataclass
class SplitData:
    rows: np.ndarray  # indices into the source's parsed arrays (``src._ex``)
    labels: np.ndarray  # [N] float32
    context: Dict[str, Tuple[np.ndarray, np.ndarray]]  # name -> (lengths, values)
    dense: np.ndarray  # [N, 4] the source's dense features


def read_splits(src) -> Dict[str, SplitData]:
    out = {}
    thr = src.cfg.like_threshold
    for split in SPLITS:
        n = src.num_examples(split)
        b = src.read(split, np.arange(n))
        rows = src._split_rows[split]
        # The block and the parsed arrays describe the same examples in the same order.
        assert np.array_equal(b.context["user_id"].values, src._ex["user"][rows])
        assert np.array_equal(b.context["item_id"].values, src._ex["item"][rows])
        assert np.array_equal(b.request_time, src._ex["ts"][rows])
        assert np.array_equal(b.labels[:, 0], (src._ex["rating"][rows] >= thr).astype(np.float32))
        ctx = {k: (np.asarray(b.context[k].lengths), np.asarray(b.context[k].values)) for k in CONTEXT}
        out[split] = SplitData(rows, b.labels[:, 0].astype(np.float32), ctx, np.asarray(b.dense, dtype=np.float64))
    return out


DENSE = ("dense_log_history_len", "dense_mean_history_rating", "dense_like_share", "dense_years_since_release")


def continuous_features(src, data: Dict[str, SplitData]) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]]]:
    """``(counts over all events, {split: {feature: [N]}})``; priors from the training split."""
    ex = src._ex
    train = data["train"].rows
    counts, feats = history_features(
        ex["user"],
        ex["item"],
        ex["rating"],
        ex["ts"],
        genre_matrix(src),
        src.cfg.like_threshold,
        mean_rating=float(ex["rating"][train].mean()),
        mean_like=float(data["train"].labels.mean()),
    )
    out = {}
    for split, d in data.items():
        f = {k: v[d.rows] for k, v in feats.items()}
        for j, name in enumerate(DENSE):
            f[name] = d.dense[:, j]
        out[split] = f
    return counts, out


@dataclass
class Design:
    """Sparse design matrix of one split: ``X`` ``[N, F]`` and its transpose, both CSR."""

    X: torch.Tensor
    XT: torch.Tensor
    labels: torch.Tensor  # [N] float64
    num_features: int


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: Tuple[int, int]) -> torch.Tensor:
    order = np.lexsort((cols, rows))
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow.astype(np.int64)),
            torch.from_numpy(cols[order].astype(np.int64)),
            torch.from_numpy(vals[order].astype(np.float64)),
            size=shape,
            check_invariants=False,
        )


def build_designs(
    src,
    data: Dict[str, SplitData],
    cont: Dict[str, Dict[str, np.ndarray]],
    encoding: str,
    context: Sequence[str] = CONTEXT,
    continuous: Optional[Sequence[str]] = None,
    n_buckets: int = N_BUCKETS,
) -> Dict[str, Design]:
    """One-hot context + continuous features encoded as ``encoding`` (buckets | raw | both)."""
    assert encoding in ENCODINGS, encoding
    sizes = src.schema.table_sizes
    table_of = {c.name: c.table for c in src.schema.context_features}
    names = list(cont["train"]) if continuous is None else list(continuous)
    # Column layout, fixed from the schema and the training split.
    offset = 0
    ctx_off = {}
    for k in context:
        ctx_off[k] = offset
        offset += int(sizes[table_of[k]])
    edges, bucket_off, raw_col, mu_sd = {}, {}, {}, {}
    for name in names:
        x = cont["train"][name]
        if encoding in ("buckets", "both"):
            e = np.unique(np.quantile(x, np.linspace(0, 1, n_buckets + 1)[1:-1]))
            edges[name] = e
            bucket_off[name] = offset
            offset += len(e) + 1
        if encoding in ("raw", "both"):
            mu_sd[name] = (float(x.mean()), float(x.std()) or 1.0)
            raw_col[name] = offset
            offset += 1
    out = {}
    for split, d in data.items():
        n = len(d.labels)
        ex_idx, cols, vals = [], [], []

        def add(lengths, c, v):
            ex_idx.append(np.repeat(np.arange(n), lengths))
            cols.append(c)
            vals.append(v)

        ones = np.ones(n, dtype=np.int64)
        for k in context:
            lengths, values = d.context[k]
            add(lengths, values + ctx_off[k], np.ones(len(values)))
        for name in names:
            x = cont[split][name]
            if name in edges:
                add(ones, bucket_off[name] + np.searchsorted(edges[name], x, side="right"), np.ones(n))
            if name in raw_col:
                mu, sd = mu_sd[name]
                add(ones, np.full(n, raw_col[name]), np.clip((x - mu) / sd, -5, 5))
        ex, c, v = np.concatenate(ex_idx), np.concatenate(cols), np.concatenate(vals)
        out[split] = Design(_csr(ex, c, v, (n, offset)), _csr(c, ex, v, (offset, n)), torch.from_numpy(d.labels.astype(np.float64)), offset)
    return out


# ------------------------------------------------------------------------ model
class SparseLR:
    """``logit = X @ w + b``; ``theta = [w, b]``."""

    def __init__(self, theta: torch.Tensor):
        self.theta = theta

    def logits(self, d: Design) -> torch.Tensor:
        return d.X @ self.theta[:-1] + self.theta[-1]


def fit(d: Design, l2: float, seed: int, max_iter: int = 500, init: Optional[SparseLR] = None) -> Tuple[SparseLR, int]:
    """Full-batch L-BFGS on mean log loss + l2/2 ||w||² (bias not penalised), with the exact
    gradient ``X^T (sigmoid(z) - y) / N + l2 w`` from two sparse products. Returns the model
    and the number of iterations run."""
    if init is not None:
        theta = init.theta.detach().clone()
    else:
        g = torch.Generator().manual_seed(seed)
        theta = 0.01 * torch.randn(d.num_features + 1, generator=g, dtype=torch.float64)
    theta.requires_grad_(True)
    n = float(len(d.labels))
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
    )

    def closure():
        with torch.no_grad():
            w = theta[:-1]
            z = d.X @ w + theta[-1]
            loss = (torch.nn.functional.softplus(z) - d.labels * z).sum() / n + 0.5 * l2 * w.dot(w)
            r = (torch.sigmoid(z) - d.labels) / n
            grad = torch.empty_like(theta)
            grad[:-1] = d.XT @ r + l2 * w
            grad[-1] = r.sum()
        theta.grad = grad
        return loss

    opt.step(closure)
    return SparseLR(theta.detach()), int(opt.state[theta]["n_iter"])


def metrics(model: SparseLR, d: Design) -> Dict[str, float]:
    logits = model.logits(d)
    acc = EvalAccumulator(["label"])
    acc.update(logits[:, None], d.labels[:, None], torch.ones_like(d.labels))
    m = acc.compute()
    return {"auc": m["auc"], "ne": m["ne"], "logloss": m["logloss"]}


# ------------------------------------------------------------------------ driver
def prepare(src=None):
    """(source, per-split data, history counts of all events, per-split continuous features)."""
    src = load_source() if src is None else src
    data = read_splits(src)
    counts, cont = continuous_features(src, data)
    return src, data, counts, cont


def run_seed(
    src,
    data,
    cont,
    seed: int,
    encodings: Sequence[str] = ENCODINGS,
    l2_grid: Sequence[float] = L2_GRID,
    continuous: Optional[Sequence[str]] = None,
    context: Sequence[str] = CONTEXT,
    max_iter: int = 500,
    verbose: bool = False,
) -> Dict:
    """Grid over (encoding, l2) on eval NE; test metrics of the chosen fit."""
    best = None
    grid = []
    for enc in encodings:
        designs = build_designs(src, data, cont, enc, context=context, continuous=continuous)
        prev = None
        for l2 in sorted(l2_grid, reverse=True):  # strong to weak, warm-started along the path
            t0 = time.perf_counter()
            model, iters = fit(designs["train"], l2, seed, max_iter=max_iter, init=prev)
            prev = model
            ev = metrics(model, designs["eval"])
            grid.append({"encoding": enc, "l2": l2, "iters": iters, "eval": ev})
            if verbose:
                print(
                    f"  seed {seed} {enc:7s} l2={l2:.0e} iters={iters:3d} eval AUC {ev['auc']:.4f} NE {ev['ne']:.4f} ({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
            if best is None or ev["ne"] < best[0]["eval"]["ne"]:
                best = (grid[-1], model, designs)
    chosen, model, designs = best
    return {
        "seed": seed,
        "encoding": chosen["encoding"],
        "l2": chosen["l2"],
        "num_features": designs["train"].num_features,
        "train": metrics(model, designs["train"]),
        "eval": chosen["eval"],
        "test": metrics(model, designs["test"]),
        "grid": grid,
    }


def _mean_std(xs: List[float]) -> Tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated initialisation seeds")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--encodings", default=",".join(ENCODINGS))
    p.add_argument("--l2", default=",".join(f"{x:g}" for x in L2_GRID), help="L2 grid")
    p.add_argument("--no-history", action="store_true", help="ablation: one-hot context only")
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    src, data, _, cont = prepare()
    n = {s: len(d.labels) for s, d in data.items()}
    print(
        f"MovieLens-100K examples: train {n['train']:,}, eval {n['eval']:,}, test {n['test']:,}"
        f" (label rate {', '.join(f'{s} {data[s].labels.mean():.4f}' for s in SPLITS)}); loaded in {time.perf_counter() - t0:.1f}s"
    )
    continuous = [] if args.no_history else None
    encodings = args.encodings.split(",")
    if args.no_history:
        encodings = ["raw"]  # nothing continuous to encode
    l2_grid = [float(x) for x in args.l2.split(",")]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(run_seed(src, data, cont, seed, encodings=encodings, l2_grid=l2_grid, continuous=continuous, max_iter=args.max_iter, verbose=args.verbose))
    runtime = time.perf_counter() - t0

    print(f"\n{'seed':>4} {'encoding':>8} {'l2':>7} | {'eval AUC':>8} {'eval NE':>8} {'eval LL':>8} | {'test AUC':>8} {'test NE':>8} {'test LL':>8}")
    for r in runs:
        e, t = r["eval"], r["test"]
        print(
            f"{r['seed']:>4} {r['encoding']:>8} {r['l2']:>7.0e} | {e['auc']:8.4f} {e['ne']:8.4f} {e['logloss']:8.4f} |"
            f" {t['auc']:8.4f} {t['ne']:8.4f} {t['logloss']:8.4f}"
        )
    summary: Dict[str, float] = {}
    for split in ("eval", "test"):
        for k in ("auc", "ne", "logloss"):
            summary[f"{split}_{k}"], summary[f"{split}_{k}_std"] = _mean_std([r[split][k] for r in runs])
    if len(runs) > 1:
        for split in ("eval", "test"):
            cells = ", ".join(f"{k} {summary[f'{split}_{k}']:.4f} ± {summary[f'{split}_{k}_std']:.1e}" for k in ("auc", "ne", "logloss"))
            print(f"{split} mean ± std over {len(runs)} seeds: {cells}")
    edges = [r for r in runs if r["l2"] in (min(l2_grid), max(l2_grid)) and len(l2_grid) > 1]
    if edges:
        print(f"note: the chosen L2 lies on the edge of the grid {list(l2_grid)}; widen --l2")
    print(f"runtime {runtime:.1f}s")
    # Top level: means over seeds (what movielens_quality.py report reads), then details.
    result = dict(
        summary, l2=[r["l2"] for r in runs], encoding=[r["encoding"] for r in runs], runs=runs, runtime_s=runtime, examples=n, no_history=args.no_history
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
