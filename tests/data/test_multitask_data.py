"""Multi-task data (issue 14): label types and missing labels (NaN) in the schema, the
synthetic multi-task / multi-domain signal, and the file sources' label options
(``label_type``, ``missing``, ``mask_column``). MovieLens labels: tests/data/test_movielens.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kunlun.data.errors import DataError
from kunlun.data.schema import ContextFeature, FeatureSchema, TableSpec
from kunlun.data.sources import build_source
from kunlun.data.sources.files import FileSource
from kunlun.data.sources.synthetic import SyntheticSource
from kunlun.trainer.config import ConfigError, load_config
from kunlun.trainer.metrics import auc
from own_data import csv_text


# ============================================================================ schema
def _schema(**kw) -> FeatureSchema:
    return FeatureSchema(tables=[TableSpec("item", 10)], dense_features=[], context_features=[ContextFeature("item_id", "item")], event_types=[], **kw)


def test_schema_label_types_default_binary_and_are_checked():
    assert _schema(labels=["a", "b"]).label_types == ["binary", "binary"]
    s = _schema(labels=["click", "minutes"], label_types=["binary", "regression"])
    assert s.label_type("minutes") == "regression" and s.num_labels == 2
    assert s.describe().splitlines()[-1].split() == ["labels", "click,", "minutes", "(regression)"]
    with pytest.raises(ValueError, match=r"label_types \['binary'\] must give one type per label \['a', 'b'\]"):
        _schema(labels=["a", "b"], label_types=["binary"])
    with pytest.raises(ValueError, match=r"label 'b' has label type 'count': expected one of \['binary', 'regression'\]"):
        _schema(labels=["a", "b"], label_types=["binary", "count"])
    with pytest.raises(ValueError, match="duplicate label names"):
        _schema(labels=["a", "a"])


# ============================================================================ synthetic
MT = ["data.synthetic.multitask.tasks=[click,minutes,buy]", "data.synthetic.multitask.regression=[minutes]"]


def _synthetic(overrides=()) -> SyntheticSource:
    cfg = load_config("tiny", list(overrides))
    src = build_source(cfg.data, cfg.seed)
    assert isinstance(src, SyntheticSource)
    return src


def _fingerprint(src: SyntheticSource, n: int = 500) -> str:
    """sha256 of the first ``n`` train examples (labels, dense, ids, click history, oracle)."""
    b = src.read("train", np.arange(n))
    h = hashlib.sha256()
    cl = b.events["click"].lengths
    oracle = src.oracle_logits("train", np.arange(n))
    for arr in (b.labels, b.dense, b.context["user_id"].values, b.context["item_id"].values, cl, b.events["click"].items, oracle):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


@pytest.mark.parametrize(
    "signal, digest",
    # computed with the code before multi-task labels existed: the default must not change
    [("basic", "4b0b3e960f88c1f24ff7c5dca62ef7c0"), ("rich", "3c8f420c31aec55be5631ca4f8bce0b7")],
)
def test_synthetic_default_output_is_unchanged(signal, digest):
    src = _synthetic([f"data.synthetic.signal={signal}"])
    assert src.schema.labels == ["label"] and src.schema.label_types == ["binary"] and "domain" not in src.schema.context_keys
    assert src.oracle_logits("train", np.arange(5)).shape == (5,)
    assert _fingerprint(src) == digest


def test_synthetic_multitask_schema_domains_and_shapes():
    src = _synthetic(MT + ["data.synthetic.multitask.num_domains=4"])
    s = src.schema
    assert s.labels == ["click", "minutes", "buy"] and s.label_types == ["binary", "regression", "binary"]
    assert s.context_keys[-1] == "domain" and s.table_sizes["domain"] == 5
    idx = np.random.default_rng(0).permutation(2000)[:700]
    b = src.read("eval", idx)
    assert b.labels.shape == (700, 3) and b.labels.dtype == np.float32
    dom = b.context["domain"]
    assert dom.lengths.tolist() == [1] * 700 and set(dom.values.tolist()) == {1, 2, 3, 4}
    np.testing.assert_array_equal(dom.values, src.domains("eval", idx))
    oracle = src.oracle_logits("eval", idx)
    assert oracle.shape == (700, 3) and np.isfinite(oracle).all()
    # random access: the same example is the same wherever it is read
    again = src.read("eval", idx[::-1])
    np.testing.assert_array_equal(again.labels[::-1], b.labels)
    np.testing.assert_array_equal(src.oracle_logits("eval", idx[::-1])[::-1], oracle)
    binary = np.isin(b.labels[:, [0, 2]], [0.0, 1.0])
    assert binary.all()
    assert not np.isin(b.labels[:, 1], [0.0, 1.0]).all()


def test_synthetic_multitask_labels_follow_the_oracle():
    src = _synthetic(MT + ["data.synthetic.train_examples=20000"])
    idx = np.arange(20000)
    b = src.read("train", idx)
    oracle = src.oracle_logits("train", idx)
    for k in (0, 2):  # binary: the oracle ranks its own task's labels well, and the base rate matches
        assert auc(torch.from_numpy(oracle[:, k]), torch.from_numpy(b.labels[:, k])) > 0.7
        assert abs(b.labels[:, k].mean() - (1 / (1 + np.exp(-oracle[:, k]))).mean()) < 0.02
    noise = b.labels[:, 1] - oracle[:, 1]  # regression: label = oracle + N(0, regression_noise^2)
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03
    # the tasks share a part but are not the same function
    corr = np.corrcoef(oracle.T)
    assert 0.3 < corr[0, 2] < 0.95
    # each (domain, task) has its own offset: the task's logit minus the shared part differs by domain
    base = _synthetic().oracle_logits("train", idx)
    dom = src.domains("train", idx)
    means = [[(oracle[dom == d, k] - base[dom == d]).mean() for d in (1, 2, 3)] for k in range(3)]
    assert all(np.ptp(m) > 0.1 for m in means), means


def test_synthetic_multitask_parts_and_missing_rate():
    idx = np.arange(2000)
    plain = _synthetic().read("eval", idx)
    # only the shared part: the first task is exactly the single-task label, the others follow the same logit
    shared = _synthetic(MT + ["data.synthetic.multitask.task_specific=0", "data.synthetic.multitask.domain_specific=0"])
    np.testing.assert_array_equal(shared.read("eval", idx).labels[:, 0], plain.labels[:, 0])
    o = shared.oracle_logits("eval", idx)
    np.testing.assert_allclose(o, np.repeat(_synthetic().oracle_logits("eval", idx)[:, None], 3, axis=1))
    # missing labels: NaN at the configured rate in every task but the first
    src = _synthetic(MT + ["data.synthetic.multitask.missing_rate=0.3"])
    labels = src.read("eval", idx).labels
    rates = np.isnan(labels).mean(axis=0)
    assert rates[0] == 0.0 and all(abs(r - 0.3) < 0.04 for r in rates[1:]), rates
    assert not (np.isnan(labels[:, 1]) == np.isnan(labels[:, 2])).all()  # drawn per task
    complete = _synthetic(MT).read("eval", idx).labels
    kept = ~np.isnan(labels)
    np.testing.assert_array_equal(labels[kept], complete[kept])  # masking only removes labels


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("data.synthetic.multitask.regression=[rating]", "data.synthetic.multitask.regression", "a subset of data.synthetic.multitask.tasks"),
        ("data.synthetic.multitask.missing_rate=1.0", "data.synthetic.multitask.missing_rate", "a fraction in [0, 1)"),
        ("data.synthetic.multitask.num_domains=0", "data.synthetic.multitask.num_domains", "an integer >= 1"),
        ("data.synthetic.multitask.tasks=[a,a]", "data.synthetic.multitask.tasks", "distinct label names"),
    ],
)
def test_synthetic_multitask_config_errors(override, key, expected):
    with pytest.raises(ConfigError) as ei:
        load_config("tiny", ["data.synthetic.multitask.tasks=[click,minutes]", override])
    assert f"'{key}'" in str(ei.value) and expected in str(ei.value)


# ============================================================================ file sources
COLUMNS = """
        - {{name: click, role: label, dtype: int64}}
        - {{name: minutes, role: label, dtype: float32, label_type: regression{minutes}}}
        - {{name: buy, role: label, dtype: int64{buy}}}
        - {{name: in_shop, role: ignore, dtype: int64}}
        - {{name: item_id, role: categorical, dtype: string}}
"""
DATA: Dict[str, pa.Array] = {
    "click": pa.array([1, 0, 1, 0, 1, 0], pa.int64()),
    "minutes": pa.array([2.5, 0.0, -1.25, 1e6, None, float("nan")], pa.float64()),
    "buy": pa.array([1, None, 0, None, 1, 0], pa.int64()),
    "in_shop": pa.array([1, 0, 1, 0, None, 1], pa.int64()),
    "item_id": pa.array(["a", "b", "c", "d", "e", "f"]),
}


def _job(tmp_path: Path, data: Dict[str, pa.Array] = DATA, minutes=", missing: mask", buy=", mask_column: in_shop", source="parquet", header=True) -> Path:
    """Three identical splits of ``data`` and a job YAML declaring ``COLUMNS`` (``minutes``
    and ``buy``: extra options of those label columns)."""
    files = {}
    for split in ("train", "eval", "test"):
        if source == "csv":
            files[split] = tmp_path / f"{split}.csv"
            files[split].write_text(csv_text({k: v.to_pylist() for k, v in data.items()}, list(data), header=header))
        else:
            files[split] = tmp_path / f"{split}.parquet"
            pq.write_table(pa.table(data), files[split])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"data:\n  source: {source}\n  files:\n    train: {files['train']}\n    eval: {files['eval']}\n    test: {files['test']}\n"
        f"    csv: {{header: {str(header).lower()}}}\n"
        f"    schema:\n      columns:{COLUMNS.format(minutes=minutes, buy=buy)}"
    )
    return job


def _source(job: Path) -> FileSource:
    return FileSource(load_config(str(job)).data)


@pytest.mark.parametrize("source, header", [("parquet", True), ("csv", True), ("csv", False)])
def test_file_regression_masked_and_mask_column_labels(tmp_path, source, header):
    src = _source(_job(tmp_path, source=source, header=header))
    s = src.schema
    assert s.labels == ["click", "minutes", "buy"] and s.label_types == ["binary", "regression", "binary"]
    b = src.read("train", np.arange(6))
    nan = np.nan
    np.testing.assert_array_equal(b.labels[:, 0], [1, 0, 1, 0, 1, 0])
    # regression: the value as read (float32); null and NaN → missing (missing: mask)
    np.testing.assert_array_equal(b.labels[:, 1], np.array([2.5, 0.0, -1.25, 1e6, nan, nan], np.float32))
    # mask column: 0 or null → missing whatever the label says (rows 1 and 3 have null labels: no error)
    np.testing.assert_array_equal(b.labels[:, 2], [1, nan, 0, nan, nan, 0])
    assert b.weights is None or (b.weights == 1).all()
    assert src.bad_rows == 0


def test_file_boolean_mask_column_and_float_mask(tmp_path):
    data = dict(DATA, in_shop=pa.array([True, False, True, False, None, True]))
    b = _source(_job(tmp_path, data)).read("train", np.arange(6))
    np.testing.assert_array_equal(b.labels[:, 2], [1, np.nan, 0, np.nan, np.nan, 0])


def test_file_mask_column_that_is_also_a_feature(tmp_path):
    job = _job(tmp_path)
    job.write_text(job.read_text().replace("{name: in_shop, role: ignore, dtype: int64}", "{name: in_shop, role: categorical, dtype: int64}"))
    src = _source(job)
    assert "in_shop" in src.schema.context_keys and src.plan.masks == []
    b = src.read("train", np.arange(6))
    np.testing.assert_array_equal(b.labels[:, 2], [1, np.nan, 0, np.nan, np.nan, 0])


def test_file_label_options_bad_values(tmp_path):
    # missing: error (the default) keeps today's rule: a null label is a bad row
    msg = _data_error(lambda: _source(_job(tmp_path, minutes="")))
    assert "row 4: column 'minutes' = None: expected a label (not null; or set missing: mask)" in msg
    # a regression label must be finite
    data = dict(DATA, minutes=pa.array([1.0, float("inf"), 0.0, 0.0, 0.0, 0.0]))
    assert "row 1: column 'minutes' = inf: expected a finite number within float32 range (regression label)" in _data_error(
        lambda: _source(_job(tmp_path, data))
    )
    # a mask value other than 0/1
    data = dict(DATA, in_shop=pa.array([1, 0, 2, 0, 1, 1], pa.int64()))
    msg = _data_error(lambda: _source(_job(tmp_path, data)))
    assert "row 2: column 'in_shop' = 2: expected 0 or 1, false or true, or null (mask of label 'buy', data.files.schema.columns[2].mask_column)" in msg
    # binary labels keep their checks where the mask says observed
    data = dict(DATA, buy=pa.array([1, None, 3, None, 1, 0], pa.int64()))
    assert "row 2: column 'buy' = 3: expected a label in [0, 1]" in _data_error(lambda: _source(_job(tmp_path, data)))


def test_file_skip_policy_with_missing_labels(tmp_path):
    data = dict(DATA, minutes=pa.array([1.0, float("inf"), 0.0, 0.0, None, 0.0]))
    src = FileSource(load_config(str(_job(tmp_path, data)), ["data.bad_row_policy=skip"]).data)
    b = src.read("train", np.arange(6))
    assert src.bad_rows == 3 and b.weights.tolist() == [1, 0, 1, 1, 1, 1]  # one bad row per split
    assert b.labels[1].tolist() == [0, 0, 0] and np.isnan(b.labels[4, 1])


def _data_error(fn) -> str:
    with pytest.raises(DataError) as ei:
        fn()
    return str(ei.value)


@pytest.mark.parametrize(
    "minutes, buy, expected",
    [
        (", missing: drop", "", "'data.files.schema.columns[1].missing' = 'drop' is invalid: expected one of ['error', 'mask']"),
        (", threshold: 1.0", "", "'data.files.schema.columns[1].threshold' = 1.0 is invalid: expected null for a regression label"),
        ("", ", label_type: count", "'data.files.schema.columns[2].label_type' = 'count' is invalid: expected one of ['binary', 'regression']"),
        ("", ", mask_column: shop", "'data.files.schema.columns[2].mask_column' = 'shop' is invalid: expected a column declared in data.files.schema.columns"),
        ("", ", mask_column: item_id", "'data.files.schema.columns[2].mask_column' = 'item_id' is invalid: expected a column declared with dtype int64"),
        ("", ", mask_column: click", "'data.files.schema.columns[2].mask_column' = 'click' is invalid: expected a column that is not a label"),
    ],
)
def test_file_label_option_config_errors(tmp_path, minutes, buy, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(str(_job(tmp_path, minutes=minutes, buy=buy)))
    assert expected in str(ei.value)


@pytest.mark.parametrize("option", ["label_type: regression", "missing: mask", "mask_column: in_shop"])
def test_file_label_options_only_on_labels(tmp_path, option):
    job = _job(tmp_path)
    item = "{name: item_id, role: categorical, dtype: string"
    job.write_text(job.read_text().replace(item + "}", f"{item}, {option}}}"))
    with pytest.raises(ConfigError) as ei:
        load_config(str(job))
    field = option.split(":")[0]
    assert f"'data.files.schema.columns[4].{field}'" in str(ei.value) and "apply to labels" in str(ei.value)
