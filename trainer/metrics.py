"""Ranking metrics: NE (normalized entropy), AUC, log loss — exact over a whole split.

Eval metrics are computed over every example of the split (weighted; padding has weight
0), gathered from all ranks, so they do not depend on the world size. TorchRec's
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


class EvalAccumulator:
    """Collects ``(logits, labels, weights)`` batches on each rank; :meth:`compute` gathers
    them over ranks (collective) and returns metrics per label and averaged."""

    def __init__(self, label_names: List[str]):
        self.label_names = label_names
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._weights: List[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        self._logits.append(logits.detach().float().cpu())
        self._labels.append(labels.detach().float().cpu())
        self._weights.append(weights.detach().float().cpu())

    def _gathered(self):
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, len(self.label_names))
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, len(self.label_names))
        weights = torch.cat(self._weights) if self._weights else torch.zeros(0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank ran the same number of equally sized batches (padding has weight 0).
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (logits, labels, weights))
            logits = torch.cat([p[0] for p in parts])
            labels = torch.cat([p[1] for p in parts])
            weights = torch.cat([p[2] for p in parts])
        return logits, labels, weights

    def compute(self) -> Dict[str, float]:
        logits, labels, weights = self._gathered()
        out: Dict[str, float] = {"examples": float(weights.sum())}
        per: Dict[str, List[float]] = {"auc": [], "ne": [], "logloss": []}
        for j, name in enumerate(self.label_names):
            vals = {
                "auc": auc(logits[:, j], labels[:, j], weights),
                "ne": normalized_entropy(logits[:, j], labels[:, j], weights),
                "logloss": log_loss(logits[:, j], labels[:, j], weights),
            }
            for k, v in vals.items():
                per[k].append(v)
                if len(self.label_names) > 1:
                    out[f"{k}/{name}"] = v
        for k, v in per.items():
            out[k] = sum(v) / len(v)
        return out
