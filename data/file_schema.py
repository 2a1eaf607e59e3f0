"""The declared schema of a file source: ``data.files.schema`` → columns, tables, events.

A user describes every column of their Parquet or CSV files in the job YAML::

    data:
      source: parquet
      files:
        train: /data/logs/train/
        schema:
          tables:  [{name: item, num_embeddings: 500000}]
          events:  [{name: click, max_len: 50}]
          columns:
            - {name: clicked, role: label, dtype: int64}
            - {name: item_id, role: categorical, dtype: string, table: item}
            - {name: click_items, role: sequence, dtype: list<string>, event: click, table: item}

:func:`resolve` checks that description (every error names the config key, the value and
what is allowed) and turns it into a :class:`FilePlan`; :meth:`FilePlan.feature_schema`
gives the :class:`~kunlun.data.schema.FeatureSchema` that drives the embedding configs
and the batch. No per-data-set Python.

Roles:

* ``label`` (one or more; ``threshold`` turns a value into ``value >= threshold``),
  ``weight`` (at most one), ``dense`` (``transform: log1p``, ``fill`` for nulls),
  ``request_time`` (seconds, or a string parsed with ``time_format``), ``ignore``;
* ``categorical``: a context feature, single-valued (scalar dtype) or multi-valued
  (``list<...>``, ``max_ids`` kept);
* ``sequence``: one attribute of an event type's history, ``attribute: item`` (required per
  event), ``action`` or ``timestamp`` (lists of the same length as the items).

Tables are shared by naming the same ``table`` (e.g. the target item and every history's
items). A table nobody declares is created with the defaults. An event type without an
action column gets actions 0 from a 1-row table ``_no_action``; without a timestamp column
its events carry the request time.

Importable without torch or pyarrow (config validation uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

ROLES = ("label", "weight", "dense", "categorical", "sequence", "request_time", "ignore")
DTYPES = ("int64", "float32", "string", "list<int64>", "list<string>")
ROLE_DTYPES = {
    "label": ("int64", "float32"),
    "weight": ("int64", "float32"),
    "dense": ("int64", "float32"),
    "categorical": ("int64", "string", "list<int64>", "list<string>"),
    "request_time": ("int64", "string"),
    "ignore": DTYPES + ("",),
}
SEQUENCE_DTYPES = {"item": ("list<int64>", "list<string>"), "action": ("list<int64>", "list<string>"), "timestamp": ("list<int64>",)}
ATTRIBUTES = ("item", "action", "timestamp")
ID_MAPPINGS = ("hash", "vocab", "identity")
TRANSFORMS = ("none", "log1p")
ORDERS = ("oldest_first", "newest_first")
SPLITS = ("paths", "time", "rows")
NO_ACTION_TABLE = "_no_action"
PREFIX = "data.files"


class FileSchemaError(ValueError):
    """A bad ``data.files`` setting: ``key``, ``value`` and what is ``allowed``."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"config key {key!r} = {value!r} is invalid: expected {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise FileSchemaError(key, value, allowed)


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column, resolved (defaults filled in)."""

    index: int  # position in data.files.schema.columns
    name: str
    role: str
    dtype: str
    feature: str
    table: str = ""
    event: str = ""
    attribute: str = ""
    max_ids: int = 1
    transform: str = "none"
    fill: float = 0.0
    threshold: Optional[float] = None
    time_format: str = ""

    @property
    def is_list(self) -> bool:
        return self.dtype.startswith("list<")

    @property
    def element_dtype(self) -> str:
        return self.dtype[5:-1] if self.is_list else self.dtype

    @property
    def key(self) -> str:
        return f"{PREFIX}.schema.columns[{self.index}]"


@dataclass(frozen=True)
class TablePlan:
    name: str
    id_mapping: str  # hash | vocab | identity
    num_embeddings: int  # declared or default rows; for vocab: a cap (0 = none)
    key: str  # config key that declared it (or the column that created it)


@dataclass(frozen=True)
class EventPlan:
    name: str
    max_len: int
    order: str
    item: ColumnSpec
    action: Optional[ColumnSpec]
    timestamp: Optional[ColumnSpec]

    @property
    def action_table(self) -> str:
        return self.action.table if self.action is not None else NO_ACTION_TABLE


@dataclass
class FilePlan:
    columns: List[ColumnSpec]  # every declared column, ignore included
    tables: Dict[str, TablePlan]  # in declaration order, then auto-created ones
    events: List[EventPlan]
    labels: List[ColumnSpec]
    dense: List[ColumnSpec]
    categorical: List[ColumnSpec]
    weight: Optional[ColumnSpec]
    request_time: Optional[ColumnSpec]
    id_mapping: str = "hash"
    table_columns: Dict[str, List[ColumnSpec]] = field(default_factory=dict)  # table → id columns reading it

    @property
    def read_columns(self) -> List[ColumnSpec]:
        """Columns read from the files (all but ``ignore``)."""
        return [c for c in self.columns if c.role != "ignore"]

    def feature_schema(self, table_sizes: Dict[str, int]):
        """The :class:`FeatureSchema` for resolved table sizes (vocab tables are sized by their vocabulary)."""
        from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec

        tables = [TableSpec(name, int(table_sizes[name])) for name in self.tables]
        return FeatureSchema(
            tables=tables,
            dense_features=[c.feature for c in self.dense],
            context_features=[ContextFeature(c.feature, c.table, c.max_ids) for c in self.categorical],
            event_types=[EventType(e.name, e.item.table, e.action_table, e.max_len) for e in self.events],
            labels=[c.feature for c in self.labels],
        )


def as_path_list(value: Any) -> List[str]:
    """``data.files.train`` etc.: a string or a list of strings → list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def _path_list(files, name: str) -> List[str]:
    value = getattr(files, name)
    ok = value is None or isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    _check(ok, f"{PREFIX}.{name}", value, "a path, glob or directory, or a list of them")
    return as_path_list(value)


def split_paths(files) -> Dict[str, List[str]]:
    """split name (``train``/``eval``/``test``, or ``all`` for split=time|rows) → path patterns."""
    if files.split == "paths":
        return {s: _path_list(files, s) for s in ("train", "eval", "test")}
    return {"all": _path_list(files, "paths")}


def resolve(files, source: str = "parquet") -> FilePlan:
    """Check ``data.files`` and resolve it into a :class:`FilePlan`; raises :class:`FileSchemaError`."""
    p = PREFIX
    _check(files.split in SPLITS, f"{p}.split", files.split, f"one of {list(SPLITS)}")
    paths = split_paths(files)
    if files.split == "paths":
        for s in ("train", "eval", "test"):
            _check(bool(paths[s]), f"{p}.{s}", getattr(files, s), "at least one path (split=paths needs train, eval and test files)")
        for s in ("paths",):
            _check(not _path_list(files, s), f"{p}.paths", files.paths, "empty with split=paths (set data.files.split=time or rows to use it)")
    else:
        _check(bool(paths["all"]), f"{p}.paths", files.paths, f"at least one path (split={files.split} reads the whole data set from data.files.paths)")
        for s in ("train", "eval", "test"):
            _check(not _path_list(files, s), f"{p}.{s}", getattr(files, s), f"empty with split={files.split} (the split is computed from data.files.paths)")
    if files.split == "time":
        _check(files.eval_from > 0, f"{p}.eval_from", files.eval_from, "a request time in seconds > 0 (split=time)")
        _check(files.test_from >= files.eval_from, f"{p}.test_from", files.test_from, f"a request time >= data.files.eval_from={files.eval_from}")
    if files.split == "rows":
        _check(0 < files.eval_fraction < 1, f"{p}.eval_fraction", files.eval_fraction, "a fraction in (0, 1) (split=rows)")
        _check(0 < files.test_fraction < 1, f"{p}.test_fraction", files.test_fraction, "a fraction in (0, 1) (split=rows)")
        _check(
            files.eval_fraction + files.test_fraction < 1,
            f"{p}.test_fraction",
            files.test_fraction,
            f"eval_fraction + test_fraction < 1 (eval_fraction={files.eval_fraction})",
        )
    _check(files.id_mapping in ID_MAPPINGS, f"{p}.id_mapping", files.id_mapping, f"one of {list(ID_MAPPINGS)}")
    _check(files.default_num_embeddings >= 2, f"{p}.default_num_embeddings", files.default_num_embeddings, "an integer >= 2 (row 0 is 'missing')")
    _check(files.vocab_min_count >= 1, f"{p}.vocab_min_count", files.vocab_min_count, "an integer >= 1")
    _check(files.oov_buckets >= 1, f"{p}.oov_buckets", files.oov_buckets, "an integer >= 1")
    _check(files.cache_mb >= 1, f"{p}.cache_mb", files.cache_mb, "an integer >= 1 (MiB)")
    _check(files.shuffle_window >= 0, f"{p}.shuffle_window", files.shuffle_window, "an integer >= 0 (0 = global shuffle)")
    if source == "csv":
        c = files.csv
        _check(
            bool(c.delimiter),
            f"{p}.csv.delimiter",
            c.delimiter,
            'a non-empty delimiter: one character (",", "\\t" for TSV) or several ("::" as in MovieLens\' ratings.dat)',
        )
        _check("\n" not in c.delimiter and "\r" not in c.delimiter, f"{p}.csv.delimiter", c.delimiter, "a delimiter without line breaks")
        _check(
            len(c.list_separator) == 1 and c.list_separator not in c.delimiter,
            f"{p}.csv.list_separator",
            c.list_separator,
            f"one character that does not occur in the delimiter {c.delimiter!r}",
        )
        _check(
            len(c.quote_char) <= 1 and c.quote_char not in c.delimiter and c.quote_char != c.list_separator if c.quote_char else True,
            f"{p}.csv.quote_char",
            c.quote_char,
            "one character other than the list separator and not in the delimiter, or '' for none",
        )
        _check(c.rows_per_block >= 1, f"{p}.csv.rows_per_block", c.rows_per_block, "an integer >= 1")

    sk = f"{p}.schema"
    sch = files.schema
    # ---------------------------------------------------------------- tables
    tables: Dict[str, TablePlan] = {}
    for i, t in enumerate(sch.tables):
        key = f"{sk}.tables[{i}]"
        _check(bool(t.name) and not t.name.startswith("_"), f"{key}.name", t.name, "a table name (not starting with '_')")
        _check(
            t.name not in tables, f"{key}.name", t.name, f"a name not used by another table (declared at {tables.get(t.name, TablePlan('', '', 0, '')).key})"
        )
        mapping = t.id_mapping or files.id_mapping
        _check(mapping in ID_MAPPINGS, f"{key}.id_mapping", t.id_mapping, f"one of {list(ID_MAPPINGS)} or '' (= data.files.id_mapping)")
        if mapping == "vocab":
            _check(
                t.num_embeddings == 0 or t.num_embeddings >= 1 + files.oov_buckets + 1,
                f"{key}.num_embeddings",
                t.num_embeddings,
                f"0 (the vocabulary's size) or a cap >= {files.oov_buckets + 2} (row 0 missing, {files.oov_buckets} OOV row(s), one id)",
            )
        else:
            _check(
                t.num_embeddings == 0 or t.num_embeddings >= 2,
                f"{key}.num_embeddings",
                t.num_embeddings,
                f"an integer >= 2 (row 0 is 'missing'), or 0 for data.files.default_num_embeddings={files.default_num_embeddings}",
            )
        n = t.num_embeddings if (t.num_embeddings or mapping == "vocab") else files.default_num_embeddings
        tables[t.name] = TablePlan(t.name, mapping, n, key)
    if files.id_mapping == "vocab" or any(t.id_mapping == "vocab" for t in tables.values()):
        _check(
            bool(files.vocab_dir), f"{p}.vocab_dir", files.vocab_dir, "a folder for the vocabularies (id_mapping=vocab; build them with `kunlun data vocab`)"
        )

    # ---------------------------------------------------------------- events
    event_cfg: Dict[str, Any] = {}
    for i, e in enumerate(sch.events):
        key = f"{sk}.events[{i}]"
        _check(bool(e.name) and "." not in e.name, f"{key}.name", e.name, "an event type name without '.'")
        _check(e.name not in event_cfg, f"{key}.name", e.name, "a name not used by another event type")
        _check(e.max_len > 0, f"{key}.max_len", e.max_len, "an integer > 0")
        _check(e.order in ORDERS, f"{key}.order", e.order, f"one of {list(ORDERS)}")
        event_cfg[e.name] = e

    # --------------------------------------------------------------- columns
    specs: List[ColumnSpec] = []
    seen_names: Dict[str, int] = {}
    features: Dict[str, str] = {}  # batch name → key
    ev_cols: Dict[str, Dict[str, ColumnSpec]] = {name: {} for name in event_cfg}
    _check(len(sch.columns) > 0, f"{sk}.columns", [], "a list of the columns in the files")
    for i, c in enumerate(sch.columns):
        key = f"{sk}.columns[{i}]"
        _check(bool(c.name), f"{key}.name", c.name, "the column's name in the files")
        _check(c.role in ROLES, f"{key}.role", c.role, f"one of {list(ROLES)}")
        if c.name in seen_names and c.role != "ignore":
            _check(False, f"{key}.name", c.name, f"a column not declared before (columns[{seen_names[c.name]}])")
        seen_names.setdefault(c.name, i)
        if c.role == "ignore":
            _check(c.dtype in ROLE_DTYPES["ignore"], f"{key}.dtype", c.dtype, f"one of {list(DTYPES)} or ''")
            specs.append(ColumnSpec(i, c.name, "ignore", c.dtype or "string", c.name))
            continue
        if c.role == "sequence":
            _check(c.event in event_cfg, f"{key}.event", c.event, f"an event type declared in {sk}.events: {list(event_cfg)}")
            _check(c.attribute in ATTRIBUTES, f"{key}.attribute", c.attribute, f"one of {list(ATTRIBUTES)}")
            allowed = SEQUENCE_DTYPES[c.attribute]
        else:
            allowed = ROLE_DTYPES[c.role]
        _check(c.dtype in allowed, f"{key}.dtype", c.dtype, f"one of {list(allowed)} for role {c.role}" + (f" ({c.attribute})" if c.role == "sequence" else ""))
        feature = c.feature or c.name
        if c.role != "sequence":
            _check(bool(feature) and feature not in features, f"{key}.feature", feature, f"a name not used by another feature ({features.get(feature, '')})")
            features[feature] = key
        if c.role != "categorical":
            _check(c.max_ids == 0, f"{key}.max_ids", c.max_ids, "0 (max_ids applies to categorical list columns only)")
        if c.role != "dense":
            _check(c.transform == "none", f"{key}.transform", c.transform, "'none' (transforms apply to dense columns)")
        if c.role != "label":
            _check(c.threshold is None, f"{key}.threshold", c.threshold, "null (thresholds apply to labels)")
        if c.role != "sequence" and c.event:
            _check(False, f"{key}.event", c.event, "'' (only sequence columns belong to an event type)")
        if c.role == "request_time":
            if c.dtype == "string":
                _check(
                    bool(c.time_format) and "%" in c.time_format,
                    f"{key}.time_format",
                    c.time_format,
                    "a strptime format such as '%Y-%m-%d %H:%M:%S' for a string request time",
                )
            else:
                _check(not c.time_format, f"{key}.time_format", c.time_format, "'' for an int64 request time (seconds)")
        else:
            _check(not c.time_format, f"{key}.time_format", c.time_format, "'' (time formats apply to a string request_time)")
        _check(c.transform in TRANSFORMS, f"{key}.transform", c.transform, f"one of {list(TRANSFORMS)}")
        table = ""
        max_ids = 1
        if c.role == "categorical" or (c.role == "sequence" and c.attribute in ("item", "action")):
            table = c.table or (feature if c.role == "categorical" else f"{c.event}_{c.attribute}")
            _check(not table.startswith("_"), f"{key}.table", table, "a table name not starting with '_'")
            if table not in tables:
                tables[table] = TablePlan(table, files.id_mapping, 0 if files.id_mapping == "vocab" else files.default_num_embeddings, f"{key}.table")
                if files.id_mapping == "vocab":
                    _check(bool(files.vocab_dir), f"{p}.vocab_dir", files.vocab_dir, "a folder for the vocabularies (id_mapping=vocab)")
            if tables[table].id_mapping == "identity":
                _check(
                    c.dtype in ("int64", "list<int64>"),
                    f"{key}.dtype",
                    c.dtype,
                    f"int64 or list<int64>: table {table!r} uses id_mapping=identity (ids are the rows)",
                )
        elif c.table:
            _check(False, f"{key}.table", c.table, f"'' (role {c.role}" + (f", attribute {c.attribute}" if c.role == "sequence" else "") + " feeds no table)")
        if c.role == "categorical":
            if c.dtype.startswith("list<"):
                _check(c.max_ids > 0, f"{key}.max_ids", c.max_ids, "an integer > 0: the most ids kept per example of a list column")
                max_ids = c.max_ids
            else:
                _check(c.max_ids in (0, 1), f"{key}.max_ids", c.max_ids, "0 or 1 for a single-valued (scalar) column")
        spec = ColumnSpec(
            index=i,
            name=c.name,
            role=c.role,
            dtype=c.dtype,
            feature=feature,
            table=table,
            event=c.event if c.role == "sequence" else "",
            attribute=c.attribute if c.role == "sequence" else "",
            max_ids=max_ids,
            transform=c.transform,
            fill=float(c.fill),
            threshold=None if c.threshold is None else float(c.threshold),
            time_format=c.time_format,
        )
        if c.role == "sequence":
            _check(
                c.attribute not in ev_cols[c.event],
                f"{key}.attribute",
                c.attribute,
                f"an attribute of event {c.event!r} not given by another column (columns[{ev_cols[c.event].get(c.attribute, spec).index}])",
            )
            ev_cols[c.event][c.attribute] = spec
        specs.append(spec)

    by_role: Dict[str, List[ColumnSpec]] = {r: [s for s in specs if s.role == r] for r in ROLES}
    _check(len(by_role["label"]) >= 1, f"{sk}.columns", [c.name for c in sch.columns], "at least one column with role label")
    for role in ("weight", "request_time"):
        if len(by_role[role]) > 1:
            _check(False, f"{by_role[role][1].key}.role", role, f"at most one {role} column (also {by_role[role][0].key})")
    for i, e in enumerate(sch.events):
        _check("item" in ev_cols[e.name], f"{sk}.events[{i}]", e.name, "an event type with an item column (role sequence, attribute item)")
    if files.split == "time":
        _check(bool(by_role["request_time"]), f"{p}.split", files.split, "paths or rows: split=time needs a column with role request_time")
    seq_keys = {f"{e}.{a}" for e in event_cfg for a in ("item", "action")}
    for s in by_role["categorical"]:
        _check(s.feature not in seq_keys, f"{s.key}.feature", s.feature, "a name other than the sequence keys <event>.item / <event>.action")

    events = [
        EventPlan(e.name, e.max_len, e.order, ev_cols[e.name]["item"], ev_cols[e.name].get("action"), ev_cols[e.name].get("timestamp")) for e in sch.events
    ]
    if any(e.action is None for e in events):
        tables[NO_ACTION_TABLE] = TablePlan(NO_ACTION_TABLE, "identity", 1, f"{sk}.events")
    table_columns: Dict[str, List[ColumnSpec]] = {}
    for s in specs:
        if s.table:
            table_columns.setdefault(s.table, []).append(s)
    unused = [t for t in tables if t not in table_columns and t != NO_ACTION_TABLE]
    if unused:
        _check(False, f"{tables[unused[0]].key}.name", unused[0], "a table some categorical or sequence column reads")
    return FilePlan(
        columns=specs,
        tables=tables,
        events=events,
        labels=by_role["label"],
        dense=by_role["dense"],
        categorical=by_role["categorical"],
        weight=(by_role["weight"] or [None])[0],
        request_time=(by_role["request_time"] or [None])[0],
        id_mapping=files.id_mapping,
        table_columns=table_columns,
    )


def expand(pattern: str) -> List[str]:
    """Files of one path pattern: a file, a directory (every file below it whose path has no
    part starting with ``.`` or ``_``, e.g. Spark's ``_SUCCESS``), or a glob (``**`` recurses).
    In natural order (``day_2`` before ``day_10``), the same on every rank."""
    import glob
    import os
    import re
    from pathlib import Path

    def natural(path: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]

    p = os.path.expanduser(pattern)
    if os.path.isdir(p):
        root = Path(p)
        found = [str(f) for f in root.rglob("*") if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(root).parts)]
    elif any(ch in p for ch in "*?["):
        found = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
    else:
        found = [p] if os.path.isfile(p) else []
    return sorted(found, key=natural)
