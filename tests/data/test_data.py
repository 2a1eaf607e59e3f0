"""Schema, Batch/collate, jagged helpers, the synthetic source and the sharded loader."""

from __future__ import annotations

import itertools
from typing import Dict, List

import numpy as np
import pytest
import torch

from kunlun.data.batch import Batch, EventColumns, ExampleBlock, Jagged, collate, gather_jagged, ranges
from kunlun.data.loader import ShardedBatches, make_loader
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.data.sources.synthetic import SyntheticSource
from kunlun.trainer.config import SyntheticConfig
from kunlun.trainer.metrics import auc


# ============================================================================ schema
def _schema(**kw) -> FeatureSchema:
    args = dict(
        tables=[TableSpec("user", 10), TableSpec("item", 20), TableSpec("tag", 5), TableSpec("action", 3)],
        dense_features=["d0", "d1"],
        context_features=[ContextFeature("user_id", "user"), ContextFeature("tags", "tag", max_ids=3)],
        event_types=[EventType("click", "item", "action", 4), EventType("buy", "item", "action", 2)],
    )
    args.update(kw)
    return FeatureSchema(**args)


def test_schema_keys_and_tables():
    s = _schema()
    assert s.num_dense == 2
    assert s.context_keys == ["user_id", "tags"]
    assert s.sequence_keys == ["click.item", "click.action", "buy.item", "buy.action"]
    assert s.table_sizes == {"user": 10, "item": 20, "tag": 5, "action": 3}
    assert s.sequence_tables() == {"item": ["click.item", "buy.item"], "action": ["click.action", "buy.action"]}
    assert s.context_tables() == {"user": ["user_id"], "tag": ["tags"]}
    text = s.describe()
    assert "click" in text and "≤4 events" in text and "≤3 ids" in text and "user (10 rows)" in text


def test_schema_unknown_table_in_context_feature():
    with pytest.raises(ValueError) as ei:
        _schema(context_features=[ContextFeature("user_id", "users")])
    msg = str(ei.value)
    assert "'user_id'" in msg and "'users'" in msg and "'user'" in msg


def test_schema_unknown_table_in_event_type():
    with pytest.raises(ValueError) as ei:
        _schema(event_types=[EventType("click", "item", "actions", 4)])
    msg = str(ei.value)
    assert "'click'" in msg and "'actions'" in msg


def test_schema_duplicate_tables():
    with pytest.raises(ValueError, match="duplicate table names") as ei:
        _schema(tables=[TableSpec("user", 10), TableSpec("user", 11), TableSpec("item", 20), TableSpec("tag", 5), TableSpec("action", 3)])
    assert "'user', 'user'" in str(ei.value)


def test_schema_needs_a_label():
    with pytest.raises(ValueError, match="label"):
        _schema(labels=[])


# ============================================================================ collate
def _block() -> ExampleBlock:
    """3 examples with hand-written, distinguishable values."""
    return ExampleBlock(
        dense=np.array([[0.5, 1.5], [2.5, 3.5], [4.5, 5.5]], dtype=np.float32),
        context={
            "user_id": Jagged(np.array([1, 1, 1]), np.array([7, 8, 9])),
            "tags": Jagged(np.array([2, 0, 3]), np.array([1, 2, 3, 4, 0])),
        },
        events={
            "click": EventColumns(
                lengths=np.array([1, 3, 0]),
                items=np.array([11, 12, 13, 14]),
                actions=np.array([0, 1, 2, 1]),
                timestamps=np.array([100, 200, 201, 202]),
            ),
            "buy": EventColumns(
                lengths=np.array([0, 1, 2]),
                items=np.array([15, 16, 17]),
                actions=np.array([2, 2, 0]),
                timestamps=np.array([300, 400, 401]),
            ),
        },
        request_time=np.array([1000, 1001, 1002]),
        labels=np.array([[1.0], [0.0], [1.0]], dtype=np.float32),
    )


def test_collate_layout():
    s = _schema()
    b = collate(_block(), s)
    assert isinstance(b, Batch)
    assert b.batch_size == 3
    assert b.dense.dtype == torch.float32 and b.dense.shape == (3, 2)
    assert b.dense[1].tolist() == [2.5, 3.5]

    assert b.context.keys() == ["user_id", "tags"]
    assert b.context.lengths().tolist() == [1, 1, 1, 2, 0, 3]
    assert b.context.values().tolist() == [7, 8, 9, 1, 2, 3, 4, 0]  # key-major
    assert [t.tolist() for t in b.context["tags"].to_dense()] == [[1, 2], [], [3, 4, 0]]
    assert b.context.values().dtype == torch.int64

    assert b.sequences.keys() == s.sequence_keys
    assert b.sequences.lengths().tolist() == [1, 3, 0, 1, 3, 0, 0, 1, 2, 0, 1, 2]
    assert b.sequences.values().tolist() == [11, 12, 13, 14, 0, 1, 2, 1, 15, 16, 17, 2, 2, 0]
    assert [t.tolist() for t in b.sequences["click.item"].to_dense()] == [[11], [12, 13, 14], []]
    assert [t.tolist() for t in b.sequences["buy.action"].to_dense()] == [[], [2], [2, 0]]

    assert b.timestamps.keys() == ["click", "buy"]
    for e in s.event_types:
        assert b.timestamps[e.name].lengths().tolist() == b.sequences[e.item_key].lengths().tolist()
        assert b.timestamps[e.name].lengths().tolist() == b.sequences[e.action_key].lengths().tolist()
    assert b.timestamps.values().tolist() == [100, 200, 201, 202, 300, 400, 401]
    assert b.timestamps.values().dtype == torch.int64

    assert b.request_time.tolist() == [1000, 1001, 1002] and b.request_time.dtype == torch.int64
    assert b.labels.shape == (3, 1) and b.labels[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert b.weights.tolist() == [1.0, 1.0, 1.0] and b.weights.dtype == torch.float32


def test_collate_keeps_weights():
    block = _block()
    block.weights = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    assert collate(block, _schema()).weights.tolist() == [1.0, 0.0, 1.0]


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in ("dense", "request_time", "labels", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("context", "sequences", "timestamps"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys(), name
        assert torch.equal(x.lengths(), y.lengths()), name
        assert torch.equal(x.values(), y.values()), name


def test_batch_to_cpu_round_trip():
    b = collate(_block(), _schema())
    c = b.to(torch.device("cpu"))
    assert isinstance(c, Batch)
    _assert_batches_equal(b, c)
    assert c.sequences.keys() == _schema().sequence_keys
    assert [t.tolist() for t in c.sequences["click.item"].to_dense()] == [[11], [12, 13, 14], []]


# ============================================================================ jagged helpers
def test_ranges_matches_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 12))
        starts = rng.integers(0, 100, n)
        lengths = rng.integers(0, 6, n)
        expected = [x for start, length in zip(starts, lengths) for x in range(start, start + length)]
        got = ranges(starts, lengths)
        assert got.dtype == np.int64
        assert got.tolist() == expected
    assert ranges(np.array([5, 9]), np.array([0, 0])).tolist() == []
    assert ranges(np.array([3, 0, 7]), np.array([2, 1, 3])).tolist() == [3, 4, 0, 7, 8, 9]


def test_gather_jagged_matches_loop():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 15))
        lengths = rng.integers(0, 5, n)
        values = rng.integers(0, 1000, int(lengths.sum()))
        rows = rng.integers(0, n, int(rng.integers(0, 20)))  # repeats and any order
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        exp_vals = [v for r in rows for v in values[offsets[r] : offsets[r + 1]]]
        got = gather_jagged(lengths, values, rows)
        assert got.lengths.tolist() == lengths[rows].tolist()
        assert got.values.tolist() == exp_vals
    got = gather_jagged(np.array([2, 0, 1]), np.array([10, 11, 12]), np.array([2, 0, 1, 2]))
    assert got.lengths.tolist() == [1, 2, 0, 1]
    assert got.values.tolist() == [12, 10, 11, 12]


# ============================================================================ synthetic source
def _syn_cfg(**kw) -> SyntheticConfig:
    args = dict(
        num_users=500,
        num_items=400,
        num_categories=20,
        max_seq_len=16,
        train_examples=5000,
        eval_examples=20000,
        test_examples=2000,
    )
    args.update(kw)
    return SyntheticConfig(**args)


def _block_equal(a: ExampleBlock, b: ExampleBlock) -> None:
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.request_time, b.request_time)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.context.keys() == b.context.keys()
    for k in a.context:
        np.testing.assert_array_equal(a.context[k].lengths, b.context[k].lengths)
        np.testing.assert_array_equal(a.context[k].values, b.context[k].values)
    assert a.events.keys() == b.events.keys()
    for k in a.events:
        for f in ("lengths", "items", "actions", "timestamps"):
            np.testing.assert_array_equal(getattr(a.events[k], f), getattr(b.events[k], f))


def _rows(block: ExampleBlock, rows: np.ndarray) -> ExampleBlock:
    """Rows of a block, through gather_jagged (reference for subset reads)."""
    return ExampleBlock(
        dense=block.dense[rows],
        context={k: gather_jagged(j.lengths, j.values, rows) for k, j in block.context.items()},
        events={
            k: EventColumns(
                gather_jagged(e.lengths, e.items, rows).lengths,
                gather_jagged(e.lengths, e.items, rows).values,
                gather_jagged(e.lengths, e.actions, rows).values,
                gather_jagged(e.lengths, e.timestamps, rows).values,
            )
            for k, e in block.events.items()
        },
        request_time=block.request_time[rows],
        labels=block.labels[rows],
    )


def test_synthetic_deterministic_and_random_access():
    src = SyntheticSource(_syn_cfg(), seed=3)
    a = src.read("train", np.arange(10))
    _block_equal(a, src.read("train", np.arange(10)))
    _block_equal(a, SyntheticSource(_syn_cfg(), seed=3).read("train", np.arange(10)))
    rows = np.array([5, 3, 9])
    sub = src.read("train", rows)
    _block_equal(sub, _rows(a, rows))
    assert sub.request_time.tolist() == a.request_time[[5, 3, 9]].tolist()
    # other seed / split give other data
    other = SyntheticSource(_syn_cfg(), seed=4).read("train", np.arange(10))
    assert not np.array_equal(other.dense, a.dense)
    assert not np.array_equal(src.read("eval", np.arange(10)).dense, a.dense)


def test_synthetic_ids_in_range_and_shapes():
    cfg = _syn_cfg()
    src = SyntheticSource(cfg, seed=0)
    n = 3000
    block = src.read("train", np.arange(n))
    sizes = src.schema.table_sizes
    assert block.dense.shape == (n, cfg.num_dense) and block.dense.dtype == np.float32
    assert block.labels.shape == (n, 1)
    for f in src.schema.context_features:
        col = block.context[f.name]
        assert len(col.lengths) == n and col.lengths.sum() == len(col.values)
        assert col.lengths.min() >= 1 and col.lengths.max() <= f.max_ids
        assert col.values.min() >= 0 and col.values.max() < sizes[f.table], f.name
    np.testing.assert_array_equal(block.context["item_category"].values, block.context["item_id"].values % cfg.num_categories)
    for e in src.schema.event_types:
        ev = block.events[e.name]
        assert len(ev.lengths) == n
        assert ev.lengths.min() >= 0 and ev.lengths.max() <= e.max_len
        assert ev.lengths.max() == e.max_len  # the maximum is reached in 3000 examples
        assert len(ev.items) == len(ev.actions) == len(ev.timestamps) == ev.lengths.sum()
        assert ev.items.min() >= 0 and ev.items.max() < sizes[e.item_table]
        assert ev.actions.min() >= 0 and ev.actions.max() < sizes[e.action_table]
    # the collated batch has every id within its table, too
    b = collate(block, src.schema)
    assert b.sequences.keys() == src.schema.sequence_keys


def test_synthetic_timestamps_before_request_and_ascending():
    src = SyntheticSource(_syn_cfg(), seed=0)
    idx = np.random.default_rng(0).permutation(5000)[:2000]
    block = src.read("train", idx)
    for e in src.schema.event_types:
        ev = block.events[e.name]
        row = np.repeat(np.arange(len(idx)), ev.lengths)
        assert np.all(ev.timestamps < block.request_time[row])
        # ascending (strictly) within each example: consecutive events of the same row
        same = row[1:] == row[:-1]
        assert np.all(np.diff(ev.timestamps)[same] > 0)


def test_synthetic_label_rate():
    src = SyntheticSource(_syn_cfg(), seed=0)
    rate = float(src.read("eval", np.arange(20000)).labels.mean())
    assert 0.2 < rate < 0.8


def _affinity(block: ExampleBlock, num_categories: int) -> np.ndarray:
    """Share of clicks in the target's category + 2 × share of purchases (0 without history)."""
    n = len(block)
    cats = block.context["item_category"].values
    out = np.zeros(n)
    for name, weight in (("click", 1.0), ("purchase", 2.0)):
        ev = block.events[name]
        row = np.repeat(np.arange(n), ev.lengths)
        match = (ev.items % num_categories == cats[row]).astype(float)
        out += weight * np.bincount(row, weights=match, minlength=n) / np.maximum(ev.lengths, 1)
    return out


def test_synthetic_oracle_auc_and_history_signal():
    cfg = _syn_cfg()
    idx = np.arange(20000)
    src = SyntheticSource(cfg, seed=0)
    block = src.read("eval", idx)
    labels = torch.from_numpy(block.labels[:, 0])
    logits = src.oracle_logits("eval", idx)
    oracle_auc = auc(torch.from_numpy(logits), labels)
    assert oracle_auc > 0.7

    # Same seed, no signal: every other term is identical, so the difference of the
    # logits is exactly the affinity term, which we recompute from the history columns.
    flat = SyntheticSource(_syn_cfg(signal_strength=0.0), seed=0)
    logits0 = flat.oracle_logits("eval", idx)
    aff = _affinity(block, cfg.num_categories)
    np.testing.assert_allclose(logits - logits0, cfg.signal_strength * (aff - 0.35), atol=1e-9)
    assert aff.std() > 0.1  # the history term varies across examples

    # Without the history term the true logits rank the same labels clearly worse.
    no_history_auc = auc(torch.from_numpy(logits0), labels)
    assert no_history_auc < oracle_auc - 0.1
    # ... and a no-signal source's own oracle AUC is lower as well.
    flat_labels = torch.from_numpy(flat.read("eval", idx).labels[:, 0])
    assert auc(torch.from_numpy(logits0), flat_labels) < oracle_auc - 0.08


def _rich_affinity(block: ExampleBlock, num_categories: int) -> np.ndarray:
    """Action-signed, recency-weighted version of ``_affinity`` where the target item itself
    counts 3x, written event by event."""
    weights = {0: 1.0, 1: 0.5, 2: -1.0, 3: 0.0}
    cats = block.context["item_category"].values
    targets = block.context["item_id"].values
    out = np.zeros(len(block))
    for name, scale in (("click", 1.0), ("purchase", 2.0)):
        ev = block.events[name]
        start = 0
        for i, n in enumerate(ev.lengths):
            num = den = 0.0
            for p in range(n):  # oldest first: the newest event (p = n - 1) weighs exp(0)
                r = np.exp(-(n - 1 - p) / 8.0)
                item = ev.items[start + p]
                match = float(item % num_categories == cats[i]) + 2.0 * float(item == targets[i])
                num += r * weights[int(ev.actions[start + p]) % 4] * match
                den += r
            out[i] += scale * (num / den if n else 0.0)
            start += n
    return out


def test_synthetic_rich_signal_weights_history_by_action_and_recency():
    idx = np.arange(3000)
    rich = SyntheticSource(_syn_cfg(signal="rich"), seed=0)
    block = rich.read("eval", idx)
    # Inputs are identical to the basic source's; only the logits (and so labels) differ.
    basic_block = SyntheticSource(_syn_cfg(), seed=0).read("eval", idx)
    np.testing.assert_array_equal(block.events["click"].actions, basic_block.events["click"].actions)
    flat = SyntheticSource(_syn_cfg(signal="rich", signal_strength=0.0), seed=0)
    diff = rich.oracle_logits("eval", idx) - flat.oracle_logits("eval", idx)
    np.testing.assert_allclose(diff, 2.0 * (_rich_affinity(block, 20) - 0.35), atol=1e-9)
    # Histories and target share one item table, so a model can match them id for id.
    assert {e.item_table for e in rich.schema.event_types} == {"item"} and "seq_item" not in {t.name for t in rich.schema.tables}
    clicks = block.events["click"]
    assert np.any(clicks.items == np.repeat(block.context["item_id"].values, clicks.lengths))  # repeats happen
    # The rich terms without history (preference, dense teacher) vary too and move the labels.
    assert flat.oracle_logits("eval", idx).std() > SyntheticSource(_syn_cfg(signal_strength=0.0), seed=0).oracle_logits("eval", idx).std()
    labels = torch.from_numpy(rich.read("eval", np.arange(20000)).labels[:, 0])
    assert auc(torch.from_numpy(rich.oracle_logits("eval", np.arange(20000))), labels) > 0.7


# ============================================================================ sharded loader
class FakeSource:
    """Each example carries its identity: dense = [index, split code], request_time = index."""

    SPLITS = {"train": 1.0, "eval": 2.0, "test": 3.0}

    def __init__(self, sizes: Dict[str, int]):
        self.sizes = sizes
        self.bad_rows = 0
        self.schema = FeatureSchema(
            tables=[TableSpec("id", 1_000_000), TableSpec("act", 3)],
            dense_features=["index", "split"],
            context_features=[ContextFeature("ex", "id")],
            event_types=[EventType("ev", "id", "act", 3)],
        )

    def num_examples(self, split: str) -> int:
        return self.sizes[split]

    def read(self, split: str, indices: np.ndarray) -> ExampleBlock:
        idx = np.asarray(indices, dtype=np.int64)
        assert idx.min(initial=0) >= 0 and idx.max(initial=0) < self.sizes[split]
        n = len(idx)
        lengths = idx % 3
        row = np.repeat(np.arange(n), lengths)
        return ExampleBlock(
            dense=np.stack([idx.astype(np.float32), np.full(n, self.SPLITS[split], np.float32)], axis=1),
            context={"ex": Jagged(np.ones(n, dtype=np.int64), idx)},
            events={"ev": EventColumns(lengths, idx[row], np.zeros(len(row), dtype=np.int64), idx[row] - 1)},
            request_time=idx,
            labels=(idx % 2).astype(np.float32)[:, None],
        )


def _ids(batch: Batch) -> List[int]:
    ids = batch.request_time.tolist()
    assert batch.dense[:, 0].long().tolist() == ids
    assert batch.context.values().tolist() == ids
    return ids


def _global_stream(src, split, G, W, n_batches, **kw) -> List[List[int]]:
    """Global batches (rank slices concatenated in rank order) for world size W."""
    per_rank = []
    for r in range(W):
        ds = ShardedBatches(src, split, G, rank=r, world_size=W, **kw)
        per_rank.append([_ids(ds.batch(i)) for i in range(n_batches)])
    return [sum((per_rank[r][i] for r in range(W)), []) for i in range(n_batches)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_train_epoch_exactly_once_across_ranks(world_size, shuffle):
    n, G = 48, 8
    src = FakeSource({"train": n, "eval": 10, "test": 10})
    seen: List[int] = []
    per_rank_sets = []
    for r in range(world_size):
        ds = ShardedBatches(src, "train", G, rank=r, world_size=world_size, seed=7, shuffle=shuffle, max_batches=n // G)
        assert ds.local_batch_size == G // world_size
        mine = [i for b in ds for i in _ids(b)]
        assert len(mine) == n // world_size
        per_rank_sets.append(set(mine))
        seen += mine
    assert sorted(seen) == list(range(n))
    assert set.union(*per_rank_sets) == set(range(n))
    if world_size > 1:
        assert all(a.isdisjoint(b) for a, b in itertools.combinations(per_rank_sets, 2))
    if not shuffle:
        ds = ShardedBatches(src, "train", G, rank=1 % world_size, world_size=world_size, shuffle=False)
        first = _ids(ds.batch(0))
        start = (1 % world_size) * (G // world_size)
        assert first == list(range(start, start + G // world_size))


def test_train_stream_independent_of_world_size():
    src = FakeSource({"train": 50, "eval": 10, "test": 10})
    ref = _global_stream(src, "train", 8, 1, 14, seed=3)
    for W in (2, 4):
        assert _global_stream(src, "train", 8, W, 14, seed=3) == ref
    flat = sum(ref, [])
    # 112 positions over a 50-example split: epochs 0 and 1 are permutations, epoch 2 starts
    assert sorted(flat[:50]) == list(range(50))
    assert sorted(flat[50:100]) == list(range(50))
    assert flat[:50] != list(range(50))


def test_shuffle_changes_order_across_epochs_but_keeps_exactly_once():
    n, G = 40, 8
    src = FakeSource({"train": n, "eval": 10, "test": 10})
    ds = ShardedBatches(src, "train", G, seed=11, shuffle=True, max_batches=3 * n // G)
    flat = [i for b in ds for i in _ids(b)]
    epochs = [flat[k * n : (k + 1) * n] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    # the same seed gives the same order; another seed another one
    again = ShardedBatches(src, "train", G, seed=11, shuffle=True, max_batches=n // G)
    assert [i for b in again for i in _ids(b)] == epochs[0]
    other = ShardedBatches(src, "train", G, seed=12, shuffle=True, max_batches=n // G)
    assert [i for b in other for i in _ids(b)] != epochs[0]
    # no shuffle: identity every epoch
    plain = ShardedBatches(src, "train", G, shuffle=False, max_batches=2 * n // G)
    assert [i for b in plain for i in _ids(b)] == list(range(n)) * 2
    assert plain.epoch == 0


def test_resume_continues_with_next_examples():
    n, G, k = 50, 8, 4
    src = FakeSource({"train": n, "eval": 10, "test": 10})
    full = _global_stream(src, "train", G, 2, 12, seed=5)

    # Save at 2 ranks after k batches: the trainer advances the position by G per step.
    ds = ShardedBatches(src, "train", G, rank=0, world_size=2, seed=5)
    state = ds.state_dict()
    assert state == {"examples_consumed": 0, "split": "train"}
    state["examples_consumed"] += k * G

    # Continue at 2 ranks and at 1 rank: exactly the next examples, nothing skipped or repeated.
    assert _global_stream(src, "train", G, 2, 12 - k, seed=5, examples_consumed=state["examples_consumed"]) == full[k:]
    assert _global_stream(src, "train", G, 1, 12 - k, seed=5, examples_consumed=state["examples_consumed"]) == full[k:]
    resumed = ShardedBatches(src, "train", G, rank=0, world_size=1, seed=5)
    resumed.load_state_dict(state)
    assert resumed.examples_consumed == k * G
    assert resumed.epoch == 0
    assert _ids(resumed.batch(0)) == full[k]
    # across an epoch boundary: position 56 is epoch 1
    resumed.load_state_dict({"examples_consumed": 7 * G})
    assert resumed.epoch == 1
    assert _ids(resumed.batch(0)) == full[7]


def test_batch_index_relative_to_position():
    src = FakeSource({"train": 30, "eval": 10, "test": 10})
    ds = ShardedBatches(src, "train", 6, shuffle=False, examples_consumed=27)
    assert _ids(ds.batch(0)) == [27, 28, 29, 0, 1, 2]  # wraps into the next epoch
    assert _ids(ds.batch(1)) == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_eval_split_padding(world_size):
    n, G = 50, 16
    src = FakeSource({"train": 100, "eval": n, "test": 7})
    batches = []
    for r in range(world_size):
        ds = ShardedBatches(src, "eval", G, rank=r, world_size=world_size, seed=1, shuffle=True)
        assert ds.num_batches() == 4
        mine = list(ds)
        assert len(mine) == 4  # every rank runs the same number of steps
        assert all(b.batch_size == G // world_size for b in mine)
        assert all(b.dense[:, 1].eq(2.0).all() for b in mine)  # read from the eval split
        batches.append(mine)
    valid: List[int] = []
    padding = 0
    for i in range(4):  # global order: batch by batch, ranks in order within a batch
        for r in range(world_size):
            b = batches[r][i]
            w = b.weights.tolist()
            ids = _ids(b)
            assert set(w) <= {0.0, 1.0}
            if i < 3:
                assert w == [1.0] * len(w)  # only the last global batch is padded
            valid += [x for x, wi in zip(ids, w) if wi == 1.0]
            padding += w.count(0.0)
    assert valid == list(range(n))  # in order, once each (eval is never shuffled)
    assert padding == 4 * G - n
    last = sum((_ids(batches[r][3]) for r in range(world_size)), [])
    last_w = sum((batches[r][3].weights.tolist() for r in range(world_size)), [])
    assert last_w == [1.0, 1.0] + [0.0] * (G - 2)
    assert last[:2] == [48, 49]


def test_eval_max_batches_and_exact_fit():
    src = FakeSource({"train": 100, "eval": 32, "test": 7})
    ds = ShardedBatches(src, "eval", 16, max_batches=1)
    assert ds.num_batches() == 1 and len(list(ds)) == 1
    ds = ShardedBatches(src, "eval", 16)
    bs = list(ds)
    assert len(bs) == 2 and all(b.weights.min() == 1.0 for b in bs)
    ds = ShardedBatches(src, "test", 4)
    bs = list(ds)
    assert [b.weights.tolist() for b in bs] == [[1.0] * 4, [1.0, 1.0, 1.0, 0.0]]
    assert all(b.dense[:, 1].eq(3.0).all() for b in bs)


def test_sharded_batches_argument_errors():
    src = FakeSource({"train": 10, "eval": 0, "test": 5})
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        ShardedBatches(src, "train", 8, world_size=3)
    with pytest.raises(ValueError, match="'eval'"):
        ShardedBatches(src, "eval", 4)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_loader_workers_preserve_order(split):
    src = FakeSource({"train": 37, "eval": 45, "test": 5})
    kw = dict(global_batch_size=8, rank=1, world_size=2, seed=2, max_batches=7 if split == "train" else None)
    ref = list(make_loader(ShardedBatches(src, split, **kw), num_workers=0))
    got = list(make_loader(ShardedBatches(src, split, **kw), num_workers=2))
    assert len(ref) == (7 if split == "train" else 6)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert isinstance(b, Batch)
        _assert_batches_equal(a, b)
    # rank 1 of 2 holds positions 44..47 of the last eval batch: one real example, 3 padding
    assert sum(b.weights.tolist().count(0.0) for b in got) == (3 if split == "eval" else 0)


# ============================================================================ bad rows
def test_bad_row_policy_is_one_mechanism(caplog):
    """BadRowTracker.bad and RowIssues word messages their own way but share the policy and the log cap."""
    import logging

    from kunlun.data.errors import BadRowTracker, DataError, RowIssues

    with pytest.raises(DataError, match=r"^f\.dat:3: field 'age' = 'x': expected an integer \(set data.bad_row_policy=skip to drop such rows\)$"):
        BadRowTracker("error").bad("f.dat", 3, "age", "x", "an integer")
    issues = RowIssues(BadRowTracker("error"), lambda i: f"f.csv:{i + 2}", 3)
    with pytest.raises(DataError, match=r"^f\.csv:3: column 'c' = '" + "v" * 77 + r"\.\.\.': expected a number \(set data"):
        issues.flag([False, True, True], "c", ["a", "v" * 100, "b"], "a number")

    caplog.set_level(logging.WARNING, logger="kunlun.data.errors")
    tracker = BadRowTracker("skip")
    issues = RowIssues(tracker, lambda i: f"f.csv:{i + 2}", 4)
    issues.flag([True, False, True, False], "c", lambda i: i, "a number")
    issues.fail(3, "row has 2 fields")
    for line in range(10):
        tracker.bad("f.dat", line + 1, "age", "x", "an integer")
    assert issues.bad.tolist() == [True, False, True, True]
    assert tracker.count == 10  # rows given to bad(); RowIssues counts with its mask
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad row")]
    assert len(logged) == BadRowTracker.MAX_REPORTED
    assert logged[:3] == [
        "skipping bad row: f.csv:2: column 'c' = 0: expected a number",
        "skipping bad row: f.csv:5: row has 2 fields",
        "skipping bad row: f.dat:1: field 'age' = 'x': expected an integer",
    ]
