"""``torch.export`` of every dense tower (``kunlun.model.export``): one program for any batch
size and any history lengths (a single example and empty histories included) that equals the
eager tower, and survives ``torch.export.save`` / ``load``.

The tiny synthetic job's schema; random weights in eval mode (export needs no training).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tower_configs import SMALL

from kunlun.data.batch import collate
from kunlun.data.block import take_block
from kunlun.data.sources import build_source
from kunlun.model.export import FlatTower, export_tower, flat_inputs
from kunlun.model.rec_model import RecModel
from kunlun.trainer.config import load_config


@pytest.fixture(scope="module")
def source():
    return build_source(load_config("tiny").data, 0)


def flat(model: RecModel, block, schema):
    with torch.no_grad():
        return flat_inputs(model.tower_inputs(collate(block, schema)), schema)


def with_empty_histories(block):
    """``block`` with every history emptied (T = 0 for every event type)."""
    for ev in block.events.values():
        ev.lengths = np.zeros_like(ev.lengths)
        ev.items, ev.actions, ev.timestamps = ev.items[:0], ev.actions[:0], ev.timestamps[:0]
    return block


@pytest.mark.parametrize("name", list(SMALL))
def test_exported_tower_equals_eager_for_every_batch_size_and_history_length(name, source, tmp_path):
    schema = source.schema
    torch.manual_seed(0)
    model = RecModel(schema, load_config("tiny", SMALL[name]).model, embedding_device=torch.device("cpu")).eval()
    trace = flat(model, source.read("test", np.arange(8)), schema)
    assert all(t.shape[0] >= 2 for t in trace[4]), "the trace batch must have histories"
    path = tmp_path / "tower.pt2"
    torch.export.save(export_tower(model.tower, schema, trace), str(path))
    program = torch.export.load(str(path)).module()
    eager = FlatTower(model.tower, schema).eval()
    cases = {
        "one example": source.read("test", np.arange(20, 21)),
        "257 examples": source.read("test", np.arange(257)),
        "empty histories": with_empty_histories(source.read("test", np.arange(30, 35))),
        "one example, empty histories": with_empty_histories(source.read("test", np.arange(40, 41))),
        "reordered": take_block(source.read("test", np.arange(100)), np.arange(99, -1, -3)),
    }
    for what, block in cases.items():
        inputs = flat(model, block, schema)
        with torch.no_grad():
            want, got = eager(*inputs), program(*inputs)
        assert got.shape == (len(block), 1), what
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), f"{name}, {what}: max diff {(got - want).abs().max():.3g}"
