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
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Each package owns its config; the job config composes them (and re-exports them, so
# ``from kunlun.trainer.config import DataConfig`` keeps working). Model configs live beside
# the model, importable without omegaconf (e.g. on GPU boxes).
from kunlun.common import ConfigError, default_cache_dir  # noqa: F401
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


# ------------------------------------------------------------------------ trainer
@dataclass
class EarlyStoppingConfig:
    """Best step and early stopping on a validation metric (``kunlun.trainer.early_stopping``)."""

    metric: str = "eval/ne"  # eval/<auc|ne|logloss>, or eval/<metric>/<label> with several labels
    mode: str = "auto"  # auto (lower is better for ne/logloss, higher for auc) | min | max
    patience: int = 0  # stop after this many evaluations in a row without improvement; 0 = never stop early
    min_delta: float = 0.0  # smallest change of the metric that counts as an improvement


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    eval_every_n_steps: int = 200  # 0 = only the final evaluation
    eval_max_batches: int = 0  # 0 = the whole validation split
    device: str = "auto"  # auto | cpu | cuda
    # Non-finite loss or dense gradients: "stop" (write a diagnostic, exit 3) or "skip" the step.
    nonfinite_policy: str = "stop"
    max_consecutive_skips: int = 10  # with "skip": stop after this many non-finite steps in a row
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Epochs are implicit: training loops over the train split until max_steps.


@dataclass
class CheckpointConfig:
    every_n_steps: int = 200  # 0 = only at the end
    keep: int = 3  # newest complete checkpoints kept; older ones are deleted
    # Also keep the checkpoint of the best validation step (trainer.early_stopping.metric),
    # saving one at every improving evaluation, and run the final test on it.
    keep_best: bool = True
    resume: str = "auto"  # auto | never | <path of a checkpoint directory>
    verify: bool = True  # check the manifest's sizes and sha256 before loading


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (see ``kunlun.trainer.profiling``)."""

    start_step: int = 10  # 0-based step index of the first profiled step (skip warm-up)
    num_steps: int = 0  # 0: off; else trace + time split under <run_dir>/profile/


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 10  # train scalars to TensorBoard / console
    tensorboard: bool = True
    progress_bar: bool = True  # tqdm on rank 0, and only when stderr is a TTY
    level: str = "INFO"
    profile: ProfileConfig = field(default_factory=ProfileConfig)


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

    World-size dependent checks (batch and sharding-group divisibility) are skipped here;
    the entry point runs :func:`validate` with ``WORLD_SIZE`` and the trainer with the
    process group's size.
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
    job: JobConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        validate(job, world_size=None)
    except ConfigError as e:
        # Say where the bad value came from: the command line wins over the preset.
        from_cli = e.key is not None and any(o.split("=", 1)[0] == e.key for o in overrides)
        line = _yaml_line(path, e.key) if (preset and e.key and not from_cli) else None
        if line is not None:
            raise ConfigError(f"{path}:{line}: {e}", key=e.key) from e
        if from_cli:
            raise ConfigError(f"command line: {e}", key=e.key) from e
        raise
    return job


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} = {value!r} is invalid: expected {allowed}", key=key)


def validate(cfg: JobConfig, world_size: Optional[int]) -> None:
    """Semantic checks that types alone cannot express. Raises :class:`ConfigError`.

    ``world_size=None`` (at load time, before the launcher is known) skips the checks that
    depend on it; the entry point and the trainer call it again with the real one.
    """
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "model.embedding_dim": cfg.model.embedding_dim,
        "trainer.max_steps": cfg.trainer.max_steps,
        "checkpoint.keep": cfg.checkpoint.keep,
        "logging.log_every_n_steps": cfg.logging.log_every_n_steps,
        "trainer.max_consecutive_skips": cfg.trainer.max_consecutive_skips,
        "data.synthetic.num_users": cfg.data.synthetic.num_users,
        "data.synthetic.num_items": cfg.data.synthetic.num_items,
        "data.synthetic.num_categories": cfg.data.synthetic.num_categories,
        "data.synthetic.num_actions": cfg.data.synthetic.num_actions,
        "data.synthetic.max_seq_len": cfg.data.synthetic.max_seq_len,
        "data.synthetic.train_examples": cfg.data.synthetic.train_examples,
        "data.synthetic.eval_examples": cfg.data.synthetic.eval_examples,
        "data.synthetic.test_examples": cfg.data.synthetic.test_examples,
        "data.movielens.max_history_len": cfg.data.movielens.max_history_len,
    }
    for key, value in positive.items():
        _check(value > 0, key, value, "an integer > 0")
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "data.synthetic.num_dense": cfg.data.synthetic.num_dense,
        "trainer.eval_every_n_steps": cfg.trainer.eval_every_n_steps,
        "trainer.eval_max_batches": cfg.trainer.eval_max_batches,
        "checkpoint.every_n_steps": cfg.checkpoint.every_n_steps,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "trainer.early_stopping.patience": cfg.trainer.early_stopping.patience,
        "trainer.early_stopping.min_delta": cfg.trainer.early_stopping.min_delta,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.sparse_eps": cfg.optim.sparse_eps,
        "logging.profile.start_step": cfg.logging.profile.start_step,
        "logging.profile.num_steps": cfg.logging.profile.num_steps,
    }
    for key, value in non_negative.items():
        _check(value >= 0, key, value, "a value >= 0")
    for key, value in {"optim.sparse_lr": cfg.optim.sparse_lr, "optim.dense_lr": cfg.optim.dense_lr}.items():
        _check(value > 0, key, value, "a learning rate > 0")
    for key, mlp in {"model.dlrm.bottom_mlp": cfg.model.dlrm.bottom_mlp, "model.dlrm.top_mlp": cfg.model.dlrm.top_mlp}.items():
        _check(all(w > 0 for w in mlp), key, list(mlp), "a list of layer widths > 0")
    choices = {
        "data.source": (cfg.data.source, ("synthetic", "movielens", "parquet", "csv")),
        "data.synthetic.signal": (cfg.data.synthetic.signal, ("basic", "rich")),
        "data.bad_row_policy": (cfg.data.bad_row_policy, ("error", "skip")),
        "data.id_policy": (cfg.data.id_policy, ("error", "modulo")),
        "trainer.nonfinite_policy": (cfg.trainer.nonfinite_policy, ("stop", "skip")),
        "model.tower": (cfg.model.tower, tuple(_tower_names())),
        "parallel.backend": (cfg.parallel.backend, ("auto", "gloo", "nccl")),
        "optim.dense": (cfg.optim.dense, ("adam", "adamw", "adagrad", "sgd")),
        "optim.schedule": (cfg.optim.schedule, ("constant", "linear", "cosine")),
        "trainer.device": (cfg.trainer.device, ("auto", "cpu", "cuda")),
        "trainer.early_stopping.mode": (cfg.trainer.early_stopping.mode, ("auto", "min", "max")),
        "logging.level": (cfg.logging.level, ("DEBUG", "INFO", "WARNING", "ERROR")),
    }
    for key, (value, allowed) in choices.items():
        _check(value in allowed, key, value, f"one of {list(allowed)}")
    for tower_name in ("dcnv2", "wukong", "hstu", "interformer"):
        tcfg = getattr(cfg.model, tower_name)
        for f in dataclasses.fields(tcfg):
            value = getattr(tcfg, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                ok = value >= 0 if f.name == "low_rank" else value > 0
                _check(ok, f"model.{tower_name}.{f.name}", value, "an integer >= 0" if f.name == "low_rank" else "an integer > 0")
            elif isinstance(value, list):
                _check(all(w > 0 for w in value), f"model.{tower_name}.{f.name}", list(value), "a list of layer widths > 0")
        if hasattr(tcfg, "heads"):
            _check(tcfg.dim % tcfg.heads == 0, f"model.{tower_name}.heads", tcfg.heads, f"a divisor of model.{tower_name}.dim={tcfg.dim}")
        if hasattr(tcfg, "gdpa_impl"):
            _check(tcfg.gdpa_impl in ("auto", "reference", "triton"), f"model.{tower_name}.gdpa_impl", tcfg.gdpa_impl, "one of ['auto', 'reference', 'triton']")
    k = cfg.model.kunlun
    for key, value in {
        "model.kunlun.dim": k.dim,
        "model.kunlun.num_layers": k.num_layers,
        "model.kunlun.num_summary_tokens": k.num_summary_tokens,
        "model.kunlun.pffn_kv_len": k.pffn_kv_len,
        "model.kunlun.kv_rank": k.kv_rank,
        "model.kunlun.hsp_rank": k.hsp_rank,
        "model.kunlun.num_experts": k.num_experts,
        "model.kunlun.wukong_layers": k.wukong_layers,
        "model.kunlun.fm_rank": k.fm_rank,
        "model.kunlun.wukong_mlp": k.wukong_mlp,
        "model.kunlun.temporal_buckets": k.temporal_buckets,
    }.items():
        _check(value > 0, key, value, "an integer > 0")
    _check(k.summary in ("hsp", "pma"), "model.kunlun.summary", k.summary, "one of ['hsp', 'pma']")
    _check(k.gdpa_impl in ("auto", "reference", "triton"), "model.kunlun.gdpa_impl", k.gdpa_impl, "one of ['auto', 'reference', 'triton']")
    acts = ("identity", "relu", "silu", "gelu", "gelu_tanh")
    _check(k.pffn_activation in acts, "model.kunlun.pffn_activation", k.pffn_activation, f"one of {list(acts)}")
    _check(k.seed_attention in ("softmax",) + acts, "model.kunlun.seed_attention", k.seed_attention, f"one of {['softmax', *acts]}")
    for name, ev in [("default_event", k.default_event)] + [(f"events.{n}", e) for n, e in k.events.items()]:
        for field_name in ("dim", "heads", "layers", "num_tokens", "num_seeds"):
            _check(getattr(ev, field_name) > 0, f"model.kunlun.{name}.{field_name}", getattr(ev, field_name), "an integer > 0")
        _check(ev.dim % ev.heads == 0, f"model.kunlun.{name}.heads", ev.heads, f"a divisor of the event width dim={ev.dim}")
        _check(ev.layers <= k.num_layers, f"model.kunlun.{name}.layers", ev.layers, f"at most model.kunlun.num_layers={k.num_layers}")
        _check(ev.window >= -1, f"model.kunlun.{name}.window", ev.window, "a half width >= 0, or -1 for full attention")
    known_types = ("table_wise", "row_wise", "column_wise", "table_column_wise", "table_row_wise", "data_parallel")
    sp = cfg.parallel.sparse
    for t in sp.sharding_types:
        _check(t in known_types, "parallel.sparse.sharding_types", list(sp.sharding_types), f"a list drawn from {list(known_types)}")
    _check(sp.strategy in ("1d", "2d"), "parallel.sparse.strategy", sp.strategy, "one of ['1d', '2d']")
    _check(cfg.parallel.dense.strategy in ("ddp", "fsdp"), "parallel.dense.strategy", cfg.parallel.dense.strategy, "one of ['ddp', 'fsdp']")
    _check(sp.sync_every_n_steps >= 0, "parallel.sparse.sync_every_n_steps", sp.sync_every_n_steps, "an integer >= 0 (0 = never)")
    _check(sp.sharding_group_size >= 0, "parallel.sparse.sharding_group_size", sp.sharding_group_size, "an integer >= 0 (0 = the world size)")
    if sp.strategy == "2d":
        unsupported = sorted(set(sp.sharding_types) - {"table_wise", "row_wise", "column_wise"})
        _check(
            not unsupported,
            "parallel.sparse.sharding_types",
            list(sp.sharding_types),
            "with parallel.sparse.strategy=2d only table_wise, row_wise, column_wise (TorchRec 1.8 DMPCollection)",
        )
    if sp.strategy == "2d" and sp.sharding_group_size and world_size is not None:
        _check(
            world_size % sp.sharding_group_size == 0,
            "parallel.sparse.sharding_group_size",
            sp.sharding_group_size,
            f"a divisor of the world size ({world_size} processes)",
        )
    _validate_early_stopping(cfg)
    _check(cfg.data.synthetic.signal_strength >= 0, "data.synthetic.signal_strength", cfg.data.synthetic.signal_strength, "a value >= 0")
    _check(1.0 <= cfg.data.movielens.like_threshold <= 5.0, "data.movielens.like_threshold", cfg.data.movielens.like_threshold, "a rating in [1, 5]")
    for key, batch in {"data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size}.items():
        _check(world_size is None or batch % world_size == 0, key, batch, f"a multiple of the world size ({world_size} processes)")
    if cfg.data.source in ("parquet", "csv"):
        _validate_files(cfg.data)
    if cfg.data.source == "movielens" and cfg.data.movielens.path is not None:
        p = Path(cfg.data.movielens.path).expanduser()
        _check(p.is_dir(), "data.movielens.path", cfg.data.movielens.path, "an existing folder holding ml-100k files (u.data or ml-100k.inter)")
    _check(bool(cfg.run_dir), "run_dir", cfg.run_dir, "a folder path")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never"):
        _check(Path(resume).expanduser().is_dir(), "checkpoint.resume", resume, "'auto', 'never' or an existing checkpoint directory")


def _validate_early_stopping(cfg: JobConfig) -> None:
    """The metric must be a validation metric the evaluator reports (never a test metric:
    the test split must not choose the model it then scores)."""
    from kunlun.trainer.early_stopping import METRIC_MODES

    es = cfg.trainer.early_stopping
    parts = es.metric.split("/")
    _check(
        len(parts) in (2, 3) and parts[0] == "eval" and parts[1] in METRIC_MODES and all(parts),
        "trainer.early_stopping.metric",
        es.metric,
        f"eval/<metric> or eval/<metric>/<label> with <metric> one of {sorted(METRIC_MODES)} (validation split only)",
    )
    # A label name (third part) is checked by the trainer, once the data schema is known.
    if es.patience:
        _check(
            cfg.trainer.eval_every_n_steps > 0,
            "trainer.early_stopping.patience",
            es.patience,
            "0 when trainer.eval_every_n_steps=0 (early stopping needs periodic evaluations)",
        )


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


def _tower_names() -> List[str]:
    from kunlun.model.towers import TOWERS

    return sorted(TOWERS)


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
