"""Job configuration: one structured dataclass per concern, composed into ``JobConfig``.

A job is configured by a YAML preset (``configs/*.yaml``) merged over the dataclass
defaults, then ``key=value`` overrides from the command line, e.g.::

    python -m kunlun.launch.main --config configs/tiny.yaml trainer.max_steps=20 run_dir=/tmp/r

Everything is checked before any work starts: unknown keys, wrong types and impossible
values raise :class:`ConfigError`, whose message names where the value came from (file
and line, or the command line), the full key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Each package owns its config; the job config composes them (and re-exports them, so
# ``from kunlun.trainer.config import DataConfig`` keeps working). Model configs live beside
# the model, importable without omegaconf (e.g. on GPU boxes).
from kunlun.common import ConfigError, FieldError, check, check_choice, check_positive, default_cache_dir  # noqa: F401
from kunlun.data.config import (  # noqa: F401
    ColumnConfig,
    CsvConfig,
    DataConfig,
    EventConfig,
    FileSchemaConfig,
    FilesConfig,
    MovieLensConfig,
    SyntheticConfig,
    TableConfig,
)
from kunlun.model.config import (  # noqa: F401
    DCNv2Config,
    DLRMConfig,
    EventTowerConfig,
    HSTUConfig,
    InterFormerConfig,
    KunlunConfig,
    ModelConfig,
    WukongTowerConfig,
)
from kunlun.parallel.config import DenseParallelConfig, ParallelConfig, SparseParallelConfig  # noqa: F401

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


# ---------------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    sparse_lr: float = 0.05  # fused EXACT_ROWWISE_ADAGRAD on the embedding tables
    sparse_eps: float = 1e-8
    dense: str = "adam"  # adam | adamw | adagrad | sgd
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup of both learning rates
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at trainer.max_steps)

    def __post_init__(self) -> None:
        for name in ("sparse_lr", "dense_lr"):
            check(self, getattr(self, name) > 0, name, "a learning rate > 0")
        for name in ("sparse_eps", "weight_decay", "warmup_steps"):
            check(self, getattr(self, name) >= 0, name, "a value >= 0")
        check_choice(self, "dense", ("adam", "adamw", "adagrad", "sgd"))
        check_choice(self, "schedule", ("constant", "linear", "cosine"))


# ------------------------------------------------------------------------ trainer
@dataclass
class EarlyStoppingConfig:
    """Best step and early stopping on a validation metric (``kunlun.trainer.early_stopping``)."""

    metric: str = "eval/ne"  # eval/<auc|ne|logloss|mse|mae> (mean over tasks), or eval/<task>/<metric>
    mode: str = "auto"  # auto (lower is better for ne/logloss/mse/mae, higher for auc) | min | max
    patience: int = 0  # stop after this many evaluations in a row without improvement; 0 = never stop early
    min_delta: float = 0.0  # smallest change of the metric that counts as an improvement

    def __post_init__(self) -> None:
        # A validation metric the evaluator reports, never a test metric: the test split
        # must not choose the model it then scores. A task name is checked by the trainer,
        # once the tasks are known (eval/<metric>/<task>, the spelling before tasks, is read too).
        from kunlun.trainer.early_stopping import METRIC_MODES

        parts = self.metric.split("/")
        check(
            self,
            parts[0] == "eval" and all(parts) and (parts[-1] in METRIC_MODES or (len(parts) == 3 and parts[1] in METRIC_MODES)) and len(parts) in (2, 3),
            "metric",
            f"eval/<metric> or eval/<task>/<metric> with <metric> one of {sorted(METRIC_MODES)} (validation split only)",
        )
        check_choice(self, "mode", ("auto", "min", "max"))
        for name in ("patience", "min_delta"):
            check(self, getattr(self, name) >= 0, name, "a value >= 0")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    eval_every_n_steps: int = 200  # 0 = only the final evaluation
    eval_max_batches: int = 0  # 0 = the whole validation split
    device: str = "auto"  # auto | cpu | cuda
    # Non-finite loss or dense gradients: "stop" (write a diagnostic, exit 3) or "skip" the step.
    nonfinite_policy: str = "stop"
    max_consecutive_skips: int = 10  # with "skip": stop after this many non-finite steps in a row
    # Train batches built ahead of the step in a background thread (0 = built inside the step).
    # -1 = auto: 2 on GPU, 0 on CPU, where the ranks already fill the cores and the thread only
    # competes with them (a 2-rank test job ran ~10% slower with it; MovieLens: no gain).
    prefetch_batches: int = -1
    # How a step runs (trainer/pipeline.py): none | sparse_dist | semi_sync | prefetch (TorchRec's
    # train pipelines, overlapping input distribution / lookups with the previous batch).
    # auto: sparse_dist on GPU, none on CPU (no streams to overlap on; no consistent gain measured).
    pipeline: str = "auto"
    # Dense tower compute precision: fp32 | bf16 (autocast; fp32 master weights, optimizer
    # state, loss and metrics) | auto (bf16 on GPU, fp32 on CPU). Embedding storage is
    # model.embedding_dtype.
    precision: str = "auto"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Epochs are implicit: training loops over the train split until max_steps.

    def __post_init__(self) -> None:
        check_positive(self, "max_steps", "max_consecutive_skips")
        check(self, self.prefetch_batches >= -1, "prefetch_batches", "a count >= 0, or -1 (auto: 2 on GPU, 0 on CPU)")
        for name in ("eval_every_n_steps", "eval_max_batches"):
            check(self, getattr(self, name) >= 0, name, "a value >= 0")
        check_choice(self, "device", ("auto", "cpu", "cuda"))
        check_choice(self, "nonfinite_policy", ("stop", "skip"))
        check_choice(self, "pipeline", ("auto", "none", "sparse_dist", "semi_sync", "prefetch"))
        check_choice(self, "precision", ("auto", "fp32", "bf16"))
        if self.early_stopping.patience:
            check(
                self, self.eval_every_n_steps > 0, "early_stopping.patience", "0 when trainer.eval_every_n_steps=0 (early stopping needs periodic evaluations)"
            )


@dataclass
class CheckpointConfig:
    every_n_steps: int = 200  # 0 = only at the end
    keep: int = 3  # newest complete checkpoints kept; older ones are deleted
    # Also keep the checkpoint of the best validation step (trainer.early_stopping.metric),
    # saving one at every improving evaluation, and run the final test on it.
    keep_best: bool = True
    resume: str = "auto"  # auto | never | <path of a checkpoint directory>
    verify: bool = True  # check the manifest's sizes and sha256 before loading

    def __post_init__(self) -> None:
        check(self, self.every_n_steps >= 0, "every_n_steps", "a value >= 0")
        check_positive(self, "keep")
        if self.resume not in ("auto", "never"):
            check(self, Path(self.resume).expanduser().is_dir(), "resume", "'auto', 'never' or an existing checkpoint directory")


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (see ``kunlun.trainer.profiling``)."""

    start_step: int = 10  # 0-based step index of the first profiled step (skip warm-up)
    num_steps: int = 0  # 0: off; else trace + time split under <run_dir>/profile/

    def __post_init__(self) -> None:
        for name in ("start_step", "num_steps"):
            check(self, getattr(self, name) >= 0, name, "a value >= 0")


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 10  # train scalars to TensorBoard / console
    tensorboard: bool = True
    progress_bar: bool = True  # tqdm on rank 0, and only when stderr is a TTY
    level: str = "INFO"
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        check_positive(self, "log_every_n_steps")
        check_choice(self, "level", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class JobConfig:
    run_dir: str = "runs/default"  # every output of the run goes under this folder
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        check(self, bool(self.run_dir), "run_dir", "a folder path")


# ------------------------------------------------------------------------ loading
def resolve_preset(name_or_path: str) -> Path:
    """``tiny`` → ``configs/tiny.yaml``; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    presets = sorted(x.stem for x in CONFIGS_DIR.glob("*.yaml"))
    raise ConfigError(f"config preset {name_or_path!r}: no such file; presets in {CONFIGS_DIR}: {presets}")


def _yaml_line(path: Path, dotted_key: str) -> Optional[int]:
    """1-based line of ``dotted_key`` in a YAML file, or None (for error messages only)."""
    try:
        node = yaml.compose(path.read_text())
    except Exception:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted_key):  # "a.b[2].c" → a, b, [2], c
        if part.startswith("["):  # list element (data.files.schema.columns[3])
            index = int(part[1:-1])
            if not isinstance(node, yaml.SequenceNode) or index >= len(node.value):
                return line
            node = node.value[index]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if k.value == part:
                line, node = k.start_mark.line + 1, v
                break
        else:
            return line if "[" in dotted_key else None
    return line


def _key_in_lists(path: Path, name: str, value: Any = None) -> Optional[str]:
    """Full key (``data.files.schema.columns[2].rol``) of ``name`` inside a list element of a
    YAML file: OmegaConf reports errors inside lists of structured configs without the path."""
    try:
        root = yaml.compose(path.read_text())
    except Exception:
        return None
    found: List[str] = []

    def walk(node: Any, prefix: str, in_list: bool) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                full = f"{prefix}.{k.value}" if prefix else str(k.value)
                if in_list and k.value == name and (value is None or (isinstance(v, yaml.ScalarNode) and v.value == str(value))):
                    found.append(full)
                walk(v, full, in_list)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{prefix}[{i}]", True)

    walk(root, "", False)
    return found[0] if found else None


def _explain(err: OmegaConfBaseException, source: str, path: Optional[Path] = None) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    obj_type = getattr(err, "object_type", None)
    in_list = path is not None and "." not in key and dataclasses.is_dataclass(obj_type) and obj_type is not JobConfig
    if in_list:  # an error inside a list of structured configs (data.files.schema.columns)
        is_key_error = type(err).__name__ == "ConfigKeyError"
        full = _key_in_lists(path, key, None if is_key_error else getattr(err, "value", None))
        if full is not None:
            key = full
            if is_key_error:
                names = sorted(f.name for f in dataclasses.fields(obj_type))
                line = _yaml_line(path, key)
                return ConfigError(f"{path}:{line}: unknown config key {key!r}; allowed keys here: {names}")
    if "[" in key and dataclasses.is_dataclass(obj_type) and (type(err).__name__ in ("ConfigKeyError", "ConfigAttributeError")):
        names = sorted(f.name for f in dataclasses.fields(obj_type))
        line = _yaml_line(path, key) if path is not None else None
        where = f"{path}:{line}" if line is not None else source
        return ConfigError(f"{where}: unknown config key {key!r}; allowed keys here: {names}")
    where = source
    if path is not None and key:
        line = _yaml_line(path, key)
        if line is not None:
            where = f"{path}:{line}"
    msg = str(err).split("\n")[0]
    if type(err).__name__ == "ConfigKeyError" or "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.structured(JobConfig)
        allowed = OmegaConf.select(node, parent) if parent else node
        names = sorted(allowed.keys()) if isinstance(allowed, DictConfig) else []
        return ConfigError(f"{where}: unknown config key {key!r}; allowed keys here: {names}")
    return ConfigError(f"{where}: bad value for {key!r}: {msg}")


def load_config(preset: Optional[str] = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults ← YAML preset ← ``key=value`` overrides, validated.

    Every dataclass checks its fields as it is built; :func:`validate` adds the checks
    across sections and files. World-size checks (batch and sharding-group divisibility)
    run once, in the trainer, with the process group's size.
    """
    cfg = OmegaConf.structured(JobConfig)
    if preset:
        path = resolve_preset(preset)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors carry their own line numbers
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path), path) from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            if "[" in key:  # a list element, e.g. data.files.schema.tables[0].num_embeddings=1000
                OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            err = _explain(e, "command line")
            if key not in str(err) or value not in str(err):
                # Name the whole override when OmegaConf's message lost the key or value.
                err = ConfigError(str(err).replace("command line:", f"command line: {item!r}:", 1))
            raise err from e
    try:
        job: JobConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]  # runs every __post_init__
        validate(job, world_size=None)
    except ConfigError as raised:
        err = raised
        if isinstance(raised, FieldError):  # name the full key (data.synthetic.num_users)
            err = raised.with_prefix(_section_prefixes().get(raised.owner, raised.owner.__name__))
        # Say where the bad value came from: the command line wins over the preset.
        from_cli = err.key is not None and any(err.key == k or err.key.startswith((k + ".", k + "[")) for k in (o.split("=", 1)[0] for o in overrides))
        line = _yaml_line(path, err.key) if (preset and err.key and not from_cli) else None
        if line is not None:
            raise ConfigError(f"{path}:{line}: {err}", key=err.key) from raised
        if from_cli:
            raise ConfigError(f"command line: {err}", key=err.key) from raised
        if err is raised:
            raise
        raise err from raised
    return job


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} = {value!r} is invalid: expected {allowed}", key=key)


def _section_prefixes() -> Dict[type, str]:
    """Config dataclass → its path in the job config (``SyntheticConfig`` → ``data.synthetic``),
    used to name the full key of a :class:`FieldError` raised by a nested ``__post_init__``."""
    prefixes: Dict[type, str] = {}

    def walk(cls: type, prefix: str) -> None:
        prefixes[cls] = prefix
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}.{f.name}" if prefix else f.name)

    walk(JobConfig, "")
    return prefixes


def validate(cfg: JobConfig, world_size: Optional[int]) -> None:
    """The checks that span sections or need the files or the world size. Raises :class:`ConfigError`.

    Each field's own checks run in its dataclass's ``__post_init__`` (so a config object
    with an impossible value cannot be built); this adds what one dataclass cannot see.
    ``world_size=None`` (``load_config``, before the launcher is known) runs the checks that
    need files or several sections; the trainer calls it once with the process group's size
    for the world-size checks only.
    """
    if world_size is not None:
        sp = cfg.parallel.sparse
        if sp.strategy == "2d" and sp.sharding_group_size:
            _check(
                world_size % sp.sharding_group_size == 0,
                "parallel.sparse.sharding_group_size",
                sp.sharding_group_size,
                f"a divisor of the world size ({world_size} processes)",
            )
        for key, batch in {"data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size}.items():
            _check(batch % world_size == 0, key, batch, f"a multiple of the world size ({world_size} processes)")
        return
    if cfg.data.source in ("parquet", "csv"):
        _validate_files(cfg.data)
    if cfg.data.source == "movielens" and cfg.data.movielens.path is not None:
        p = Path(cfg.data.movielens.path).expanduser()
        _check(p.is_dir(), "data.movielens.path", cfg.data.movielens.path, "an existing folder holding ml-100k files (u.data or ml-100k.inter)")


def _validate_files(data: DataConfig) -> None:
    """``data.files`` (schema, paths, split, id mapping) for the parquet and csv sources."""
    from kunlun.data.file_schema import FileSchemaError, expand, resolve, split_paths

    try:
        resolve(data.files, data.source)
    except FileSchemaError as e:
        raise ConfigError(str(e), key=e.key) from e
    for split, patterns in split_paths(data.files).items():
        name = "paths" if split == "all" else split
        for i, pattern in enumerate(patterns):
            key = f"data.files.{name}" if len(patterns) == 1 else f"data.files.{name}[{i}]"
            _check(bool(expand(pattern)), key, pattern, "an existing file, a directory holding files, or a glob matching files")


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: JobConfig) -> dict:
    """``{"data.batch_size": 256, ...}`` with scalar values (lists as strings), for TensorBoard hparams."""
    out: dict = {}

    def walk(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(f"{prefix}{f.name}.", getattr(obj, f.name))
        else:
            key = prefix[:-1]
            out[key] = obj if isinstance(obj, (int, float, str, bool)) else str(obj)

    walk("", cfg)
    return out
