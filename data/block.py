"""Columnar numpy example blocks: what sources produce (no torch needed).

:func:`kunlun.data.batch.collate` turns an :class:`ExampleBlock` into a ``Batch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np


@dataclass
class Jagged:
    """Numpy jagged column: ``lengths [N]`` int, ``values [sum(lengths)]``."""

    lengths: np.ndarray
    values: np.ndarray


@dataclass
class EventColumns:
    """One event type's history for N examples; all three share ``lengths``."""

    lengths: np.ndarray  # [N] int
    items: np.ndarray  # [T] int64 table rows
    actions: np.ndarray  # [T] int64 table rows
    timestamps: np.ndarray  # [T] int64 seconds, oldest first within an example


@dataclass
class ExampleBlock:
    """N examples in columns, as sources produce them."""

    dense: np.ndarray  # [N, num_dense] float32
    context: Dict[str, Jagged]  # feature → ids
    events: Dict[str, EventColumns]  # event type → history
    request_time: np.ndarray  # [N] int64 seconds
    labels: np.ndarray  # [N, num_labels] float32
    weights: Optional[np.ndarray] = None  # [N] float32; 0 marks padding

    def __len__(self) -> int:
        return int(self.request_time.shape[0])


def gather_jagged(lengths: np.ndarray, values: np.ndarray, rows: np.ndarray) -> Jagged:
    """Select ``rows`` of a jagged column (vectorised)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    sel_len = lengths[rows]
    starts = offsets[rows]
    idx = ranges(starts, sel_len)
    return Jagged(sel_len.astype(np.int64), values[idx])


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each pair, without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_offsets = np.cumsum(lengths) - lengths  # start of each segment in the output
    rep_starts = np.repeat(starts.astype(np.int64) - out_offsets, lengths)
    return rep_starts + np.arange(total, dtype=np.int64)


def take_block(block: ExampleBlock, rows: np.ndarray) -> ExampleBlock:
    """Examples ``rows`` of a block (any order, repeats allowed)."""
    rows = np.asarray(rows, dtype=np.int64)
    events = {}
    for name, ev in block.events.items():
        offsets = np.zeros(len(ev.lengths) + 1, dtype=np.int64)
        np.cumsum(ev.lengths, out=offsets[1:])
        sel = ev.lengths[rows]
        idx = ranges(offsets[rows], sel)
        events[name] = EventColumns(sel.astype(np.int64), ev.items[idx], ev.actions[idx], ev.timestamps[idx])
    return ExampleBlock(
        dense=block.dense[rows],
        context={k: gather_jagged(j.lengths, j.values, rows) for k, j in block.context.items()},
        events=events,
        request_time=block.request_time[rows],
        labels=block.labels[rows],
        weights=None if block.weights is None else block.weights[rows],
    )


def concat_blocks(blocks: List[ExampleBlock]) -> ExampleBlock:
    """Blocks one after the other (same schema)."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    weights = None
    if any(b.weights is not None for b in blocks):
        weights = np.concatenate([b.weights if b.weights is not None else np.ones(len(b), np.float32) for b in blocks])
    return ExampleBlock(
        dense=np.concatenate([b.dense for b in blocks]),
        context={
            k: Jagged(np.concatenate([b.context[k].lengths for b in blocks]), np.concatenate([b.context[k].values for b in blocks])) for k in first.context
        },
        events={
            k: EventColumns(
                np.concatenate([b.events[k].lengths for b in blocks]),
                np.concatenate([b.events[k].items for b in blocks]),
                np.concatenate([b.events[k].actions for b in blocks]),
                np.concatenate([b.events[k].timestamps for b in blocks]),
            )
            for k in first.events
        },
        request_time=np.concatenate([b.request_time for b in blocks]),
        labels=np.concatenate([b.labels for b in blocks]),
        weights=weights,
    )


def block_nbytes(block: ExampleBlock) -> int:
    n = block.dense.nbytes + block.request_time.nbytes + block.labels.nbytes
    n += 0 if block.weights is None else block.weights.nbytes
    n += sum(j.lengths.nbytes + j.values.nbytes for j in block.context.values())
    n += sum(e.lengths.nbytes + e.items.nbytes + e.actions.nbytes + e.timestamps.nbytes for e in block.events.values())
    return int(n)
