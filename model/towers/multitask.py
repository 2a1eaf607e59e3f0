"""A tower under a multi-task head: ``model.tower`` ends in a representation, the
:class:`MultiTaskHead` (MMoE / PLE / domain-aware) turns it into one output per task."""

from __future__ import annotations

from typing import Dict

import torch

from kunlun.common import ConfigError
from kunlun.data.schema import FeatureSchema
from kunlun.model.modules.multitask import MultiTaskHead
from kunlun.model.towers.base import DenseTower, TowerInputs


def domain_count(schema: FeatureSchema, feature: str) -> int:
    """Rows of ``feature``'s table (its ids are the domain ids); 0 for no feature. The feature
    must be a single-id context feature."""
    if not feature:
        return 0
    by_name = {f.name: f for f in schema.context_features}
    if feature not in by_name:
        raise ConfigError(
            f"config key 'model.multitask.domain_feature' = {feature!r} is invalid: expected one of the context features {sorted(by_name)}",
            key="model.multitask.domain_feature",
        )
    f = by_name[feature]
    if f.max_ids != 1:
        raise ConfigError(
            f"config key 'model.multitask.domain_feature' = {feature!r} is invalid: it holds up to {f.max_ids} ids; a domain feature has one id per example",
            key="model.multitask.domain_feature",
        )
    return schema.table_sizes[f.table]


class MultiTaskTower(DenseTower):
    """``body`` (any tower built with ``num_labels = tower_out``) → ``[B, tower_out]`` →
    :class:`MultiTaskHead` → ``[B, num_tasks]``."""

    def __init__(self, body: DenseTower, num_tasks: int, cfg, num_domains: int = 0):
        super().__init__(body.schema, body.embedding_dim, num_tasks)
        self.body = body
        self.head = MultiTaskHead(body.num_labels, num_tasks, cfg, num_domains)

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        domain = inputs.domain
        if self.head.num_domains and domain is None:
            raise ValueError("MultiTaskTower: the model has a domain feature but the inputs carry no domain ids")
        return self.head(self.body(inputs), domain)

    def flops_per_example(self, avg_seq_len: Dict[str, float]) -> float:
        return self.body.flops_per_example(avg_seq_len) + self.head.flops_per_example()

    def fixed_flops(self) -> float:
        return self.body.fixed_flops() if hasattr(self.body, "fixed_flops") else 0.0
