"""Tables shared by context features and sequences (model/embeddings.py, RecModel.tower_inputs).

A context feature whose table also feeds sequences is looked up in the EmbeddingCollection
as a jagged feature and pooled in ``tower_inputs``; the tower still gets ``[B, D]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kunlun.data.batch import EventColumns, ExampleBlock, Jagged, collate
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.model.embeddings import build_embeddings, context_table_configs, ec_context_features, sequence_table_configs, shared_tables
from kunlun.model.rec_model import RecModel
from kunlun.trainer.config import load_config

D = 8


def _schema(context=None, events=None) -> FeatureSchema:
    return FeatureSchema(
        tables=[TableSpec("user", 10), TableSpec("item", 20), TableSpec("tag", 6)],
        dense_features=["d"],
        context_features=context
        if context is not None
        else [
            ContextFeature("user_id", "user"),
            ContextFeature("item_id", "item"),
            ContextFeature("tags", "tag", max_ids=3),
        ],
        event_types=events if events is not None else [EventType("click", "item", "tag", 4)],
    )


def _block(schema: FeatureSchema) -> ExampleBlock:
    ctx = {
        "user_id": Jagged(np.array([1, 1, 1]), np.array([3, 4, 5])),
        "item_id": Jagged(np.array([1, 1, 1]), np.array([7, 0, 19])),
        "tags": Jagged(np.array([2, 0, 3]), np.array([1, 2, 3, 4, 5])),
    }
    events = {e.name: EventColumns(np.array([1, 3, 0]), np.array([7, 8, 9, 10]), np.array([1, 1, 2, 0]), np.array([1, 2, 3, 4])) for e in schema.event_types}
    return ExampleBlock(
        dense=np.ones((3, 1), np.float32),
        context={f.name: ctx[f.name] for f in schema.context_features},
        events=events,
        request_time=np.array([10, 10, 10]),
        labels=np.array([[1.0], [0.0], [1.0]], np.float32),
    )


def test_shared_tables_live_in_the_embedding_collection_only():
    s = _schema()
    assert shared_tables(s) == ["item", "tag"]
    assert [f.name for f in ec_context_features(s)] == ["item_id", "tags"]
    assert [(c.name, c.feature_names) for c in context_table_configs(s, D)] == [("ctx_user", ["user_id"])]
    assert [(c.name, c.feature_names) for c in sequence_table_configs(s, D)] == [
        ("seq_item", ["click.item", "item_id"]),
        ("seq_tag", ["click.action", "tags"]),
    ]
    ebc, ec = build_embeddings(s, D, torch.device("cpu"))
    assert sorted(ebc.embedding_bags.keys()) == ["ctx_user"] and sorted(ec.embeddings.keys()) == ["seq_item", "seq_tag"]


def test_pooled_context_of_a_shared_table_equals_the_table_rows():
    s = _schema()
    torch.manual_seed(0)
    model = RecModel(s, load_config("tiny", ["model.embedding_dim=8"]).model, embedding_device=torch.device("cpu"))
    batch = collate(_block(s), s)
    inp = model.tower_inputs(batch)
    assert list(inp.context) == ["user_id", "item_id", "tags"]  # schema order
    item_w = model.ec.embeddings["seq_item"].weight
    tag_w = model.ec.embeddings["seq_tag"].weight
    user_w = model.ebc.embedding_bags["ctx_user"].weight
    torch.testing.assert_close(inp.context["item_id"], item_w[[7, 0, 19]])  # single id: sum = the row
    expected_tags = torch.stack([tag_w[[1, 2]].mean(0), torch.zeros(D), tag_w[[3, 4, 5]].mean(0)])  # multi-valued: mean
    torch.testing.assert_close(inp.context["tags"], expected_tags)
    torch.testing.assert_close(inp.context["user_id"], user_w[[3, 4, 5]])
    torch.testing.assert_close(inp.events["click"].item, item_w[[7, 8, 9, 10]])  # the same table as the target item
    torch.testing.assert_close(inp.events["click"].action, tag_w[[1, 1, 2, 0]])
    loss, _ = model(batch)
    loss.backward()
    assert item_w.grad is not None and item_w.grad[19].abs().sum() > 0  # the target item's gradient reaches the shared row


@pytest.mark.parametrize("case", ["all_context_shared", "no_sequences"])
def test_schemas_with_an_empty_collection_train(case):
    if case == "all_context_shared":
        s = _schema(context=[ContextFeature("item_id", "item"), ContextFeature("tags", "tag", max_ids=3)])
    else:
        s = _schema(events=[])
    model = RecModel(s, load_config("tiny", ["model.embedding_dim=8"]).model, embedding_device=torch.device("cpu"))
    assert (len(model.ebc.embedding_bag_configs()) == 0) == (case == "all_context_shared")
    assert (len(model.ec.embedding_configs()) == 0) == (case == "no_sequences")
    block = _block(s)
    loss, out = model(collate(block, s))
    logits = out.logits
    assert logits.shape == (3, 1) and torch.isfinite(loss)
    loss.backward()


def test_context_feature_names_must_differ_from_sequence_keys():
    with pytest.raises(ValueError, match=r"\['click.item'\] are used twice"):
        _schema(context=[ContextFeature("click.item", "item")])
