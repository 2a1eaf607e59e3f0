"""Configuration of the data package: sources, file schemas, batching (``JobConfig.data``).

Plain dataclasses (OmegaConf structured configs); ``kunlun.trainer.config`` composes them
into the job config, loads YAML and applies overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from kunlun.common import check, check_choice, check_positive

# MovieLens label name → label type (data.movielens.labels); values in kunlun.data.sources.movielens.
MOVIELENS_LABELS = {"like": "binary", "love": "binary", "rating": "regression"}
LABEL_TYPES = ("binary", "regression")  # data.files.schema.columns[i].label_type
MISSING_POLICIES = ("error", "mask")  # data.files.schema.columns[i].missing


@dataclass
class SyntheticMultitaskConfig:
    """Multi-task, multi-domain labels of the synthetic source (``data.synthetic.multitask``).

    Off while ``tasks`` is empty (the default: one binary label ``label``, unchanged). On:
    one label per task and a context feature ``domain`` (ids ``1..num_domains``, table
    ``domain``); task ``k`` of an example in domain ``d`` has the oracle logit
    ``shared · base + task_specific · z_k(x) + domain_specific · (b_dk + g_dk(category))``
    where ``base`` is the single-task logit, ``z_k`` a unit-variance task-specific function
    of the example (item, user x category, dense features), ``b_dk`` a per-(domain, task)
    offset and ``g_dk`` a per-(domain, task) category effect, all standard normal (see
    ``kunlun.data.sources.synthetic``).
    """

    tasks: List[str] = field(default_factory=list)  # label names, in order; [] = off
    regression: List[str] = field(default_factory=list)  # tasks that are regression (label = logit + noise); others binary
    num_domains: int = 3  # domains 1..num_domains, uniform over examples
    shared: float = 1.0  # weight of the shared (single-task) logit in every task
    task_specific: float = 0.5  # scale (logits) of each task's own part
    domain_specific: float = 0.5  # scale (logits) of the per-(domain, task) part
    missing_rate: float = 0.0  # fraction of each task's labels but the first's set to NaN (missing)
    regression_noise: float = 1.0  # standard deviation of the Gaussian noise of regression labels

    def __post_init__(self) -> None:
        self.tasks, self.regression = list(self.tasks), list(self.regression)
        check(self, all(isinstance(t, str) and t for t in self.tasks), "tasks", "a list of non-empty label names")
        check(self, len(set(self.tasks)) == len(self.tasks), "tasks", "a list of distinct label names")
        check(self, all(t in self.tasks for t in self.regression), "regression", f"a subset of data.synthetic.multitask.tasks {self.tasks}")
        check(self, self.num_domains >= 1, "num_domains", "an integer >= 1")
        for name in ("shared", "task_specific", "domain_specific", "regression_noise"):
            check(self, getattr(self, name) >= 0, name, "a value >= 0")
        check(self, 0.0 <= self.missing_rate < 1.0, "missing_rate", "a fraction in [0, 1)")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)


@dataclass
class SyntheticConfig:
    """Seeded generator with a planted signal (see ``kunlun.data.sources.synthetic``)."""

    num_users: int = 10_000
    num_items: int = 50_000
    num_categories: int = 100
    num_actions: int = 4
    num_dense: int = 4
    max_seq_len: int = 32
    train_examples: int = 1_000_000
    eval_examples: int = 20_000
    test_examples: int = 20_000
    signal_strength: float = 2.0
    # basic: category affinity of the history; rich: + action/recency-weighted history,
    # user x category preference, dense cross term (harder; the scaling-law preset).
    signal: str = "basic"
    multitask: SyntheticMultitaskConfig = field(default_factory=SyntheticMultitaskConfig)  # off by default

    def __post_init__(self) -> None:
        check_positive(self, "num_users", "num_items", "num_categories", "num_actions", "max_seq_len", "train_examples", "eval_examples", "test_examples")
        check(self, self.num_dense >= 0, "num_dense", "a value >= 0")
        check(self, self.signal_strength >= 0, "signal_strength", "a value >= 0")
        check_choice(self, "signal", ("basic", "rich"))


@dataclass
class MovieLensConfig:
    """MovieLens-100K (see ``kunlun.data.sources.movielens``)."""

    # Folder with either the GroupLens files (u.data, u.user, u.item) or the RecBole
    # ones (ml-100k.inter/.user/.item). None: download into ``cache_dir`` on first use.
    path: Optional[str] = None
    cache_dir: Optional[str] = None  # default: $KUNLUN_CACHE or ~/.cache/kunlun
    max_history_len: int = 50  # most recent events kept per event type
    like_threshold: float = 4.0  # rating >= threshold: label "like" = 1 and event type "like"
    # The labels, in order (names in the batch): like (rating >= like_threshold, binary),
    # love (rating == 5, binary), rating (the raw 1-5 rating, regression).
    labels: List[str] = field(default_factory=lambda: ["like"])

    def __post_init__(self) -> None:
        check_positive(self, "max_history_len")
        check(self, 1.0 <= self.like_threshold <= 5.0, "like_threshold", "a rating in [1, 5]")
        self.labels = list(self.labels)
        allowed = list(MOVIELENS_LABELS)
        check(self, bool(self.labels), "labels", f"a non-empty list of label names, each one of {allowed}")
        unknown = [name for name in self.labels if name not in MOVIELENS_LABELS]
        meaning = "like: rating >= like_threshold, love: rating == 5, rating: the 1-5 rating (regression)"
        check(self, not unknown, "labels", f"label names, each one of {allowed} ({meaning}); unknown: {unknown}")
        check(self, len(set(self.labels)) == len(self.labels), "labels", f"a list of distinct label names from {allowed}")


@dataclass
class TableConfig:
    """An embedding table of a file source (``data.files.schema.tables``)."""

    name: str = ""
    # Rows. 0: ``data.files.default_num_embeddings`` (hash, identity) or the vocabulary size (vocab).
    # Row 0 of every table is "missing" (null or empty ids).
    num_embeddings: int = 0
    id_mapping: str = ""  # hash | vocab | identity; "" = data.files.id_mapping


@dataclass
class ColumnConfig:
    """One column of the files and the role it plays (``data.files.schema.columns``)."""

    name: str = ""  # column name in the files (CSV without header: the position in this list counts)
    # label | weight | dense | categorical | sequence | request_time | ignore
    role: str = ""
    # int64 | float32 | string | list<int64> | list<string> (not needed for role ignore)
    dtype: str = ""
    feature: str = ""  # name in the batch (context feature, dense feature, label); default: the column name
    table: str = ""  # categorical / sequence item or action: the embedding table; default: a table named as the feature
    event: str = ""  # sequence: the event type (data.files.schema.events)
    attribute: str = "item"  # sequence: item | action | timestamp
    max_ids: int = 0  # categorical list<...>: most ids kept per example (required for lists)
    transform: str = "none"  # dense: none | log1p (log(1 + max(x, 0)))
    fill: float = 0.0  # dense: value used for nulls and NaN
    threshold: Optional[float] = None  # label (binary): value >= threshold gives 1 (else values must lie in [0, 1])
    label_type: str = "binary"  # label: binary (0/1) | regression (any finite number; no threshold)
    missing: str = "error"  # label: error (a null/NaN label is a bad row) | mask (it becomes NaN = missing)
    # label: a declared int64/float32 column (often role ignore): 0/false or null → this label is missing (NaN)
    mask_column: str = ""
    time_format: str = ""  # request_time of dtype string: strptime format, e.g. "%Y/%m/%d %H:%M" (UTC)


@dataclass
class EventConfig:
    """An event type of the user history (``data.files.schema.events``)."""

    name: str = ""
    max_len: int = 50  # most recent events kept per example
    order: str = "oldest_first"  # order of the lists in the files: oldest_first | newest_first


@dataclass
class FileSchemaConfig:
    tables: List[TableConfig] = field(default_factory=list)
    events: List[EventConfig] = field(default_factory=list)
    columns: List[ColumnConfig] = field(default_factory=list)


@dataclass
class CsvConfig:
    delimiter: str = ","  # "\t" for TSV
    header: bool = True  # first line holds the column names (else columns are matched by position)
    list_separator: str = "|"  # between the elements of a list column
    quote_char: str = '"'  # "" = no quoting
    rows_per_block: int = 65536  # CSV files are read in blocks of this many lines (the unit of caching)


@dataclass
class FilesConfig:
    """Parquet or CSV files described by a declared schema (see docs/data.md)."""

    split: str = "paths"  # paths (train/eval/test) | time (request_time) | rows (file order)
    # Each a path, a glob or a directory, or a list of them.
    train: Any = field(default_factory=list)
    eval: Any = field(default_factory=list)
    test: Any = field(default_factory=list)
    paths: Any = field(default_factory=list)  # split=time|rows: the whole data set
    eval_from: int = 0  # split=time: request_time >= eval_from is validation ...
    test_from: int = 0  # ... and >= test_from is test (seconds, UTC)
    eval_fraction: float = 0.0  # split=rows: the last test_fraction of the rows is test,
    test_fraction: float = 0.0  # the eval_fraction before it validation
    id_mapping: str = "hash"  # hash | vocab | identity (default of every table)
    default_num_embeddings: int = 100_000  # rows of hash/identity tables that do not set num_embeddings
    vocab_dir: Optional[str] = None  # vocabularies written by `kunlun data vocab`
    vocab_min_count: int = 1  # ids seen fewer times in the train split go to the OOV bucket
    oov_buckets: int = 1  # rows 1..oov_buckets of a vocab table hold out-of-vocabulary ids
    cache_mb: int = 1024  # decoded row groups kept in memory per process
    shuffle_window: int = 16  # row groups shuffled together (0 = one global permutation)
    validate: bool = True  # decode every row once at start (errors before training; warms the cache)
    csv: CsvConfig = field(default_factory=CsvConfig)
    schema: FileSchemaConfig = field(default_factory=FileSchemaConfig)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | movielens | parquet | csv
    batch_size: int = 256  # global: split evenly over ranks
    eval_batch_size: int = 1024  # global
    num_workers: int = 0  # DataLoader workers per rank
    shuffle: bool = True  # reshuffle the train split every epoch (seeded)
    bad_row_policy: str = "error"  # error | skip
    id_policy: str = "error"  # ids outside a table: error | modulo (map into the table)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    movielens: MovieLensConfig = field(default_factory=MovieLensConfig)
    files: FilesConfig = field(default_factory=FilesConfig)  # source: parquet | csv

    def __post_init__(self) -> None:
        check_choice(self, "source", ("synthetic", "movielens", "parquet", "csv"))
        check_positive(self, "batch_size", "eval_batch_size")
        check(self, self.num_workers >= 0, "num_workers", "a value >= 0")
        check_choice(self, "bad_row_policy", ("error", "skip"))
        check_choice(self, "id_policy", ("error", "modulo"))
