"""``Batch``: the one batch type used by loaders, models, trainer and metrics.

Sources hand over columnar numpy ``ExampleBlock``s (``kunlun.data.block``, numpy only);
:func:`collate` turns one into a ``Batch`` of torch tensors and TorchRec
``KeyedJaggedTensor``s. Sequences stay jagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from kunlun.data.block import (  # noqa: F401 - numpy-only types, re-exported
    EventColumns,
    ExampleBlock,
    Jagged,
    block_nbytes,
    concat_blocks,
    gather_jagged,
    ranges,
    take_block,
)
from kunlun.data.schema import FeatureSchema


@dataclass
class Batch(Pipelineable):
    """A batch of B examples.

    Attributes:
        dense: ``[B, num_dense]`` float32.
        context: KJT with keys ``schema.context_keys``, one or more ids per feature.
        sequences: KJT with keys ``schema.sequence_keys`` (``<event>.item``, ``<event>.action``),
            jagged, oldest event first; item and action of one event type share lengths.
        timestamps: KJT with one key per event type, int64 seconds, same lengths as the
            event type's item sequence.
        request_time: ``[B]`` int64 seconds.
        labels: ``[B, num_labels]`` float32: 0/1 for binary labels, any float for regression
            ones, NaN where a label is missing (``schema.label_types``).
        weights: ``[B]`` float32 example weights; padding examples (end of an eval split) have 0.
        position: the split's global stream position (examples consumed by all ranks) once
            this batch is trained; -1 when unknown. A pipeline that reads ahead hands back the
            batch it trained, and the trainer saves its position, so a resumed job reads the
            batches that were read but not trained again.
    """

    dense: torch.Tensor
    context: KeyedJaggedTensor
    sequences: KeyedJaggedTensor
    timestamps: KeyedJaggedTensor
    request_time: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    position: int = -1

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            context=self.context.to(device, non_blocking=non_blocking),
            sequences=self.sequences.to(device, non_blocking=non_blocking),
            timestamps=self.timestamps.to(device, non_blocking=non_blocking),
            request_time=self.request_time.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            position=self.position,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        if self.dense.device.type != "cuda":  # streams order CUDA memory only (TorchRec's pipelines call this on CPU too)
            return
        for t in (self.dense, self.request_time, self.labels, self.weights):
            t.record_stream(stream)
        for kjt in (self.context, self.sequences, self.timestamps):
            kjt.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense=self.dense.pin_memory(),
            context=self.context.pin(),
            sequences=self.sequences.pin(),
            timestamps=self.timestamps.pin(),
            request_time=self.request_time.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            position=self.position,
        )


def _kjt(keys: List[str], columns: List[Jagged]) -> KeyedJaggedTensor:
    lengths = np.concatenate([c.lengths for c in columns]) if columns else np.zeros(0)
    values = np.concatenate([c.values for c in columns]) if columns else np.zeros(0)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32)),
    )


def collate(block: ExampleBlock, schema: FeatureSchema) -> Batch:
    """Columnar numpy block → ``Batch`` (KJT values are key-major, as TorchRec expects)."""
    n = len(block)
    context = _kjt(schema.context_keys, [block.context[k] for k in schema.context_keys])
    seq_cols: List[Jagged] = []
    ts_cols: List[Jagged] = []
    for e in schema.event_types:
        ev = block.events[e.name]
        seq_cols += [Jagged(ev.lengths, ev.items), Jagged(ev.lengths, ev.actions)]
        ts_cols.append(Jagged(ev.lengths, ev.timestamps))
    weights = block.weights if block.weights is not None else np.ones(n, dtype=np.float32)
    return Batch(
        dense=torch.from_numpy(np.ascontiguousarray(block.dense, dtype=np.float32)).reshape(n, schema.num_dense),
        context=context,
        sequences=_kjt(schema.sequence_keys, seq_cols),
        timestamps=_kjt([e.name for e in schema.event_types], ts_cols),
        request_time=torch.from_numpy(np.ascontiguousarray(block.request_time, dtype=np.int64)),
        labels=torch.from_numpy(np.ascontiguousarray(block.labels, dtype=np.float32)).reshape(n, len(schema.labels)),
        weights=torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
    )
