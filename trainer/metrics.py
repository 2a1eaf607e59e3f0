"""Ranking metrics: NE (normalized entropy), AUC, log loss — exact over a whole split.

Eval metrics are computed over every example of the split (weighted; padding has weight
0), gathered from all ranks with tensor collectives (no pickles), so they do not depend on
the world size. TorchRec's
``RecMetricModule`` is built for windowed metrics on the training stream; for exact
split-level numbers that tests can check against a direct computation we keep these
few lines instead.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

_EPS = 1e-12


def log_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    """Weighted mean binary cross-entropy in nats. ``logits``, ``labels``, ``weights``: ``[N]``."""
    w = torch.ones_like(labels, dtype=torch.float64) if weights is None else weights.double()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="none")
    return float((ce * w).sum() / w.sum().clamp(min=_EPS))


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    """Log loss divided by the entropy of the (weighted) base rate: < 1 beats predicting the CTR."""
    w = torch.ones_like(labels, dtype=torch.float64) if weights is None else weights.double()
    p = float((labels.double() * w).sum() / w.sum().clamp(min=_EPS))
    p = min(max(p, _EPS), 1 - _EPS)
    base = -(p * torch.log(torch.tensor(p, dtype=torch.float64)) + (1 - p) * torch.log(torch.tensor(1 - p, dtype=torch.float64)))
    return log_loss(logits, labels, weights) / float(base)


def auc(scores: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    """Weighted ROC AUC (ties count 1/2). NaN when a class is missing."""
    s = scores.double().flatten()
    y = labels.double().flatten()
    w = torch.ones_like(s) if weights is None else weights.double().flatten()
    order = torch.argsort(s)
    s, y, w = s[order], y[order], w[order]
    # Group equal scores: within a tie group a positive beats half the negatives.
    _, counts = torch.unique_consecutive(s, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    neg_w = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, w * (1 - y))
    pos_w = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, w * y)
    neg_below = torch.cumsum(neg_w, 0) - neg_w
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    return float(((neg_below + 0.5 * neg_w) * pos_w).sum() / (total_pos * total_neg))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, C]`` rows in rank order (a collective). Row counts may
    differ: they are exchanged first and the rows padded to the largest for ``all_gather``."""
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), local.shape[1], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def _masked(values: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """The rows whose label is present (not NaN) with positive weight."""
    keep = ~torch.isnan(labels) & (weights > 0)
    return values[keep], labels[keep], weights[keep]


def task_metrics(outputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, task_type: str) -> Dict[str, float]:
    """One task's metrics over ``[N]`` outputs/labels/weights (missing labels dropped):
    binary → ``auc``, ``ne``, ``logloss``; regression → ``mse``, ``mae`` (weighted means);
    plus ``examples`` (weight of the labelled rows)."""
    x, y, w = _masked(outputs, labels, weights)
    out: Dict[str, float] = {"examples": float(w.sum())}
    if task_type == "binary":
        out.update(auc=auc(x, y, w), ne=normalized_entropy(x, y, w), logloss=log_loss(x, y, w))
    else:
        err = x.double() - y.double()
        denom = w.double().sum().clamp(min=_EPS)
        out.update(mse=float((err**2 * w).sum() / denom), mae=float((err.abs() * w).sum() / denom))
    return out


class EvalAccumulator:
    """Collects ``(outputs, labels, weights[, domain])`` batches on each rank; :meth:`compute`
    gathers them over ranks (collective) and returns the metrics of every task.

    Names: one binary task → ``auc``, ``ne``, ``logloss`` (as before tasks existed). Several
    tasks → ``<task>/<metric>`` (binary: auc, ne, logloss; regression: mse, mae) and the means
    over the binary tasks under the plain names (``auc``, ``ne``, ``logloss``; over regression
    tasks ``mse``, ``mae`` when there is no binary task), so ``eval/ne`` stays a valid early
    stopping metric. With domains also ``<task>/<domain>/<metric>`` per domain id seen.
    ``examples`` is the total example weight.
    """

    def __init__(self, tasks):
        """``tasks``: :class:`kunlun.model.tasks.TaskSpec` list (or label names: binary tasks)."""
        from kunlun.model.tasks import TaskSpec

        self.tasks = [TaskSpec(t, t, j, "binary", 1.0) if isinstance(t, str) else t for j, t in enumerate(tasks)]
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._weights: List[torch.Tensor] = []
        self._domains: List[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, domain: Optional[torch.Tensor] = None) -> None:
        self._logits.append(logits.detach().float().cpu())
        self._labels.append(labels.detach().float().cpu())
        self._weights.append(weights.detach().float().cpu())
        if domain is not None:
            self._domains.append(domain.detach().long().cpu())

    def _gathered(self):
        t = len(self.tasks)
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, t)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, t)
        weights = torch.cat(self._weights) if self._weights else torch.zeros(0)
        domains = torch.cat(self._domains) if self._domains else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Tensor collectives, not pickles: one float64 matrix per rank, rows = examples,
            # columns = logits | labels | weight | domain (ids < 2^53 are exact in float64).
            cols = [logits.double(), labels.double(), weights.double()[:, None]]
            if domains is not None:
                cols.append(domains.double()[:, None])
            rows = gather_rows(torch.cat(cols, dim=1))
            logits, labels, weights = rows[:, :t].float(), rows[:, t : 2 * t].float(), rows[:, 2 * t].float()
            domains = rows[:, 2 * t + 1].long() if domains is not None else None
        return logits, labels, weights, domains

    def compute(self) -> Dict[str, float]:
        logits, labels, weights, domains = self._gathered()
        out: Dict[str, float] = {"examples": float(weights.sum())}
        single = len(self.tasks) == 1 and self.tasks[0].type == "binary"
        per_type: Dict[str, Dict[str, List[float]]] = {"binary": {}, "regression": {}}
        for j, task in enumerate(self.tasks):
            vals = task_metrics(logits[:, j], labels[:, j], weights, task.type)
            vals.pop("examples")
            for k, v in vals.items():
                per_type[task.type].setdefault(k, []).append(v)
                if not single:
                    out[f"{task.name}/{k}"] = v
            if domains is not None:
                for d in torch.unique(domains).tolist():
                    sel = domains == d
                    dv = task_metrics(logits[sel, j], labels[sel, j], weights[sel], task.type)
                    if dv["examples"] > 0:
                        for k, v in dv.items():
                            out[f"{task.name}/{d}/{k}"] = v
        means = per_type["binary"] or per_type["regression"]
        for k, v in means.items():
            out[k] = sum(v) / len(v)
        return out


def summary(metrics: Dict[str, float], tasks) -> str:
    """One console line for ``metrics`` (an evaluator's result): the mean metrics, then, with
    several tasks, each task's (``auc 0.7712 | ne 0.8290 | logloss 0.5650 || click: auc ...``)."""

    def fmt(prefix: str) -> str:
        names = [k for k in ("auc", "ne", "logloss", "mse", "mae") if f"{prefix}{k}" in metrics]
        return " | ".join(f"{k} {metrics[prefix + k]:.4f}" for k in names)

    line = fmt("")
    if len(tasks) > 1:
        line += " || " + " || ".join(f"{t.name}: {fmt(t.name + '/')}" for t in tasks)
    return line
