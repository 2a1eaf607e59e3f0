"""Seeded synthetic source with a planted signal that needs both context and history.

Every random quantity of example ``i`` is a counter-based hash of ``(seed, split, i,
field, position)`` (SplitMix64), so any set of example indices is generated in one
vectorised numpy pass, in any order, on any rank or worker, identically every time:
no state, no files, millions of rows per second.

Generative story for one example:

* a user ``u``; each user prefers two item categories ``fav(u)`` (category of an item =
  ``item % num_categories``);
* two event types, ``click`` (0..max_seq_len events) and ``purchase`` (0..max_seq_len/4):
  each event's item is from a favourite category with probability 0.7, else uniform;
  actions are uniform; timestamps go back from the request time;
* a target item, from a favourite category with probability 0.5, else uniform;
* ``logit = s * (affinity - 0.35) + 0.5 * dense[0] + item_bias(item) + segment_bias``
  where ``affinity`` = share of clicked items in the target's category plus twice the
  share of purchased ones (0 without history), ``s = signal_strength``;
* ``label ~ Bernoulli(sigmoid(logit))``.

``signal="rich"`` (the scaling-law preset) makes the function harder, so that model
capacity keeps paying off: each history event's category match is weighted by its
action (``+1, +0.5, -1, 0`` for actions ``0..3``: a "dislike" counts against) and by its
recency (``exp(-age_rank / 8)``, newest event first, normalised over the history); a
history event on the target item itself counts 3× (repeat engagement; histories and
target share the ``item`` table); a rank-4 user × category preference ``0.35 · <p_u, q_c>``
is added (a second-order interaction of two context ids); and a fixed random 2-layer
tanh network of the dense features with standard deviation 1.5 (``_teacher``: a smooth
function that wider towers fit better).

A model must match the target item's category against the history (sequence features)
and use the item, dense and segment context to approach the Bayes AUC
(:meth:`SyntheticSource.oracle_logits` exposes the true logits for tests).

**Multi-task, multi-domain** (``data.synthetic.multitask.tasks`` non-empty; off by default,
and then nothing above changes): every example gets a domain ``d`` (uniform over
``1..num_domains``, the context feature ``domain`` with its own table) and one label per
task ``k``, from the oracle logit

``logit_k = shared · base + task_specific · z_k + domain_specific · (b_dk + g_dk(category))``

* ``base``: the single-task logit above (the part every task shares);
* ``z_k = (item_k(item) + pref_k(user, category) + dense_k) / sqrt(3)``: the task's own
  function of the example, unit variance: a per-item effect, a rank-2 user x category
  preference and a random unit-norm projection of the dense features, all drawn per task
  (what one task learns about them does not help another);
* ``b_dk``: a per-(domain, task) offset (base rates differ by surface) and ``g_dk(c)`` a
  per-(domain, task, item category) effect (what sells in one domain does not in another),
  both standard normal;
* binary tasks: ``label ~ Bernoulli(sigmoid(logit_k))``; regression tasks:
  ``label = logit_k + regression_noise · N(0, 1)`` (the oracle is the mean);
* ``missing_rate``: each task but the first loses that fraction of its labels (NaN),
  independently per example and task.

With ``task_specific = domain_specific = 0`` and ``shared = 1`` the first binary task's
labels are exactly the single-task labels (same random draws).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from kunlun.data.block import EventColumns, ExampleBlock, Jagged
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec

_SPLITS = {"train": 1, "eval": 2, "test": 3}
_REQUEST_TIME0 = 1_700_000_000  # seconds; request times grow with the example index
NUM_SEGMENTS = 64


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
    return x ^ (x >> np.uint64(31))


_ACTION_WEIGHTS = np.array([1.0, 0.5, -1.0, 0.0])  # rich signal: per-action sign/weight (actions mod 4)
_RECENCY_SCALE = 8.0  # rich signal: events; weight exp(-(age_rank - 1) / scale)
_PREF_RANK = 4  # rich signal: rank of the user x category preference
_TEACHER_WIDTH = 64  # rich signal: hidden units of the dense-feature teacher network
_TEACHER_SCALE = 1.5  # rich signal: standard deviation of the teacher term (logits)
_REPEAT_WEIGHT = 2.0  # rich signal: extra match weight of a history event on the target item itself
_MT_FIELD = 300  # multitask: first hash field of the per-example draws (domain, labels, missing, noise)
_MT_STATIC = 1000  # multitask: first static-hash field of the per-task functions
_MT_PREF_RANK = 2  # multitask: rank of each task's user x category preference


class _Hasher:
    def __init__(self, seed: int, split: str):
        self.base = np.uint64(_mix(np.array([seed * 8 + _SPLITS[split]], dtype=np.uint64))[0])

    def bits(self, field: int, idx: np.ndarray, pos: np.ndarray | int = 0) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = _mix(idx.astype(np.uint64) * np.uint64(0x100000001B3) ^ self.base)
            x = _mix(x ^ np.uint64(field * 0x9E37 + 1))
            return _mix(x + np.asarray(pos, dtype=np.uint64))

    def uniform(self, field: int, idx: np.ndarray, pos: np.ndarray | int = 0) -> np.ndarray:
        return (self.bits(field, idx, pos) >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    def integers(self, field: int, n: int, idx: np.ndarray, pos: np.ndarray | int = 0) -> np.ndarray:
        return (self.bits(field, idx, pos) % np.uint64(n)).astype(np.int64)

    def normal(self, field: int, idx: np.ndarray, pos: np.ndarray | int = 0) -> np.ndarray:
        u1 = np.clip(self.uniform(field, idx, pos), 1e-12, 1.0)
        u2 = self.uniform(field + 1000, idx, pos)
        return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def _static_hash(field: int, ids: np.ndarray, n: int) -> np.ndarray:
    """Per-id attribute (a user's favourite category, an item's bias): split independent."""
    with np.errstate(over="ignore"):
        return (_mix(ids.astype(np.uint64) * np.uint64(0x2545F4914F6CDD1D) + np.uint64(field)) % np.uint64(n)).astype(np.int64)


def _teacher(dense: np.ndarray) -> np.ndarray:
    """Rich signal: a fixed random 2-layer tanh network of the dense features, ``[N]``.

    A smooth nonlinear function that a wider dense tower fits better (student-teacher), so
    capacity keeps paying off; scaled to unit standard deviation over standard-normal
    inputs. Its weights depend only on the number of dense features, not on the seed.
    """
    n_dense = dense.shape[1]
    rng = np.random.default_rng(20261122 + n_dense)
    w1 = rng.normal(size=(n_dense, _TEACHER_WIDTH)) * (2.0 / np.sqrt(n_dense))
    b1 = rng.normal(size=_TEACHER_WIDTH) * 0.5
    w2 = rng.normal(size=_TEACHER_WIDTH)
    probe = np.random.default_rng(0).normal(size=(4096, n_dense))
    scale = np.std(np.tanh(probe @ w1 + b1) @ w2)
    return (np.tanh(dense.astype(np.float64) @ w1 + b1) @ w2) / scale


def _static_normal(field: int, ids: np.ndarray) -> np.ndarray:
    """Per-id standard normal (Box-Muller on two static hashes), ``[len(ids)]``."""
    u1 = (_static_hash(field, ids, 1 << 30) + 0.5) / float(1 << 30)
    u2 = _static_hash(field + 7919, ids, 1 << 30) / float(1 << 30)
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


class SyntheticSource:
    """Infinite-quality, finite-size synthetic splits (sizes from ``SyntheticConfig``)."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.bad_rows = 0
        c = cfg
        # Rich: histories and the target share the item table (as in production), so a
        # model can match a history event against the target id directly.
        hist_table = "item" if c.signal == "rich" else "seq_item"
        self.schema = FeatureSchema(
            tables=[
                TableSpec("user", c.num_users),
                TableSpec("item", c.num_items),
                TableSpec("category", c.num_categories),
                TableSpec("segment", NUM_SEGMENTS),
                *([] if c.signal == "rich" else [TableSpec("seq_item", c.num_items)]),
                TableSpec("action", c.num_actions),
            ],
            dense_features=[f"dense_{i}" for i in range(c.num_dense)],
            context_features=[
                ContextFeature("user_id", "user"),
                ContextFeature("item_id", "item"),
                ContextFeature("item_category", "category"),
                ContextFeature("user_segments", "segment", max_ids=3),
            ],
            event_types=[
                EventType("click", hist_table, "action", c.max_seq_len),
                EventType("purchase", hist_table, "action", max(1, c.max_seq_len // 4)),
            ],
            labels=["label"],
        )
        mt = c.multitask
        if mt.tasks:
            self.schema = FeatureSchema(
                tables=[*self.schema.tables, TableSpec("domain", mt.num_domains + 1)],
                dense_features=self.schema.dense_features,
                context_features=[*self.schema.context_features, ContextFeature("domain", "domain")],
                event_types=self.schema.event_types,
                labels=list(mt.tasks),
                label_types=["regression" if t in mt.regression else "binary" for t in mt.tasks],
            )
        self._sizes = {"train": c.train_examples, "eval": c.eval_examples, "test": c.test_examples}

    def num_examples(self, split: str) -> int:
        return self._sizes[split]

    # ---------------------------------------------------------------- generation
    def _favourite(self, users: np.ndarray, which: int) -> np.ndarray:
        return _static_hash(11 + which, users, self.cfg.num_categories)

    def _item_in_category(self, h: _Hasher, field: int, cats: np.ndarray, idx, pos) -> np.ndarray:
        per_cat = max(1, self.cfg.num_items // self.cfg.num_categories)
        k = h.integers(field, per_cat, idx, pos)
        return np.minimum(cats + k * self.cfg.num_categories, self.cfg.num_items - 1)

    def _history(self, h: _Hasher, field: int, idx: np.ndarray, users: np.ndarray, max_len: int, req: np.ndarray):
        c = self.cfg
        lengths = h.integers(field, max_len + 1, idx)
        row = np.repeat(np.arange(len(idx)), lengths)
        pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        eidx = idx[row]
        fav = np.where(h.uniform(field + 1, eidx, pos) < 0.5, self._favourite(users[row], 0), self._favourite(users[row], 1))
        from_fav = h.uniform(field + 2, eidx, pos) < 0.7
        items = np.where(
            from_fav,
            self._item_in_category(h, field + 3, fav, eidx, pos),
            h.integers(field + 4, c.num_items, eidx, pos),
        )
        actions = h.integers(field + 5, c.num_actions, eidx, pos)
        # Oldest first: event p of L happened (L - p) * gap seconds before the request.
        gaps = 60 + h.integers(field + 6, 3600, eidx)
        back = (np.repeat(lengths, lengths) - pos) * gaps
        ts = req[row] - back
        return lengths, items, actions, ts, row

    def read(self, split: str, indices: np.ndarray) -> ExampleBlock:
        """Examples ``indices`` (int array, each in ``[0, num_examples(split))``) of ``split``."""
        block, _ = self._generate(split, np.asarray(indices, dtype=np.int64))
        return block

    def oracle_logits(self, split: str, indices: np.ndarray) -> np.ndarray:
        """The true (noiseless) logits behind the labels, for tests, data reports and benchmarks.

        Single task (the default): ``[N]`` float64. Multi-task: ``[N, num_labels]`` float64,
        columns in label order: each binary task's logit, each regression task's mean.
        ``.reshape(len(indices), -1)`` gives ``[N, num_labels]`` in both cases.
        """
        _, logits = self._generate(split, np.asarray(indices, dtype=np.int64))
        return logits

    def domains(self, split: str, indices: np.ndarray) -> np.ndarray:
        """The domain id (``1..num_domains``) of each example, ``[N]`` int64 (multi-task only)."""
        if not self.cfg.multitask.tasks:
            raise ValueError("the synthetic source has no domains: data.synthetic.multitask.tasks is empty")
        return _Hasher(self.seed, split).integers(_MT_FIELD, self.cfg.multitask.num_domains, np.asarray(indices, dtype=np.int64)) + 1

    def _multitask(self, hasher: "_Hasher", idx: np.ndarray, base: np.ndarray, users, items, cats, dense):
        """Multi-task labels ``[N, T]`` float32 (NaN = missing), oracle logits ``[N, T]``
        float64 and domains ``[N]`` (see the module docstring)."""
        mt = self.cfg.multitask
        num_rows, num_tasks = len(idx), len(mt.tasks)
        domains = hasher.integers(_MT_FIELD, mt.num_domains, idx) + 1
        logits = np.empty((num_rows, num_tasks))
        labels = np.empty((num_rows, num_tasks), dtype=np.float32)
        for k, task in enumerate(mt.tasks):
            f = _MT_STATIC + 100 * k
            item_k = _static_normal(f, items)
            pref_k = sum(_static_normal(f + 10 + r, users) * _static_normal(f + 20 + r, cats) for r in range(_MT_PREF_RANK)) / np.sqrt(_MT_PREF_RANK)
            dense_k = 0.0
            if self.cfg.num_dense:
                w = np.random.default_rng(20261201 + k).normal(size=self.cfg.num_dense)
                dense_k = dense.astype(np.float64) @ (w / np.linalg.norm(w))
            z_k = (item_k + pref_k + dense_k) / np.sqrt(3.0)
            # per (domain, task): an offset and a category effect; ids packed as domain * C + category
            offset = _static_normal(f + 30, domains)
            cat_effect = _static_normal(f + 31, domains * self.cfg.num_categories + cats)
            logit = mt.shared * base + mt.task_specific * z_k + mt.domain_specific * (offset + cat_effect)
            logits[:, k] = logit
            if task in mt.regression:
                labels[:, k] = logit + mt.regression_noise * hasher.normal(_MT_FIELD + 10 + k, idx)
            else:
                # the first task reuses the single-task draw (field 9): same labels when only `shared` is set
                u = hasher.uniform(9 if k == 0 else _MT_FIELD + 30 + k, idx)
                labels[:, k] = u < 1.0 / (1.0 + np.exp(-logit))
            if k > 0 and mt.missing_rate > 0:
                labels[hasher.uniform(_MT_FIELD + 60 + k, idx) < mt.missing_rate, k] = np.nan
        return labels, logits, domains

    def _generate(self, split: str, idx: np.ndarray):
        cfg = self.cfg
        hasher = _Hasher(self.seed, split)
        num_rows = len(idx)
        users = hasher.integers(1, cfg.num_users, idx)
        req = _REQUEST_TIME0 + idx * 7
        target_fav = np.where(hasher.uniform(2, idx) < 0.5, self._favourite(users, 0), self._favourite(users, 1))
        items = np.where(
            hasher.uniform(3, idx) < 0.5,
            self._item_in_category(hasher, 4, target_fav, idx, 0),
            hasher.integers(5, cfg.num_items, idx),
        )
        cats = items % cfg.num_categories
        n_seg = 1 + hasher.integers(6, 3, idx)
        seg_row = np.repeat(np.arange(num_rows), n_seg)
        seg_pos = np.arange(n_seg.sum()) - np.repeat(np.cumsum(n_seg) - n_seg, n_seg)
        segments = (_static_hash(7, users, NUM_SEGMENTS)[seg_row] + seg_pos * 17) % NUM_SEGMENTS
        dense = np.stack([hasher.normal(100 + j, idx) for j in range(cfg.num_dense)], axis=1).astype(np.float32).reshape(num_rows, cfg.num_dense)

        events: Dict[str, EventColumns] = {}
        affinity = np.zeros(num_rows)
        for k, (et, weight) in enumerate(zip(self.schema.event_types, (1.0, 2.0))):
            lengths, ev_items, actions, ts, row = self._history(hasher, 20 + 10 * k, idx, users, et.max_len, req)
            events[et.name] = EventColumns(lengths, ev_items, actions, ts)
            match = (ev_items % cfg.num_categories == cats[row]).astype(np.float64)
            if cfg.signal == "rich":
                pos = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                age_rank = np.repeat(lengths, lengths) - pos  # 1 = newest
                recency = np.exp(-(age_rank - 1) / _RECENCY_SCALE)
                match = match + _REPEAT_WEIGHT * (ev_items == items[row])  # the very item again
                num = np.bincount(row, weights=match * _ACTION_WEIGHTS[actions % 4] * recency, minlength=num_rows)
                share = num / np.maximum(np.bincount(row, weights=recency, minlength=num_rows), 1e-12)
            else:
                share = np.bincount(row, weights=match, minlength=num_rows) / np.maximum(lengths, 1)
            affinity += weight * share

        item_bias = _static_hash(8, items, 1000) / 1000.0 - 0.5
        seg_bias = 0.3 * (np.bincount(seg_row, weights=(segments % 4 == 0), minlength=num_rows) > 0)
        dense0 = dense[:, 0] if cfg.num_dense else 0.0
        logits = cfg.signal_strength * (affinity - 0.35) + 0.5 * dense0 + item_bias + seg_bias
        if cfg.signal == "rich":
            pref = sum(_static_normal(40 + rank, users) * _static_normal(50 + rank, cats) for rank in range(_PREF_RANK))
            logits = logits + 0.35 * pref
            if cfg.num_dense:
                logits = logits + _TEACHER_SCALE * _teacher(dense)
        ones = np.ones(num_rows, dtype=np.int64)
        context = {
            "user_id": Jagged(ones, users),
            "item_id": Jagged(ones, items),
            "item_category": Jagged(ones, cats),
            "user_segments": Jagged(n_seg, segments),
        }
        if cfg.multitask.tasks:
            labels, logits, domains = self._multitask(hasher, idx, logits, users, items, cats, dense)
            context["domain"] = Jagged(ones, domains)
        else:
            labels = (hasher.uniform(9, idx) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)[:, None]
        block = ExampleBlock(dense=dense, context=context, events=events, request_time=req, labels=labels)
        return block, logits
