"""A dense tower behind a flat tensor signature, for ``torch.export`` (serving).

``torch.export`` takes tensors (and pytrees of them), not the :class:`TowerInputs` /
:class:`EventSequence` dataclasses, and the embedding lookups stay outside the exported
graph (the tables are stored apart so they can be quantized and swapped; a serving system
looks them up itself). :class:`FlatTower` therefore takes the already looked-up embeddings::

    dense         [B, num_dense] float32
    context       [B, C, D] float32   pooled context features, in ``schema.context_keys`` order
    request_time  [B] int64 seconds
    domain        [B] int64 domain ids (``model.multitask.domain_feature``; zeros without one)
    events        per event type (``schema.event_types`` order), four tensors:
                  item [T_e, D] float32, action [T_e, D] float32, timestamps [T_e] int64,
                  lengths [B] int64 (T_e = lengths.sum(), oldest event first per example)
    →  outputs [B, num_tasks] float32 (logits of binary tasks, predictions of regression tasks)

B and every T_e are dynamic (any B >= 1, any T_e >= 0); the tower code keeps one graph
for all of them (no branches on sizes, totals taken from shapes, not from ``offsets[-1]``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.towers.base import DenseTower, EventSequence, TowerInputs

MAX_BATCH = 1 << 24  # the dynamic dims' upper bounds (export needs finite ones only for checks)
MAX_EVENTS = 1 << 31


class FlatTower(nn.Module):
    """``tower`` with the flat signature of the module docstring."""

    def __init__(self, tower: DenseTower, schema: FeatureSchema):
        super().__init__()
        self.tower = tower
        self.context_keys: List[str] = list(schema.context_keys)
        self.event_names: List[str] = [e.name for e in schema.event_types]

    def forward(self, dense: torch.Tensor, context: torch.Tensor, request_time: torch.Tensor, domain: torch.Tensor, events: Tuple[torch.Tensor, ...]):
        seqs = {}
        for i, name in enumerate(self.event_names):
            item, action, timestamps, lengths = events[4 * i : 4 * i + 4]
            offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
            seqs[name] = EventSequence(item=item, action=action, timestamps=timestamps, lengths=lengths, offsets=offsets)
        ctx = {k: context[:, j] for j, k in enumerate(self.context_keys)}
        uses_domain = getattr(getattr(self.tower, "head", None), "num_domains", 0)
        return self.tower(TowerInputs(dense=dense, context=ctx, events=seqs, request_time=request_time, domain=domain if uses_domain else None))


def flat_inputs(inputs: TowerInputs, schema: FeatureSchema) -> Tuple:
    """:class:`TowerInputs` → the positional arguments of :meth:`FlatTower.forward`."""
    b = inputs.dense.shape[0]
    if schema.context_keys:
        context = torch.stack([inputs.context[k] for k in schema.context_keys], dim=1)
    else:
        context = inputs.dense.new_zeros((b, 0, 0))
    events: List[torch.Tensor] = []
    for e in schema.event_types:
        ev = inputs.events[e.name]
        events += [ev.item, ev.action, ev.timestamps.long(), ev.lengths.long()]
    domain = inputs.domain.long() if inputs.domain is not None else torch.zeros(b, dtype=torch.long, device=inputs.dense.device)
    return inputs.dense, context, inputs.request_time.long(), domain, tuple(events)


def dynamic_shapes(schema: FeatureSchema) -> Tuple:
    """The ``dynamic_shapes`` of :meth:`FlatTower.forward`: B shared by every per-example
    tensor, one total per event type shared by its item/action/timestamps."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    events: List[dict] = []
    for e in schema.event_types:
        total = Dim(f"events_{e.name}", min=0, max=MAX_EVENTS)
        events += [{0: total}, {0: total}, {0: total}, {0: batch}]
    return ({0: batch}, {0: batch}, {0: batch}, {0: batch}, tuple(events))


def export_tower(tower: DenseTower, schema: FeatureSchema, example: Sequence) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``FlatTower(tower)`` in eval mode, traced on ``example`` (flat inputs
    of a real batch with B >= 2 and some events: sizes 0 and 1 would be specialised)."""
    flat = FlatTower(tower, schema).eval()
    with torch.no_grad():
        return torch.export.export(flat, tuple(example), dynamic_shapes=dynamic_shapes(schema), strict=False)
