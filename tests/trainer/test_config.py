"""Config loading and validation: defaults, presets, overrides and the error messages."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kunlun.trainer.config import (
    CONFIGS_DIR,
    ConfigError,
    JobConfig,
    flatten,
    load_config,
    resolve_preset,
    validate,
)


def _err(preset=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(preset, list(overrides))
    return str(ei.value)


# ----------------------------------------------------------------------- happy paths
def test_defaults_load_and_match_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg == JobConfig()
    assert cfg.data.source == "synthetic"
    assert cfg.data.batch_size == 256
    assert cfg.model.dlrm.top_mlp == [128, 64]
    assert cfg.checkpoint.resume == "auto"


def test_preset_tiny_by_name_and_by_path():
    cfg = load_config("tiny")
    assert cfg.run_dir == "runs/tiny"
    assert cfg.data.batch_size == 64
    assert cfg.data.eval_batch_size == 256
    assert cfg.data.synthetic.num_users == 500
    assert cfg.data.synthetic.train_examples == 20000
    assert cfg.model.embedding_dim == 16
    assert cfg.model.dlrm.bottom_mlp == [32]
    assert cfg.model.dlrm.top_mlp == [64, 32]
    assert cfg.trainer.max_steps == 40
    # keys the preset does not set keep their defaults
    assert cfg.data.synthetic.num_actions == JobConfig().data.synthetic.num_actions
    assert cfg.optim.dense == "adam"
    assert load_config(str(CONFIGS_DIR / "tiny.yaml")) == cfg
    assert resolve_preset("tiny") == CONFIGS_DIR / "tiny.yaml"


def test_overrides_apply_with_types():
    cfg = load_config(
        "tiny",
        [
            "trainer.max_steps=7",
            "optim.dense_lr=0.25",
            "model.dlrm.top_mlp=[8,4]",
            "data.shuffle=false",
            "run_dir=/tmp/somewhere",
            "parallel.sparse.sharding_types=[table_wise,row_wise]",
        ],
    )
    assert cfg.trainer.max_steps == 7 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.dense_lr == 0.25 and isinstance(cfg.optim.dense_lr, float)
    assert cfg.model.dlrm.top_mlp == [8, 4]
    assert cfg.data.shuffle is False
    assert cfg.run_dir == "/tmp/somewhere"
    assert cfg.parallel.sparse.sharding_types == ["table_wise", "row_wise"]
    # everything else still comes from the preset
    assert cfg.data.batch_size == 64
    assert cfg.model.dlrm.bottom_mlp == [32]


def test_later_override_wins_and_int_promotes_to_float():
    cfg = load_config(None, ["trainer.max_steps=3", "trainer.max_steps=9", "optim.dense_lr=1"])
    assert cfg.trainer.max_steps == 9
    assert cfg.optim.dense_lr == 1.0 and isinstance(cfg.optim.dense_lr, float)


def test_flatten_has_dotted_scalar_keys():
    flat = flatten(load_config("tiny"))
    assert flat["data.batch_size"] == 64
    assert flat["data.synthetic.num_users"] == 500
    assert flat["model.dlrm.top_mlp"] == "[64, 32]"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


# --------------------------------------------------------------------- unknown keys
def test_unknown_key_on_command_line_names_key_and_lists_allowed():
    msg = _err(None, ["trainer.max_stepz=5"])
    assert "command line" in msg
    assert "'trainer.max_stepz'" in msg
    for allowed in ("max_steps", "eval_every_n_steps", "eval_max_batches", "device"):
        assert allowed in msg


def test_unknown_top_level_key_lists_sections():
    msg = _err(None, ["bogus=1"])
    assert "'bogus'" in msg
    for section in ("data", "model", "trainer", "checkpoint", "run_dir", "seed"):
        assert section in msg


def test_unknown_key_in_yaml_names_file_and_line(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text("seed: 1\ndata:\n  batch_size: 32\n  synthetic:\n    num_users: 5\n    bogus_knob: 3\n")
    msg = _err(str(p))
    assert f"{p}:6" in msg
    assert "'data.synthetic.bogus_knob'" in msg
    assert "num_users" in msg and "signal_strength" in msg  # allowed keys at that level


def test_unknown_top_level_key_in_yaml_names_line(tmp_path: Path):
    p = tmp_path / "top.yaml"
    p.write_text("seed: 1\n\n# comment\nnot_a_key: 2\n")
    msg = _err(str(p))
    assert f"{p}:4" in msg
    assert "'not_a_key'" in msg


def test_wrong_type_in_yaml_names_file_line_key_value(tmp_path: Path):
    p = tmp_path / "typed.yaml"
    p.write_text("seed: 1\ntrainer:\n  max_steps: lots\n")
    msg = _err(str(p))
    assert f"{p}:3" in msg
    assert "'trainer.max_steps'" in msg
    assert "lots" in msg


def test_invalid_yaml_and_non_mapping(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    msg = _err(str(bad))
    assert str(bad) in msg and "not valid YAML" in msg
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    msg = _err(str(lst))
    assert str(lst) in msg and "mapping" in msg


# ------------------------------------------------------------------------ bad values
def test_wrong_type_names_key_and_value():
    msg = _err(None, ["trainer.max_steps=abc"])
    assert "'trainer.max_steps'" in msg
    assert "abc" in msg
    assert "command line" in msg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("model.dlrm.top_mlp=abc", "model.dlrm.top_mlp", "abc"),
        ("data.shuffle=maybe", "data.shuffle", "maybe"),
        ("seed=x1", "seed", "x1"),
        ("data.batch_size=1.5", "data.batch_size", "1.5"),
    ],
)
def test_wrong_type_variants_name_key_and_value(override, key, value):
    msg = _err(None, [override])
    assert key in msg
    assert value in msg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("data.batch_size=-1", "data.batch_size", "-1"),
        ("model.embedding_dim=0", "model.embedding_dim", "0"),
        ("data.eval_batch_size=0", "data.eval_batch_size", "0"),
        ("trainer.max_steps=0", "trainer.max_steps", "0"),
        ("data.synthetic.num_items=-5", "data.synthetic.num_items", "-5"),
        ("data.num_workers=-1", "data.num_workers", "-1"),
        ("optim.dense_lr=0", "optim.dense_lr", "0"),
    ],
)
def test_non_positive_sizes_rejected(override, key, value):
    msg = _err(None, [override])
    assert f"'{key}'" in msg
    assert re.search(rf"= {re.escape(value)}(\.0)?\b", msg), msg
    assert "expected" in msg and ("> 0" in msg or ">= 0" in msg)


def test_mlp_with_non_positive_width_rejected():
    msg = _err(None, ["model.dlrm.top_mlp=[8,-4]"])
    assert "'model.dlrm.top_mlp'" in msg
    assert "[8, -4]" in msg


def test_batch_not_divisible_by_world_size():
    cfg = load_config("tiny")
    assert cfg.data.batch_size == 64
    validate(cfg, world_size=2)  # 64 and 256 divide by 2
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError) as ei:
        validate(cfg, world_size=3)
    msg = str(ei.value)
    assert "config key 'data.batch_size' = 64 is invalid: expected a multiple of the world size (3 processes)" in msg


def test_eval_batch_not_divisible_by_world_size():
    cfg = load_config("tiny", ["data.batch_size=60"])
    with pytest.raises(ConfigError) as ei:
        validate(cfg, world_size=6)  # 60 divides by 6, 256 does not
    msg = str(ei.value)
    assert "'data.eval_batch_size'" in msg and "256" in msg and "6 processes" in msg


def test_movielens_missing_path_names_key(tmp_path: Path):
    msg = _err(None, ["data.source=movielens", "data.movielens.path=/nonexistent"])
    assert "'data.movielens.path'" in msg
    assert "/nonexistent" in msg
    # an existing folder passes validation, and a missing path is fine for the synthetic source
    cfg = load_config(None, ["data.source=movielens", f"data.movielens.path={tmp_path}"])
    assert cfg.data.movielens.path == str(tmp_path)
    assert load_config(None, ["data.movielens.path=/nonexistent"]).data.source == "synthetic"


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.bad_row_policy=maybe", "data.bad_row_policy", ["error", "skip"]),
        ("data.source=orc", "data.source", ["synthetic", "movielens", "parquet", "csv"]),
        ("optim.schedule=step", "optim.schedule", ["constant", "linear", "cosine"]),
        ("trainer.device=tpu", "trainer.device", ["auto", "cpu", "cuda"]),
        ("parallel.backend=mpi", "parallel.backend", ["auto", "gloo", "nccl"]),
    ],
)
def test_bad_enum_lists_allowed_values(override, key, allowed):
    msg = _err(None, [override])
    value = override.split("=", 1)[1]
    assert f"'{key}'" in msg
    assert f"'{value}'" in msg
    assert str(allowed) in msg


def test_bad_sharding_type_lists_known_types():
    msg = _err(None, ["parallel.sparse.sharding_types=[table_wise,diagonal]"])
    assert "'parallel.sparse.sharding_types'" in msg and "diagonal" in msg
    assert "row_wise" in msg and "data_parallel" in msg


def test_like_threshold_range():
    msg = _err(None, ["data.movielens.like_threshold=6"])
    assert "'data.movielens.like_threshold'" in msg and "6.0" in msg and "[1, 5]" in msg


def test_override_without_equals():
    msg = _err(None, ["trainer.max_steps"])
    assert "'trainer.max_steps'" in msg
    assert "key=value" in msg


def test_nonexistent_preset_lists_presets():
    msg = _err("no_such_preset")
    assert "'no_such_preset'" in msg
    assert "tiny" in msg and "movielens" in msg
    assert str(CONFIGS_DIR) in msg


def test_checkpoint_resume_must_exist(tmp_path: Path):
    msg = _err(None, ["checkpoint.resume=/no/such/dir"])
    assert "'checkpoint.resume'" in msg
    assert "/no/such/dir" in msg
    assert "auto" in msg and "never" in msg
    assert load_config(None, ["checkpoint.resume=never"]).checkpoint.resume == "never"
    assert load_config(None, [f"checkpoint.resume={tmp_path}"]).checkpoint.resume == str(tmp_path)


def test_validate_on_modified_object():
    cfg = load_config("tiny")
    # Field checks run as a config object is built: an impossible one cannot exist.
    with pytest.raises(ConfigError, match=r"TrainerConfig\.max_steps = -3 is invalid: expected an integer > 0"):
        dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=-3))
    validate(cfg, world_size=1)  # the original is untouched and valid


def test_tower_names_of_the_config_are_the_registered_towers():
    from kunlun.model.config import TOWER_NAMES
    from kunlun.model.towers import TOWERS

    assert sorted(TOWER_NAMES) == sorted(TOWERS)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("model.hstu.heads=3", "model.hstu.heads", "a divisor of dim=64"),
        ("model.kunlun.events={dislike: {dim: 16, heads: 3}}", "model.kunlun.events.dislike.heads", "a divisor of the event width dim=16"),
        ("model.interformer.pffn_activation=tanh", "model.interformer.pffn_activation", "one of"),
        ("model.dcnv2.low_rank=-1", "model.dcnv2.low_rank", "an integer >= 0"),
        ("trainer.early_stopping.mode=best", "trainer.early_stopping.mode", "one of ['auto', 'min', 'max']"),
    ],
)
def test_field_checks_beside_the_fields_name_the_full_key(override, key, expected):
    """Checks in each dataclass's __post_init__ still name the full key and the command line."""
    msg = _err(None, [override])
    assert msg.startswith("command line: ") or "command line" in msg, msg
    assert f"'{key}'" in msg and expected in msg, msg


def test_field_check_in_a_preset_names_its_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  tower: hstu\n  hstu:\n    dim: 30\n    heads: 4\n")
    msg = _err(str(preset), [])
    assert f"{preset}:5:" in msg and "'model.hstu.heads' = 4" in msg and "a divisor of dim=30" in msg, msg
