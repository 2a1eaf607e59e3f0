"""Prediction tasks on the data's labels, and the multi-task loss.

A task reads one label column of ``labels [B, num_labels]``; NaN marks a missing label,
which adds nothing to that task's loss (nor to its metrics, ``kunlun.trainer.metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from kunlun.common import ConfigError
from kunlun.data.schema import FeatureSchema


@dataclass(frozen=True)
class TaskSpec:
    """A resolved task: ``label_index`` into ``labels [B, num_labels]``."""

    name: str
    label: str
    label_index: int
    type: str  # binary | regression
    weight: float
    loss: str = "mse"  # regression: mse | huber
    huber_delta: float = 1.0


def resolve_tasks(schema: FeatureSchema, model_cfg) -> List[TaskSpec]:
    """``model.tasks`` against the data's labels. Empty: one binary task per label (named
    after it), weighted ``1 / num_labels``, i.e. the mean over labels of before tasks existed."""
    labels = list(schema.labels)
    types = list(getattr(schema, "label_types", None) or ["binary"] * len(labels))
    if not model_cfg.tasks:
        return [TaskSpec(name, name, j, "binary" if types[j] == "binary" else "regression", 1.0 / len(labels)) for j, name in enumerate(labels)]
    out = []
    for i, t in enumerate(model_cfg.tasks):
        if t.label not in labels:
            key = f"model.tasks[{i}].label"
            raise ConfigError(f"config key {key!r} = {t.label!r} is invalid: expected one of the data's labels {labels}", key=key)
        j = labels.index(t.label)
        if t.type == "binary" and types[j] != "binary":
            raise ConfigError(
                f"config key 'model.tasks[{i}].type' = 'binary' is invalid: label {t.label!r} is a {types[j]} label (values outside 0/1); use type: regression",
                key=f"model.tasks[{i}].type",
            )
        out.append(TaskSpec(t.name, t.label, j, t.type, float(t.weight), t.loss, float(t.huber_delta)))
    return out


def is_default_single_task(tasks: List[TaskSpec]) -> bool:
    return len(tasks) == 1 and tasks[0].type == "binary"


def multitask_loss(outputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, tasks: List[TaskSpec]) -> torch.Tensor:
    """Scalar loss: ``sum_t weight_t * mean_t``, ``mean_t`` the example-weighted mean of task
    ``t``'s loss over the examples whose label is present (a task with none adds 0).

    Args:
        outputs: ``[B, T]`` logits (binary) / predictions (regression), task order.
        labels: ``[B, T]`` the tasks' labels (NaN = missing).
        weights: ``[B]`` example weights (0 = padding).
    """
    total: Optional[torch.Tensor] = None
    for t, task in enumerate(tasks):
        y = labels[:, t]
        present = ~torch.isnan(y)
        y = torch.where(present, y, torch.zeros_like(y))  # any value: masked out below
        x = outputs[:, t]
        if task.type == "binary":
            per = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        elif task.loss == "huber":
            per = F.huber_loss(x, y, reduction="none", delta=task.huber_delta)
        else:
            per = (x - y) ** 2
        w = weights * present.to(weights.dtype)
        term = (per * w).sum() / w.sum().clamp(min=1e-12) * task.weight
        total = term if total is None else total + term
    assert total is not None
    return total
