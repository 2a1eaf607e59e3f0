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
            - {name: watch_minutes, role: label, dtype: float32, label_type: regression, missing: mask}
            - {name: purchased, role: label, dtype: int64, mask_column: in_shop}
            - {name: in_shop, role: ignore, dtype: int64}
            - {name: item_id, role: categorical, dtype: string, table: item}
            - {name: click_items, role: sequence, dtype: list<string>, event: click, table: item}

:func:`resolve` checks that description (every error names the config key, the value and
what is allowed) and turns it into a :class:`FilePlan`; :meth:`FilePlan.feature_schema`
gives the :class:`~kunlun.data.schema.FeatureSchema` that drives the embedding configs
and the batch. No per-data-set Python.

Roles:

* ``label`` (one or more): ``label_type: binary`` (default; ``threshold`` turns a value
  into ``value >= threshold``, else values lie in [0, 1]) or ``regression`` (any finite
  number); ``missing: error`` (default: a null/NaN label is a bad row) or ``mask`` (it
  becomes NaN, a missing label); ``mask_column``: a declared scalar int64/float32 column
  (any role but label, usually ``ignore``) whose 0/false/null marks the label missing (NaN);
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

LABEL_TYPES = ("binary", "regression")
MISSING_POLICIES = ("error", "mask")
MASK_DTYPES = ("int64", "float32")
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
    label_type: str = "binary"  # label: binary | regression
    missing: str = "error"  # label: error | mask
    mask_column: str = ""  # label: the column whose 0/false/null marks it missing

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
    # Label mask columns declared with role ignore, read for the labels' mask_column (role
    # "mask", dtype float32: numbers and booleans; index/key of the declared column).
    masks: List[ColumnSpec] = field(default_factory=list)

    @property
    def read_columns(self) -> List[ColumnSpec]:
        """Columns read from the files (all but ``ignore``), then the label mask columns."""
        return [c for c in self.columns if c.role != "ignore"] + list(self.masks)

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
            label_types=[c.label_type for c in self.labels],
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
    """Check ``data.files`` and resolve it into a :class:`FilePlan`; raises :class:`FileSchemaError`.

    The checks run in a fixed order (the first bad setting is the one reported): file settings,
    tables, event types, columns one by one, then the cross-checks that need every column.
    """
    _check_split(files)
    _check_settings(files)
    if source == "csv":
        _check_csv(files.csv)
    schema = files.schema
    tables = _declared_tables(files)
    event_cfg = _declared_events(schema)
    columns = _ColumnResolver(files, event_cfg, tables)
    specs = columns.resolve_all(schema.columns)
    by_role: Dict[str, List[ColumnSpec]] = {role: [spec for spec in specs if spec.role == role] for role in ROLES}
    _check_roles(by_role, [col.name for col in schema.columns])
    _check_events_complete(schema, columns.event_columns)
    _check_time_split(files, by_role)
    _check_context_names(by_role, event_cfg)
    events = _event_plans(schema, columns.event_columns, tables)
    table_columns = _table_columns(specs, tables)
    masks = _mask_columns(by_role["label"], specs)
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
        masks=masks,
    )


# ------------------------------------------------------------------ file settings
def _check_split(files) -> None:
    """``split`` and the path lists and bounds it needs (``train/eval/test`` or ``paths``)."""
    _check(files.split in SPLITS, f"{PREFIX}.split", files.split, f"one of {list(SPLITS)}")
    paths = split_paths(files)
    if files.split == "paths":
        for split in ("train", "eval", "test"):
            _check(bool(paths[split]), f"{PREFIX}.{split}", getattr(files, split), "at least one path (split=paths needs train, eval and test files)")
        _check(not _path_list(files, "paths"), f"{PREFIX}.paths", files.paths, "empty with split=paths (set data.files.split=time or rows to use it)")
    else:
        _check(bool(paths["all"]), f"{PREFIX}.paths", files.paths, f"at least one path (split={files.split} reads the whole data set from data.files.paths)")
        for split in ("train", "eval", "test"):
            _check(
                not _path_list(files, split),
                f"{PREFIX}.{split}",
                getattr(files, split),
                f"empty with split={files.split} (the split is computed from data.files.paths)",
            )
    if files.split == "time":
        _check(files.eval_from > 0, f"{PREFIX}.eval_from", files.eval_from, "a request time in seconds > 0 (split=time)")
        _check(files.test_from >= files.eval_from, f"{PREFIX}.test_from", files.test_from, f"a request time >= data.files.eval_from={files.eval_from}")
    if files.split == "rows":
        _check(0 < files.eval_fraction < 1, f"{PREFIX}.eval_fraction", files.eval_fraction, "a fraction in (0, 1) (split=rows)")
        _check(0 < files.test_fraction < 1, f"{PREFIX}.test_fraction", files.test_fraction, "a fraction in (0, 1) (split=rows)")
        _check(
            files.eval_fraction + files.test_fraction < 1,
            f"{PREFIX}.test_fraction",
            files.test_fraction,
            f"eval_fraction + test_fraction < 1 (eval_fraction={files.eval_fraction})",
        )


def _check_settings(files) -> None:
    """The scalar settings: default id mapping, table size, vocabulary, cache and shuffle."""
    _check(files.id_mapping in ID_MAPPINGS, f"{PREFIX}.id_mapping", files.id_mapping, f"one of {list(ID_MAPPINGS)}")
    _check(files.default_num_embeddings >= 2, f"{PREFIX}.default_num_embeddings", files.default_num_embeddings, "an integer >= 2 (row 0 is 'missing')")
    _check(files.vocab_min_count >= 1, f"{PREFIX}.vocab_min_count", files.vocab_min_count, "an integer >= 1")
    _check(files.oov_buckets >= 1, f"{PREFIX}.oov_buckets", files.oov_buckets, "an integer >= 1")
    _check(files.cache_mb >= 1, f"{PREFIX}.cache_mb", files.cache_mb, "an integer >= 1 (MiB)")
    _check(files.shuffle_window >= 0, f"{PREFIX}.shuffle_window", files.shuffle_window, "an integer >= 0 (0 = global shuffle)")


def _check_csv(csv) -> None:
    """``data.files.csv`` (source=csv): delimiter, list separator and quote must not collide."""
    _check(
        bool(csv.delimiter),
        f"{PREFIX}.csv.delimiter",
        csv.delimiter,
        'a non-empty delimiter: one character (",", "\\t" for TSV) or several ("::" as in MovieLens\' ratings.dat)',
    )
    _check("\n" not in csv.delimiter and "\r" not in csv.delimiter, f"{PREFIX}.csv.delimiter", csv.delimiter, "a delimiter without line breaks")
    _check(
        len(csv.list_separator) == 1 and csv.list_separator not in csv.delimiter,
        f"{PREFIX}.csv.list_separator",
        csv.list_separator,
        f"one character that does not occur in the delimiter {csv.delimiter!r}",
    )
    _check(
        len(csv.quote_char) <= 1 and csv.quote_char not in csv.delimiter and csv.quote_char != csv.list_separator if csv.quote_char else True,
        f"{PREFIX}.csv.quote_char",
        csv.quote_char,
        "one character other than the list separator and not in the delimiter, or '' for none",
    )
    _check(csv.rows_per_block >= 1, f"{PREFIX}.csv.rows_per_block", csv.rows_per_block, "an integer >= 1")


# ------------------------------------------------------------------ tables and events
def _declared_tables(files) -> Dict[str, TablePlan]:
    """The declared tables (``schema.tables``) with their id mapping and size, by name."""
    tables: Dict[str, TablePlan] = {}
    for index, table_cfg in enumerate(files.schema.tables):
        key = f"{PREFIX}.schema.tables[{index}]"
        _check(bool(table_cfg.name) and not table_cfg.name.startswith("_"), f"{key}.name", table_cfg.name, "a table name (not starting with '_')")
        _check(
            table_cfg.name not in tables,
            f"{key}.name",
            table_cfg.name,
            f"a name not used by another table (declared at {tables.get(table_cfg.name, TablePlan('', '', 0, '')).key})",
        )
        mapping = table_cfg.id_mapping or files.id_mapping
        _check(mapping in ID_MAPPINGS, f"{key}.id_mapping", table_cfg.id_mapping, f"one of {list(ID_MAPPINGS)} or '' (= data.files.id_mapping)")
        _check_num_embeddings(files, key, table_cfg.num_embeddings, mapping)
        # 0 means "the default": the vocabulary's size for vocab tables, default_num_embeddings otherwise
        num_embeddings = table_cfg.num_embeddings if (table_cfg.num_embeddings or mapping == "vocab") else files.default_num_embeddings
        tables[table_cfg.name] = TablePlan(table_cfg.name, mapping, num_embeddings, key)
    if files.id_mapping == "vocab" or any(table.id_mapping == "vocab" for table in tables.values()):
        _check(
            bool(files.vocab_dir),
            f"{PREFIX}.vocab_dir",
            files.vocab_dir,
            "a folder for the vocabularies (id_mapping=vocab; build them with `kunlun data vocab`)",
        )
    return tables


def _check_num_embeddings(files, key: str, num_embeddings: int, mapping: str) -> None:
    """A declared table size: 0 (the default) or enough rows for 'missing' (and the OOV rows of a vocab table)."""
    if mapping == "vocab":
        _check(
            num_embeddings == 0 or num_embeddings >= 1 + files.oov_buckets + 1,
            f"{key}.num_embeddings",
            num_embeddings,
            f"0 (the vocabulary's size) or a cap >= {files.oov_buckets + 2} (row 0 missing, {files.oov_buckets} OOV row(s), one id)",
        )
    else:
        _check(
            num_embeddings == 0 or num_embeddings >= 2,
            f"{key}.num_embeddings",
            num_embeddings,
            f"an integer >= 2 (row 0 is 'missing'), or 0 for data.files.default_num_embeddings={files.default_num_embeddings}",
        )


def _declared_events(schema) -> Dict[str, Any]:
    """The declared event types (``schema.events``), by name."""
    event_cfg: Dict[str, Any] = {}
    for index, event in enumerate(schema.events):
        key = f"{PREFIX}.schema.events[{index}]"
        _check(bool(event.name) and "." not in event.name, f"{key}.name", event.name, "an event type name without '.'")
        _check(event.name not in event_cfg, f"{key}.name", event.name, "a name not used by another event type")
        _check(event.max_len > 0, f"{key}.max_len", event.max_len, "an integer > 0")
        _check(event.order in ORDERS, f"{key}.order", event.order, f"one of {list(ORDERS)}")
        event_cfg[event.name] = event
    return event_cfg


# ------------------------------------------------------------------ columns
class _ColumnResolver:
    """Resolves ``schema.columns`` in order, tracking what earlier columns claimed.

    Adds the tables that columns name but nobody declared to ``tables``; ``event_columns``
    collects each event type's attribute columns (event → attribute → spec).
    """

    def __init__(self, files, event_cfg: Dict[str, Any], tables: Dict[str, TablePlan]):
        self.files = files
        self.event_cfg = event_cfg
        self.tables = tables
        self.first_index: Dict[str, int] = {}  # column name → first declaring position
        self.features: Dict[str, str] = {}  # batch name → key
        self.event_columns: Dict[str, Dict[str, ColumnSpec]] = {name: {} for name in event_cfg}

    def resolve_all(self, columns) -> List[ColumnSpec]:
        """Every column's :class:`ColumnSpec`, in declaration order."""
        _check(len(columns) > 0, f"{PREFIX}.schema.columns", [], "a list of the columns in the files")
        return [self.resolve(index, col) for index, col in enumerate(columns)]

    def resolve(self, index: int, col) -> ColumnSpec:
        """One column: name and role, dtype, the options its role allows, then its table."""
        key = f"{PREFIX}.schema.columns[{index}]"
        self._check_name(index, col, key)
        if col.role == "ignore":
            _check(col.dtype in ROLE_DTYPES["ignore"], f"{key}.dtype", col.dtype, f"one of {list(DTYPES)} or ''")
            return ColumnSpec(index, col.name, "ignore", col.dtype or "string", col.name)
        self._check_dtype(col, key)
        feature = col.feature or col.name
        if col.role != "sequence":  # sequence columns are named <event>.<attribute> in the batch
            _check(
                bool(feature) and feature not in self.features,
                f"{key}.feature",
                feature,
                f"a name not used by another feature ({self.features.get(feature, '')})",
            )
            self.features[feature] = key
        _check_role_options(col, key)
        table = self._table(col, key, feature)
        spec = ColumnSpec(
            index=index,
            name=col.name,
            role=col.role,
            dtype=col.dtype,
            feature=feature,
            table=table,
            event=col.event if col.role == "sequence" else "",
            attribute=col.attribute if col.role == "sequence" else "",
            max_ids=_max_ids(col, key),
            transform=col.transform,
            fill=float(col.fill),
            threshold=None if col.threshold is None else float(col.threshold),
            time_format=col.time_format,
            label_type=col.label_type,
            missing=col.missing,
            mask_column=col.mask_column,
        )
        if col.role == "sequence":
            self._add_event_column(col, key, spec)
        return spec

    def _check_name(self, index: int, col, key: str) -> None:
        """A name and a known role; a name may repeat only for ``ignore`` columns."""
        _check(bool(col.name), f"{key}.name", col.name, "the column's name in the files")
        _check(col.role in ROLES, f"{key}.role", col.role, f"one of {list(ROLES)}")
        if col.name in self.first_index and col.role != "ignore":
            _check(False, f"{key}.name", col.name, f"a column not declared before (columns[{self.first_index[col.name]}])")
        self.first_index.setdefault(col.name, index)

    def _check_dtype(self, col, key: str) -> None:
        """The dtype the role (for sequences: the attribute of a declared event type) allows."""
        if col.role == "sequence":
            _check(col.event in self.event_cfg, f"{key}.event", col.event, f"an event type declared in {PREFIX}.schema.events: {list(self.event_cfg)}")
            _check(col.attribute in ATTRIBUTES, f"{key}.attribute", col.attribute, f"one of {list(ATTRIBUTES)}")
            allowed = SEQUENCE_DTYPES[col.attribute]
        else:
            allowed = ROLE_DTYPES[col.role]
        detail = f" ({col.attribute})" if col.role == "sequence" else ""
        _check(col.dtype in allowed, f"{key}.dtype", col.dtype, f"one of {list(allowed)} for role {col.role}" + detail)

    def _table(self, col, key: str, feature: str) -> str:
        """The table an id column reads (created with the defaults if undeclared), or '' for the other columns."""
        if not (col.role == "categorical" or (col.role == "sequence" and col.attribute in ("item", "action"))):
            if col.table:
                detail = f", attribute {col.attribute}" if col.role == "sequence" else ""
                _check(False, f"{key}.table", col.table, f"'' (role {col.role}" + detail + " feeds no table)")
            return ""
        files = self.files
        table = col.table or (feature if col.role == "categorical" else f"{col.event}_{col.attribute}")
        _check(not table.startswith("_"), f"{key}.table", table, "a table name not starting with '_'")
        if table not in self.tables:
            num_embeddings = 0 if files.id_mapping == "vocab" else files.default_num_embeddings
            self.tables[table] = TablePlan(table, files.id_mapping, num_embeddings, f"{key}.table")
            if files.id_mapping == "vocab":
                _check(bool(files.vocab_dir), f"{PREFIX}.vocab_dir", files.vocab_dir, "a folder for the vocabularies (id_mapping=vocab)")
        if self.tables[table].id_mapping == "identity":
            _check(
                col.dtype in ("int64", "list<int64>"),
                f"{key}.dtype",
                col.dtype,
                f"int64 or list<int64>: table {table!r} uses id_mapping=identity (ids are the rows)",
            )
        return table

    def _add_event_column(self, col, key: str, spec: ColumnSpec) -> None:
        """Record a sequence column as its event type's ``attribute``; each attribute comes from one column."""
        given = self.event_columns[col.event]
        _check(
            col.attribute not in given,
            f"{key}.attribute",
            col.attribute,
            f"an attribute of event {col.event!r} not given by another column (columns[{given.get(col.attribute, spec).index}])",
        )
        given[col.attribute] = spec


def _check_role_options(col, key: str) -> None:
    """Options that only some roles take (max_ids, transform, threshold, event, time_format) are unset elsewhere."""
    if col.role != "categorical":
        _check(col.max_ids == 0, f"{key}.max_ids", col.max_ids, "0 (max_ids applies to categorical list columns only)")
    if col.role != "dense":
        _check(col.transform == "none", f"{key}.transform", col.transform, "'none' (transforms apply to dense columns)")
    if col.role != "label":
        _check(col.threshold is None, f"{key}.threshold", col.threshold, "null (thresholds apply to labels)")
        _check(col.label_type == "binary", f"{key}.label_type", col.label_type, "'binary', the default (label types apply to labels)")
        _check(col.missing == "error", f"{key}.missing", col.missing, "'error', the default (missing policies apply to labels)")
        _check(not col.mask_column, f"{key}.mask_column", col.mask_column, "'' (mask columns apply to labels)")
    else:
        _check(col.label_type in LABEL_TYPES, f"{key}.label_type", col.label_type, f"one of {list(LABEL_TYPES)}")
        _check(col.missing in MISSING_POLICIES, f"{key}.missing", col.missing, f"one of {list(MISSING_POLICIES)}")
        if col.label_type == "regression":
            _check(col.threshold is None, f"{key}.threshold", col.threshold, "null for a regression label (its value is the target)")
    if col.role != "sequence" and col.event:
        _check(False, f"{key}.event", col.event, "'' (only sequence columns belong to an event type)")
    if col.role == "request_time":
        if col.dtype == "string":
            _check(
                bool(col.time_format) and "%" in col.time_format,
                f"{key}.time_format",
                col.time_format,
                "a strptime format such as '%Y-%m-%d %H:%M:%S' for a string request time",
            )
        else:
            _check(not col.time_format, f"{key}.time_format", col.time_format, "'' for an int64 request time (seconds)")
    else:
        _check(not col.time_format, f"{key}.time_format", col.time_format, "'' (time formats apply to a string request_time)")
    _check(col.transform in TRANSFORMS, f"{key}.transform", col.transform, f"one of {list(TRANSFORMS)}")


def _max_ids(col, key: str) -> int:
    """Ids kept per example: ``max_ids`` for a categorical list column, else 1."""
    if col.role != "categorical":
        return 1
    if col.dtype.startswith("list<"):
        _check(col.max_ids > 0, f"{key}.max_ids", col.max_ids, "an integer > 0: the most ids kept per example of a list column")
        return col.max_ids
    _check(col.max_ids in (0, 1), f"{key}.max_ids", col.max_ids, "0 or 1 for a single-valued (scalar) column")
    return 1


# ------------------------------------------------------------------ cross-checks
def _check_roles(by_role: Dict[str, List[ColumnSpec]], column_names: List[str]) -> None:
    """At least one label; at most one weight and one request_time."""
    _check(len(by_role["label"]) >= 1, f"{PREFIX}.schema.columns", column_names, "at least one column with role label")
    for role in ("weight", "request_time"):
        if len(by_role[role]) > 1:
            _check(False, f"{by_role[role][1].key}.role", role, f"at most one {role} column (also {by_role[role][0].key})")


def _check_events_complete(schema, event_columns: Dict[str, Dict[str, ColumnSpec]]) -> None:
    """Every event type has an item column."""
    for index, event in enumerate(schema.events):
        _check(
            "item" in event_columns[event.name],
            f"{PREFIX}.schema.events[{index}]",
            event.name,
            "an event type with an item column (role sequence, attribute item)",
        )


def _check_time_split(files, by_role: Dict[str, List[ColumnSpec]]) -> None:
    """split=time splits by the request time, so a request_time column must exist."""
    if files.split == "time":
        _check(bool(by_role["request_time"]), f"{PREFIX}.split", files.split, "paths or rows: split=time needs a column with role request_time")


def _check_context_names(by_role: Dict[str, List[ColumnSpec]], event_cfg: Dict[str, Any]) -> None:
    """No context feature takes a sequence's batch key (``<event>.item`` / ``<event>.action``)."""
    seq_keys = {f"{event}.{attribute}" for event in event_cfg for attribute in ("item", "action")}
    for spec in by_role["categorical"]:
        _check(spec.feature not in seq_keys, f"{spec.key}.feature", spec.feature, "a name other than the sequence keys <event>.item / <event>.action")


def _mask_columns(labels: List[ColumnSpec], specs: List[ColumnSpec]) -> List[ColumnSpec]:
    """Check each label's ``mask_column``: a declared scalar int64/float32 column (any role but
    label; usually ``ignore``). Returns the extra specs to read: one per ``ignore`` column used
    as a mask (role ``mask``, dtype float32 so that Parquet ints, floats and booleans pass);
    a mask column with another role is read anyway."""
    declared: Dict[str, ColumnSpec] = {}
    for spec in specs:
        declared.setdefault(spec.name, spec)
    masks: Dict[str, ColumnSpec] = {}
    for label in labels:
        name = label.mask_column
        if not name:
            continue
        key = f"{label.key}.mask_column"
        target = declared.get(name)
        if target is None:
            example = f"{{name: {name}, role: ignore, dtype: int64}}"
            _check(False, key, name, f"a column declared in {PREFIX}.schema.columns, e.g. {example}; declared: {list(declared)}")
            continue
        _check(target.role != "label", key, name, f"a column that is not a label ({target.key} is a label)")
        _check(
            target.dtype in MASK_DTYPES,
            key,
            name,
            f"a column declared with dtype int64 or float32 (0/false/null: the label is missing); {target.key} has dtype {target.dtype!r}",
        )
        if target.role == "ignore":
            masks.setdefault(name, ColumnSpec(index=target.index, name=name, role="mask", dtype="float32", feature=name))
    return list(masks.values())


def _event_plans(schema, event_columns: Dict[str, Dict[str, ColumnSpec]], tables: Dict[str, TablePlan]) -> List[EventPlan]:
    """One :class:`EventPlan` per event type; adds the 1-row ``_no_action`` table if one lacks actions."""
    events = []
    for event in schema.events:
        given = event_columns[event.name]
        events.append(EventPlan(event.name, event.max_len, event.order, given["item"], given.get("action"), given.get("timestamp")))
    if any(event.action is None for event in events):
        tables[NO_ACTION_TABLE] = TablePlan(NO_ACTION_TABLE, "identity", 1, f"{PREFIX}.schema.events")
    return events


def _table_columns(specs: List[ColumnSpec], tables: Dict[str, TablePlan]) -> Dict[str, List[ColumnSpec]]:
    """Table → the id columns reading it; every declared table must be read by one."""
    table_columns: Dict[str, List[ColumnSpec]] = {}
    for spec in specs:
        if spec.table:
            table_columns.setdefault(spec.table, []).append(spec)
    unused = [name for name in tables if name not in table_columns and name != NO_ACTION_TABLE]
    if unused:
        _check(False, f"{tables[unused[0]].key}.name", unused[0], "a table some categorical or sequence column reads")
    return table_columns


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
