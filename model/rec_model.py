"""``RecModel``: embeddings + dense tower + loss — the module that ``parallel/`` shards."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kunlun.data.batch import Batch
from kunlun.data.schema import FeatureSchema
from kunlun.model.embeddings import build_embeddings
from kunlun.model.towers import build_tower
from kunlun.model.towers.base import EventSequence, TowerInputs


class RecModel(nn.Module):
    """Looks up ``batch.context`` (pooled) and ``batch.sequences`` (jagged), runs the tower.

    ``forward(batch)`` returns ``(loss, (loss.detach(), logits.detach(), labels, weights))``:
    the TorchRec convention of a scalar loss plus outputs for metrics. The loss is the
    example-weighted mean binary cross-entropy over all labels (padding has weight 0).
    """

    def __init__(self, schema: FeatureSchema, model_cfg, embedding_device: torch.device = torch.device("meta")):
        super().__init__()
        self.schema = schema
        self.ebc, self.ec = build_embeddings(schema, model_cfg.embedding_dim, embedding_device)
        self.tower = build_tower(schema, model_cfg, num_labels=len(schema.labels))

    def tower_inputs(self, batch: Batch) -> TowerInputs:
        context = self.ebc(batch.context).to_dict()
        seqs = self.ec(batch.sequences)
        ts = batch.timestamps.to_dict()
        events: Dict[str, EventSequence] = {}
        for e in self.schema.event_types:
            item, action = seqs[e.item_key], seqs[e.action_key]
            lengths = item.lengths().long()
            events[e.name] = EventSequence(
                item=item.values(),
                action=action.values(),
                timestamps=ts[e.name].values(),
                lengths=lengths,
                offsets=item.offsets().long(),
            )
        return TowerInputs(dense=batch.dense, context=context, events=events, request_time=batch.request_time)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.tower(self.tower_inputs(batch))  # [B, L]
        per_example = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(dim=1)
        w = batch.weights
        loss = (per_example * w).sum() / w.sum().clamp(min=1e-12)
        return loss, (loss.detach(), logits.detach(), batch.labels, w)
