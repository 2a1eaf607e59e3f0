"""The feature schema: what one training example holds.

An example has

* ``dense``: ``num_dense`` float features, ``[B, num_dense]`` in a batch;
* **context** categorical features: each a bag of one or more ids (user id, target item,
  genres, ...), looked up in an ``EmbeddingBagCollection`` and pooled to ``[B, D]``;
* **event sequences**, one per event type (e.g. ``click``, ``like``): the user's earlier
  events of that type, oldest first, each with an item id, an action id (rating, dwell
  bucket, ...) and a timestamp in seconds. They stay jagged (``lengths [B]``,
  ``values [sum(lengths)]``) and go through an unpooled ``EmbeddingCollection``;
* ``request_time`` (seconds) of the example, the reference point for event ages;
* one or more ``labels``, ``[B, num_labels]`` float32, each of a type (``label_types``):
  ``binary`` (0/1; a probability in [0, 1] is allowed as a soft label) or ``regression``
  (any finite float). **NaN marks a missing label**: that task's loss and metrics skip
  the example (a task observed on some examples only, e.g. a purchase label outside the
  shop surface).

Each categorical or sequence attribute names the embedding table it feeds; features
that name the same table share it (e.g. every event type's item ids use one item table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

LABEL_TYPES = ("binary", "regression")


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: ``num_embeddings`` rows (ids must lie in ``[0, num_embeddings)``)."""

    name: str
    num_embeddings: int


@dataclass(frozen=True)
class ContextFeature:
    """A categorical context feature; ``max_ids`` > 1 marks a multi-valued feature."""

    name: str
    table: str
    max_ids: int = 1


@dataclass(frozen=True)
class EventType:
    """One kind of user-history event (click, like, purchase, ...)."""

    name: str
    item_table: str
    action_table: str
    max_len: int  # most recent events kept per example

    @property
    def item_key(self) -> str:
        return f"{self.name}.item"

    @property
    def action_key(self) -> str:
        return f"{self.name}.action"


@dataclass
class FeatureSchema:
    tables: List[TableSpec]
    dense_features: List[str]
    context_features: List[ContextFeature]
    event_types: List[EventType]
    labels: List[str] = field(default_factory=lambda: ["label"])
    # One per label: "binary" or "regression"; empty (the default) = every label binary.
    label_types: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"schema: duplicate table names in {names}")
        tables = set(names)
        for f in self.context_features:
            if f.table not in tables:
                raise ValueError(f"schema: context feature {f.name!r} uses unknown table {f.table!r}; tables: {sorted(tables)}")
        for e in self.event_types:
            for t in (e.item_table, e.action_table):
                if t not in tables:
                    raise ValueError(f"schema: event type {e.name!r} uses unknown table {t!r}; tables: {sorted(tables)}")
        if not self.labels:
            raise ValueError("schema: at least one label is required")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"schema: duplicate label names in {self.labels}")
        if not self.label_types:
            self.label_types = ["binary"] * len(self.labels)
        self.label_types = list(self.label_types)
        if len(self.label_types) != len(self.labels):
            raise ValueError(f"schema: label_types {self.label_types} must give one type per label {self.labels} ({len(self.labels)})")
        for name, kind in zip(self.labels, self.label_types):
            if kind not in LABEL_TYPES:
                raise ValueError(f"schema: label {name!r} has label type {kind!r}: expected one of {list(LABEL_TYPES)}")
        ctx = [f.name for f in self.context_features]
        dup = sorted({k for k in ctx if ctx.count(k) > 1} | (set(ctx) & set(self.sequence_keys)))
        if dup:
            # a shared table's context features are looked up beside the sequence keys (model/embeddings.py)
            raise ValueError(f"schema: feature names {dup} are used twice (context features and sequence keys <event>.item/.action must differ)")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def label_type(self, name: str) -> str:
        """``binary`` or ``regression`` for the label ``name``."""
        return self.label_types[self.labels.index(name)]

    @property
    def num_dense(self) -> int:
        return len(self.dense_features)

    @property
    def table_sizes(self) -> Dict[str, int]:
        return {t.name: t.num_embeddings for t in self.tables}

    @property
    def context_keys(self) -> List[str]:
        """Keys of the context KJT, in order."""
        return [f.name for f in self.context_features]

    @property
    def sequence_keys(self) -> List[str]:
        """Keys of the sequence KJT, in order: ``<event>.item``, ``<event>.action`` per event type."""
        keys: List[str] = []
        for e in self.event_types:
            keys += [e.item_key, e.action_key]
        return keys

    def sequence_tables(self) -> Dict[str, List[str]]:
        """table → sequence KJT keys that read it."""
        out: Dict[str, List[str]] = {}
        for e in self.event_types:
            out.setdefault(e.item_table, []).append(e.item_key)
            out.setdefault(e.action_table, []).append(e.action_key)
        return out

    def context_tables(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for f in self.context_features:
            out.setdefault(f.table, []).append(f.name)
        return out

    def describe(self) -> str:
        """A printable table of the schema (printed at job start)."""
        rows: List[Tuple[str, str, str]] = [("dense", ", ".join(self.dense_features) or "-", "")]
        sizes = self.table_sizes
        for f in self.context_features:
            rows.append((f"context {f.name}", f"table {f.table} ({sizes[f.table]:,} rows)", f"≤{f.max_ids} ids"))
        for e in self.event_types:
            rows.append((f"events {e.name}", f"item→{e.item_table}, action→{e.action_table}", f"≤{e.max_len} events"))
        shown = [name if kind == "binary" else f"{name} ({kind})" for name, kind in zip(self.labels, self.label_types)]
        rows.append(("labels", ", ".join(shown), ""))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)
