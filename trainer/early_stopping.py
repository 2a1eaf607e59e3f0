"""Best-step tracking and early stopping on a validation metric.

:class:`BestTracker` sees every validation evaluation of a run, remembers the best one
(step, value and all its metrics) and counts evaluations without improvement. Its state
is plain JSON and travels in each checkpoint's ``meta.json``, so a resumed run stops at
exactly the step an uninterrupted one would, and still knows which step was best.

Improvement means beating the best value by more than ``min_delta`` in the metric's
direction (``mode``): ``ne`` and ``logloss`` are lower-is-better, ``auc`` higher.
``patience=0`` never stops early; the best step is tracked all the same (it is the step
the final test evaluates when ``checkpoint.keep_best`` is on).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

# Direction of every metric the evaluator reports (kunlun.trainer.metrics.EvalAccumulator).
METRIC_MODES = {"auc": "max", "ne": "min", "logloss": "min", "mse": "min", "mae": "min"}


def metric_mode(metric: str, mode: str) -> str:
    """``min``/``max`` for ``metric`` (``eval/ne``, ``eval/<task>/auc``); ``auto`` looks it up."""
    if mode != "auto":
        return mode
    name = metric.split("/")[-1]
    return METRIC_MODES[name if name in METRIC_MODES else metric.split("/")[1]]


class BestTracker:
    """Validation history reduced to what the trainer needs: the best step and when to stop.

    Args:
        metric: key of the validation metrics, ``eval/<name>`` or ``eval/<name>/<label>``.
        mode: ``min``, ``max`` or ``auto`` (from the metric's name).
        patience: evaluations in a row without improvement that stop training; 0 = never.
        min_delta: the least change (in the metric's units) that counts as an improvement.
    """

    def __init__(self, metric: str, mode: str = "auto", patience: int = 0, min_delta: float = 0.0):
        self.metric = metric
        self.mode = metric_mode(metric, mode)
        self.patience = patience
        self.min_delta = min_delta
        self.best_step: Optional[int] = None
        self.best_value: Optional[float] = None
        self.best_metrics: Dict[str, float] = {}
        self.evals_without_improvement = 0
        self.last_step: Optional[int] = None
        self.stopped = False

    def value_of(self, eval_metrics: Dict[str, float]) -> float:
        """The tracked value from an evaluator's result (keys without the ``eval/`` prefix)."""
        key = self.metric.split("/", 1)[1]
        if key not in eval_metrics:
            raise KeyError(f"trainer.early_stopping.metric={self.metric!r}: the evaluation reports {sorted(eval_metrics)}")
        return float(eval_metrics[key])

    def update(self, step: int, eval_metrics: Dict[str, float]) -> bool:
        """Record the evaluation made after ``step`` steps; True if it is the new best.

        A non-finite value (a diverged model) never counts as an improvement.
        """
        value = self.value_of(eval_metrics)
        if self.last_step == step:  # the same evaluation seen again (e.g. after a resume)
            return False
        self.last_step = step
        better = math.isfinite(value) and (
            self.best_value is None or (value < self.best_value - self.min_delta if self.mode == "min" else value > self.best_value + self.min_delta)
        )
        if better:
            self.best_step, self.best_value = step, value
            self.best_metrics = {k: float(v) for k, v in eval_metrics.items()}
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            if self.patience and self.evals_without_improvement >= self.patience:
                self.stopped = True
        return better

    def describe(self) -> str:
        if self.best_step is None:
            return f"no evaluation of {self.metric} yet"
        return (
            f"best {self.metric} {self.best_value:.5f} at step {self.best_step} "
            f"({self.evals_without_improvement} evaluation(s) since, patience {self.patience or 'off'})"
        )

    # ------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "best_metrics": dict(self.best_metrics),
            "evals_without_improvement": self.evals_without_improvement,
            "last_step": self.last_step,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue a run's history. A checkpoint tracked on another metric or direction
        starts the history afresh (the old best is not comparable). ``stopped`` is derived
        from this run's patience, so resuming a stopped run with a larger patience (or none)
        trains on."""
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            return
        self.best_step = state["best_step"]
        self.best_value = state["best_value"]
        self.best_metrics = dict(state.get("best_metrics", {}))
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.last_step = state.get("last_step")
        self.stopped = bool(self.patience) and self.evals_without_improvement >= self.patience
