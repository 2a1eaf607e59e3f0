"""The schema-declared file source: Parquet and CSV readers, id mapping, splits, shuffling,
the loader on top of it, config validation, and malformed files.

Data are generated here (``own_data``: users, items with large integer ids, two event types
of history, a label that depends on the histories).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import REPO, job_env
from kunlun.data.errors import DataError
from kunlun.data.ids import HashMapper, IdentityMapper, VocabMapper, canonical_text, fingerprint, fnv1a64_reference, id_fingerprints
from kunlun.data.loader import ShardedBatches
from kunlun.data.sources import build_source
from kunlun.data.sources.files import FileSource
from kunlun.trainer.config import ConfigError, load_config
from own_data import SCHEMA_YAML, arrow_table, csv_text, csv_yaml, make_rows, write_dataset


def _cfg(path: Path, overrides=()):
    return load_config(str(path), list(overrides))


def _same_table_job(tmp_path: Path, table: pa.Table, schema: str, row_group_size=None) -> Path:
    """``table`` as all three Parquet splits plus a job YAML declaring ``schema`` (indented
    under ``data.files.schema``); returns the YAML's path."""
    for s in ("train", "eval", "test"):
        pq.write_table(table, tmp_path / f"{s}.parquet", row_group_size=row_group_size)
    job = tmp_path / "j.yaml"
    job.write_text(
        f"data:\n  source: parquet\n  files:\n    train: {tmp_path}/train.parquet\n    eval: {tmp_path}/eval.parquet\n"
        f"    test: {tmp_path}/test.parquet\n    schema:{schema}"
    )
    return job


def _hash_row(raw, n: int) -> int:
    return 1 + fnv1a64_reference(str(raw)) % (n - 1)


def _assert_same_examples(a, b) -> None:
    """Two decoded blocks hold the same examples, field by field."""
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.request_time, b.request_time)
    np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6)
    assert list(a.context) == list(b.context) and list(a.events) == list(b.events)
    for k in a.context:
        np.testing.assert_array_equal(a.context[k].lengths, b.context[k].lengths)
        np.testing.assert_array_equal(a.context[k].values, b.context[k].values)
    for k in a.events:
        for f in ("lengths", "items", "actions", "timestamps"):
            np.testing.assert_array_equal(getattr(a.events[k], f), getattr(b.events[k], f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    files = write_dataset(root, train_rows=3000, eval_rows=500, test_rows=500, train_files=3, row_group_size=300)
    raw = {s: pq.read_table([str(p) for p in ps][0]) if len(ps) == 1 else None for s, ps in files.items()}
    return root, files, raw


# =============================================================================== ids
def test_fingerprint_is_fixed_fnv1a_plus_splitmix_and_ints_hash_as_their_digits():
    texts = ["abc", "68fd1e64", "ü€", "1000000000042", "a" * 40]
    fp, valid = fingerprint(canonical_text(pa.array(texts)))
    assert valid.all()
    assert fp.tolist() == [fnv1a64_reference(t) for t in texts]
    assert fp[0] == 3018304574923447344  # fixed forever: vocabularies and checkpoints depend on it
    # 1000000000042 as int64 and as uint64 is the same id as the text "1000000000042"
    for typ in (pa.int64(), pa.uint64()):
        assert id_fingerprints(pa.array([1000000000042], typ))[0][0] == fp[3]
    # nulls and empty strings are missing (row 0)
    rows, bad = HashMapper(11).map(pa.array(["abc", "", None]))
    assert rows.tolist() == [1 + fp[0] % 10, 0, 0] and not bad.any()
    # uint64 ids above int64 hash too
    big, _ = HashMapper(1000).map(pa.array([2**64 - 1], pa.uint64()))
    assert big[0] == _hash_row(2**64 - 1, 1000)


def test_hash_is_the_same_in_another_process_with_another_hash_seed():
    code = "from kunlun.data.ids import HashMapper; import pyarrow as pa; print(HashMapper(97).map(pa.array(['x', 'user_42', '7']))[0].tolist())"
    env = dict(job_env(), PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == str(HashMapper(97).map(pa.array(["x", "user_42", "7"]))[0].tolist())


def test_identity_and_vocab_mappers():
    rows, bad = IdentityMapper(5).map(pa.array([0, 4, 5, -1, None]))
    assert rows.tolist() == [0, 4, 0, 0, 0] and bad.tolist() == [False, False, True, True, False]
    rows, bad = IdentityMapper(5, "modulo").map(pa.array([7, -1]))
    assert rows.tolist() == [2, 4] and not bad.any()
    vm = VocabMapper(id_fingerprints(pa.array(["x", "y", "z"]))[0], oov_buckets=2, num_embeddings=6)
    rows, _ = vm.map(pa.array(["z", "x", None, "q", "y"]))
    oov = 1 + fnv1a64_reference("q") % 2
    assert rows.tolist() == [5, 3, 0, oov, 4]  # 0 missing, 1-2 OOV, then x, y, z in vocabulary order


# ======================================================================== the source
def test_parquet_source_reads_declared_columns_exactly(dataset):
    root, files, _ = dataset
    src = build_source(_cfg(root / "job.yaml").data, 0)
    assert isinstance(src, FileSource)
    assert {s: src.num_examples(s) for s in ("train", "eval", "test")} == {"train": 3000, "eval": 500, "test": 500}
    assert len(src.files) == 5 and len(src.chunks) == 3 * 4 + 2 + 2  # _SUCCESS ignored; 1000-row files in 300-row groups
    s = src.schema
    assert s.table_sizes == {"user": 1000, "item": 2000, "category": 8, "tag": 64}
    assert s.context_keys == ["user_id", "item_id", "item_cat", "tags"]
    assert [(e.name, e.item_table, e.action_table, e.max_len) for e in s.event_types] == [
        ("click", "item", "category", 20),
        ("purchase", "item", "category", 8),
    ]
    assert s.dense_features == ["price", "age"] and s.labels == ["clicked"]

    raw = pq.read_table(files["train"][1])  # the second train file: examples 1000..1999
    idx = np.array([1000, 1999, 1500, 1000])
    block = src.read("train", idx)
    rows = [0, 999, 500, 0]
    col = {k: raw.column(k).to_pylist() for k in raw.column_names}
    assert block.labels[:, 0].tolist() == [float(col["clicked"][r]) for r in rows]
    assert block.request_time.tolist() == [col["ts"][r] for r in rows]
    assert block.context["item_id"].values.tolist() == [_hash_row(col["item_id"][r], 2000) for r in rows]
    assert block.context["user_id"].values.tolist() == [_hash_row(col["user_id"][r], 1000) for r in rows]
    assert block.context["item_cat"].values.tolist() == [col["item_cat"][r] for r in rows]  # identity
    tags = [col["tags"][r][:3] for r in rows]
    assert block.context["tags"].lengths.tolist() == [len(t) for t in tags]
    assert block.context["tags"].values.tolist() == [_hash_row(t, 64) for ts in tags for t in ts]
    for j, r in enumerate(rows):
        price = col["price"][r]
        assert block.dense[j, 0] == pytest.approx(np.log1p(price) if price is not None else 0.0, rel=1e-6)
        age = col["age"][r]
        assert block.dense[j, 1] == pytest.approx(np.log1p(age if age is not None else 30), rel=1e-6)
    ev = block.events["click"]
    assert ev.lengths.tolist() == [min(len(col["click_items"][r]), 20) for r in rows]
    exp_items = [_hash_row(x, 2000) for r in rows for x in col["click_items"][r][-20:]]
    assert ev.items.tolist() == exp_items
    assert ev.actions.tolist() == [x for r in rows for x in col["click_cats"][r][-20:]]
    assert ev.timestamps.tolist() == [x for r in rows for x in col["click_ts"][r][-20:]]
    buy = block.events["purchase"]
    assert buy.timestamps.tolist() == [col["ts"][r] for r in rows for _ in col["buy_items"][r]]  # no timestamp column
    assert block.weights is None


def test_csv_source_gives_the_same_examples_as_parquet(tmp_path):
    for split, n, seed in (("train", 900, 1), ("eval", 200, 2), ("test", 200, 3)):
        cols = make_rows(n, seed)
        pq.write_table(arrow_table(cols), tmp_path / f"{split}.parquet", row_group_size=250)
        (tmp_path / f"{split}.csv").write_text(csv_text(cols, [c for c in cols if c != "affinity"]))
    (tmp_path / "p.yaml").write_text(SCHEMA_YAML.format(train=tmp_path / "train.parquet", eval=tmp_path / "eval.parquet", test=tmp_path / "test.parquet"))
    (tmp_path / "c.yaml").write_text(csv_yaml(tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "test.csv", rows_per_block=333))
    p, c = FileSource(_cfg(tmp_path / "p.yaml").data), FileSource(_cfg(tmp_path / "c.yaml").data)
    assert [ch.num_rows for ch in c.chunks[:3]] == [333, 333, 234]
    for split in ("train", "eval", "test"):
        idx = np.random.default_rng(0).permutation(p.num_examples(split))
        _assert_same_examples(p.read(split, idx), c.read(split, idx))


@pytest.mark.parametrize("header", [True, False])
def test_multi_character_delimiter_reads_like_commas(tmp_path, header):
    """MovieLens-1M's ``ratings.dat`` separates fields by ``::``; pyarrow's parser takes one byte."""
    paths = {}
    for split, n, seed in (("train", 700, 1), ("eval", 150, 2), ("test", 150, 3)):
        cols = make_rows(n, seed)
        names = [c for c in cols if c != "affinity"]  # the declared columns, in order (no header: by position)
        for delimiter, tag in ((",", "comma"), ("::", "colons")):
            paths[tag, split] = tmp_path / f"{split}.{tag}.csv"
            paths[tag, split].write_text(csv_text(cols, names, delimiter=delimiter, header=header))
    sources = {}
    for delimiter, tag in ((",", "comma"), ("::", "colons")):
        text = csv_yaml(paths[tag, "train"], paths[tag, "eval"], paths[tag, "test"], rows_per_block=256).replace(
            "csv: {rows_per_block: 256}", f'csv: {{rows_per_block: 256, delimiter: "{delimiter}", header: {str(header).lower()}}}'
        )
        (tmp_path / f"{tag}.yaml").write_text(text)
        sources[tag] = FileSource(_cfg(tmp_path / f"{tag}.yaml").data)
    assert "::" in paths["colons", "train"].read_text() and [ch.num_rows for ch in sources["colons"].chunks[:3]] == [256, 256, 188]
    for split in ("train", "eval", "test"):
        idx = np.random.default_rng(0).permutation(sources["comma"].num_examples(split))
        _assert_same_examples(sources["comma"].read(split, idx), sources["colons"].read(split, idx))


def test_multi_character_delimiter_keeps_quoting_and_located_errors(tmp_path):
    cols = {k: v.to_pylist() for k, v in GOOD.items()}
    cols["item_id"][1] = '"b::x"'  # a quoted delimiter is part of the value
    lines = csv_text(cols, list(cols), delimiter="::").splitlines()
    good = tmp_path / "train.csv"
    good.write_text("\n".join(lines) + "\n")
    src = _mini(tmp_path, source="csv", train_file=good, delimiter="::")
    assert src.read("train", np.arange(6)).context["item_id"].values.tolist() == [_hash_row(x, 100) for x in "a b::x c d e f".split()]
    lines[5] = "1::e::0"  # line 6: 3 fields
    bad = tmp_path / "fields.csv"
    bad.write_text("\n".join(lines) + "\n")
    msg = _data_error(lambda: _mini(tmp_path, source="csv", train_file=bad, delimiter="::"))
    assert f"{bad}:6: row has 3 fields: expected 6 separated by '::' ('1::e::0')" in msg


@pytest.mark.parametrize(
    "csv_cfg, expected",
    [
        ('{delimiter: ""}', ["'data.files.csv.delimiter' = ''", "a non-empty delimiter", '"::"']),
        ('{delimiter: "::", list_separator: ":"}', ["'data.files.csv.list_separator' = ':'", "does not occur in the delimiter '::'"]),
    ],
)
def test_csv_delimiter_validation(tmp_path, csv_cfg, expected):
    text = csv_yaml(tmp_path / "t.csv", tmp_path / "e.csv", tmp_path / "s.csv").replace("csv: {rows_per_block: 700}", f"csv: {csv_cfg}")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as ei:
        _cfg(tmp_path / "c.yaml")
    for part in expected:
        assert part in str(ei.value), (part, str(ei.value))


def test_newest_first_lists_are_reversed_and_the_most_recent_kept(tmp_path):
    t = pa.table(
        {
            "label": pa.array([1, 0], pa.int64()),
            "hist": pa.array([["c", "b", "a"], ["z"]]),  # newest first
            "hist_ts": pa.array([[30, 20, 10], [5]], pa.list_(pa.int64())),
        }
    )
    src = FileSource(
        _cfg(
            _same_table_job(
                tmp_path,
                t,
                """
      events: [{name: view, max_len: 2, order: newest_first}]
      columns:
        - {name: label, role: label, dtype: int64}
        - {name: hist, role: sequence, dtype: list<string>, event: view, table: item}
        - {name: hist_ts, role: sequence, dtype: list<int64>, event: view, attribute: timestamp}
""",
            )
        ).data
    )
    # no action column: actions are 0 from the 1-row table _no_action; no request_time column: 0
    assert src.schema.table_sizes == {"item": 100_000, "_no_action": 1}
    b = src.read("train", np.arange(2))
    ev = b.events["view"]
    assert ev.lengths.tolist() == [2, 1]
    assert ev.timestamps.tolist() == [20, 30, 5]  # oldest first, the 2 most recent kept
    assert ev.items.tolist() == [_hash_row("b", 100_000), _hash_row("c", 100_000), _hash_row("z", 100_000)]
    assert ev.actions.tolist() == [0, 0, 0] and b.request_time.tolist() == [0, 0]


def _time_job(tmp_path: Path, source: str, eval_from: int, test_from: int, rows_per_block: int = 250) -> Path:
    cols = make_rows(1000, 5)
    names = [c for c in cols if c != "affinity"]
    if source == "parquet":
        pq.write_table(arrow_table(cols).slice(0, 600), tmp_path / "a.parquet", row_group_size=200)
        pq.write_table(arrow_table(cols).slice(600), tmp_path / "b.parquet", row_group_size=200)
    else:
        (tmp_path / "a.csv").write_text(csv_text({k: v[:600] for k, v in cols.items()}, names))
        (tmp_path / "b.csv").write_text(csv_text({k: v[600:] for k, v in cols.items()}, names))
    text = (
        SCHEMA_YAML.format(train="[]", eval="[]", test="[]")
        .replace(
            "    shuffle_window: 4\n",
            f"    shuffle_window: 4\n    split: time\n    paths: {tmp_path}/*.{'parquet' if source == 'parquet' else 'csv'}\n"
            f"    eval_from: {eval_from}\n    test_from: {test_from}\n    csv: {{rows_per_block: {rows_per_block}}}\n",
        )
        .replace("source: parquet", f"source: {source}")
    )
    (tmp_path / "t.yaml").write_text(text)
    return tmp_path / "t.yaml"


@pytest.mark.parametrize("source", ["parquet", "csv"])
def test_time_split_on_the_request_time(tmp_path, source):
    from own_data import T0

    ts = T0 + 60 * np.arange(1000)
    eval_from, test_from = int(ts[550]) + 1, int(ts[830])
    src = FileSource(_cfg(_time_job(tmp_path, source, eval_from, test_from)).data)
    counts = {s: src.num_examples(s) for s in ("train", "eval", "test")}
    assert counts == {"train": 551, "eval": 279, "test": 170}
    assert src.read("train", np.arange(551)).request_time.max() < eval_from
    ev = src.read("eval", np.arange(279)).request_time
    assert ev.min() >= eval_from and ev.max() < test_from and sorted(ev.tolist()) == ts[551:830].tolist()
    assert src.read("test", np.arange(170)).request_time.min() == test_from
    if source == "parquet":  # row groups entirely on one side come from the statistics, without explicit rows
        # only row groups 400-599 and 800-999 straddle a boundary: 2 row lists each; 3 groups are whole
        assert sum(len(seg.rows) for seg in src._segments.values()) == 4
        assert sum(len(seg.length) - len(seg.rows) for seg in src._segments.values()) == 3


def test_rows_split_and_file_order(tmp_path):
    for k, n in enumerate((400, 300, 300)):
        cols = make_rows(n, 10 + k, t_start=1_700_000_000 + 10**6 * k)
        pq.write_table(arrow_table(cols), tmp_path / f"day_{[2, 10, 1][k]}.parquet", row_group_size=128)
    text = SCHEMA_YAML.format(train="[]", eval="[]", test="[]").replace(
        "    shuffle_window: 4\n", f"    split: rows\n    paths: {tmp_path}\n    eval_fraction: 0.1\n    test_fraction: 0.2\n"
    )
    (tmp_path.parent / f"{tmp_path.name}-r.yaml").write_text(text)  # not inside the data directory
    src = FileSource(_cfg(tmp_path.parent / f"{tmp_path.name}-r.yaml").data)
    assert [Path(f).name for f in src.files] == ["day_1.parquet", "day_2.parquet", "day_10.parquet"]  # natural order
    assert {s: src.num_examples(s) for s in ("train", "eval", "test")} == {"train": 700, "eval": 100, "test": 200}
    test_times = src.read("test", np.arange(200)).request_time
    assert test_times.min() >= 1_700_000_000 + 10**6  # the test rows are the end of day_10


# ============================================================= loader on the file source
def test_sharded_epoch_exactly_once_with_window_shuffle_and_resume(dataset):
    root, _, _ = dataset
    src = FileSource(_cfg(root / "job.yaml").data)
    n, G = src.num_examples("train"), 100
    perm = src.permutation("train", 0, 7)
    assert sorted(perm.tolist()) == list(range(n)) and perm.tolist() != list(range(n))
    assert src.permutation("train", 0, 7).tolist() == perm.tolist() and src.permutation("train", 1, 7).tolist() != perm.tolist()
    # locality: examples within a window of 4 segments (row groups) are shuffled together, so any
    # 250 consecutive positions touch at most 2 windows' row groups; a global shuffle touches all 12
    cum = src._segments["train"].cum
    touched = [len(set((np.searchsorted(cum, perm[i : i + 250], side="right") - 1).tolist())) for i in range(0, n, 250)]
    assert max(touched) <= 8
    glob = FileSource(_cfg(root / "job.yaml", ["data.files.shuffle_window=0"]).data).permutation("train", 0, 7)
    assert min(len(set((np.searchsorted(cum, glob[i : i + 250], side="right") - 1).tolist())) for i in range(0, n, 250)) == 12

    def stream(W: int, start: int = 0, k: int = n // G) -> List[List[int]]:
        out = []
        for i in range(k):
            ids = []
            for r in range(W):
                ds = ShardedBatches(src, "train", G, rank=r, world_size=W, seed=7, examples_consumed=start)
                ids += ds.batch(i).request_time.tolist()
            out.append(ids)
        return out

    full = stream(2)
    times = src.read("train", np.arange(n)).request_time
    assert sorted(sum(full, [])) == sorted(times.tolist())  # every example exactly once in the epoch
    assert stream(1, start=10 * G, k=5) == full[10:15]  # resumed at another world size: the same next batches


def test_eval_split_weights_multiply_padding(tmp_path):
    t = pa.table({"y": pa.array([1, 0, 1], pa.int64()), "w": pa.array([2.0, 0.5, 1.0])})
    src = FileSource(
        _cfg(
            _same_table_job(
                tmp_path,
                t,
                """
      columns:
        - {name: y, role: label, dtype: int64}
        - {name: w, role: weight, dtype: float32}
""",
            )
        ).data
    )
    ds = ShardedBatches(src, "eval", 4)
    assert ds.batch(0).weights.tolist() == [2.0, 0.5, 1.0, 0.0]  # example weights, padding 0
    assert ShardedBatches(src, "train", 2, shuffle=False).batch(0).weights.tolist() == [2.0, 0.5]


def test_cache_is_bounded(dataset):
    root, _, _ = dataset
    src = FileSource(_cfg(root / "job.yaml", ["data.files.cache_mb=1", "data.files.validate=false"]).data)
    one = src._chunk(0)
    from kunlun.data.block import block_nbytes

    per_chunk = block_nbytes(one)
    for c in range(len(src.chunks)):
        src._chunk(c)
    assert src._cache_bytes <= 1 << 20 and per_chunk > 100_000
    assert 5 <= len(src._cache) < len(src.chunks)  # older chunks were evicted
    # evicted chunks are decoded again, identically
    a = src.read("train", np.arange(50))
    b = FileSource(_cfg(root / "job.yaml").data).read("train", np.arange(50))
    np.testing.assert_array_equal(a.context["item_id"].values, b.context["item_id"].values)


# ================================================================ config validation
def _bad_schema(tmp_path: Path, columns: str, extra: str = "", events: str = "", tables: str = "") -> str:
    for s in ("train", "eval", "test"):
        (tmp_path / f"{s}.parquet").write_bytes(b"")
    p = tmp_path / "bad.yaml"
    p.write_text(
        "data:\n  source: parquet\n  files:\n"
        f"    train: {tmp_path}/train.parquet\n    eval: {tmp_path}/eval.parquet\n    test: {tmp_path}/test.parquet\n{extra}"
        f"    schema:\n{tables}{events}      columns:\n{columns}"
    )
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    return str(ei.value)


LABEL = "        - {name: y, role: label, dtype: int64}\n"


@pytest.mark.parametrize(
    "columns, events, tables, expected",
    [
        (LABEL + "        - {name: x, rol: dense}\n", "", "", ["bad.yaml:10:", "'data.files.schema.columns[1].rol'", "role", "dtype", "max_ids"]),
        (
            LABEL + "        - {name: x, role: lable, dtype: int64}\n",
            "",
            "",
            [
                "bad.yaml:10:",
                "'data.files.schema.columns[1].role' = 'lable'",
                "['label', 'weight', 'dense', 'categorical', 'sequence', 'request_time', 'ignore']",
            ],
        ),
        (
            "        - {name: y, role: label, dtype: string}\n",
            "",
            "",
            ["'data.files.schema.columns[0].dtype' = 'string'", "['int64', 'float32'] for role label"],
        ),
        (LABEL + "        - {name: tags, role: categorical, dtype: list<string>}\n", "", "", ["'data.files.schema.columns[1].max_ids' = 0", "most ids kept"]),
        (
            LABEL + "        - {name: h, role: sequence, dtype: list<int64>, event: clicks}\n",
            "      events: [{name: click}]\n",
            "",
            ["'data.files.schema.columns[1].event' = 'clicks'", "['click']"],
        ),
        (
            LABEL + "        - {name: a, role: sequence, dtype: list<int64>, event: click, attribute: action}\n",
            "      events: [{name: click}]\n",
            "",
            ["'data.files.schema.events[0]' = 'click'", "item column"],
        ),
        (
            LABEL + "        - {name: c, role: categorical, dtype: string, table: cat}\n",
            "",
            "      tables: [{name: cat, num_embeddings: 10, id_mapping: identity}]\n",
            ["'data.files.schema.columns[1].dtype' = 'string'", "identity"],
        ),
        ("        - {name: x, role: dense, dtype: float32}\n", "", "", ["'data.files.schema.columns'", "at least one column with role label"]),
        (
            LABEL + "        - {name: c, role: categorical, dtype: string, table: t}\n",
            "",
            "      tables: [{name: t, num_embeddings: 1}]\n",
            ["'data.files.schema.tables[0].num_embeddings' = 1", ">= 2"],
        ),
    ],
)
def test_schema_errors_name_key_value_and_allowed(tmp_path, columns, events, tables, expected):
    msg = _bad_schema(tmp_path, columns, events=events, tables=tables)
    for part in expected:
        assert part in msg, (part, msg)


def test_split_and_path_errors(tmp_path):
    msg = _bad_schema(tmp_path, LABEL, extra="    split: time\n    eval_from: 10\n    test_from: 20\n")
    assert "'data.files.paths' = []" in msg and "split=time reads the whole data set" in msg
    msg = _bad_schema(tmp_path, LABEL, extra=f"    split: time\n    paths: {tmp_path}\n    eval_from: 10\n    test_from: 20\n")
    assert "'data.files.train'" in msg and "empty with split=time" in msg
    msg = _bad_schema(tmp_path, LABEL, extra="    id_mapping: vocab\n")
    assert "'data.files.vocab_dir' = None" in msg and "kunlun data vocab" in msg
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path / "bad.yaml"), ["data.files.id_mapping=hash", f"data.files.train={tmp_path}/nothing*.parquet"])
    assert "command line: config key 'data.files.train'" in str(ei.value) and "nothing*.parquet" in str(ei.value) and "matching files" in str(ei.value)
    time_split = [
        "data.files.id_mapping=hash",
        "data.files.split=time",
        "data.files.train=[]",
        "data.files.eval=[]",
        "data.files.test=[]",
        f"data.files.paths={tmp_path}/train.parquet",
        "data.files.eval_from=5",
        "data.files.test_from=9",
    ]
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path / "bad.yaml"), time_split)
    assert "'data.files.split' = 'time'" in str(ei.value) and "request_time" in str(ei.value)


def test_list_elements_can_be_overridden_on_the_command_line(dataset):
    root, _, _ = dataset
    cfg = _cfg(root / "job.yaml", ["data.files.schema.tables[1].num_embeddings=777", "data.files.schema.events[0].max_len=3"])
    assert cfg.data.files.schema.tables[1].num_embeddings == 777
    src = FileSource(cfg.data, validate=False)
    assert src.schema.table_sizes["item"] == 777 and src.schema.event_types[0].max_len == 3
    with pytest.raises(ConfigError) as ei:
        _cfg(root / "job.yaml", ["data.files.schema.tables[0].rows=5"])
    assert "'data.files.schema.tables[0].rows'" in str(ei.value) and "num_embeddings" in str(ei.value)


# ================================================================== malformed files
MINI = """
data:
  source: {source}
  files:
    train: {train}
    eval: {good}
    test: {good}
    csv: {{rows_per_block: 4}}
    schema:
      tables: [{{name: item, num_embeddings: 100}}, {{name: cat, num_embeddings: 4, id_mapping: identity}}]
      events: [{{name: click, max_len: 5}}]
      columns:
        - {{name: label, role: label, dtype: int64}}
        - {{name: item_id, role: categorical, dtype: string, table: item}}
        - {{name: cat, role: categorical, dtype: int64, table: cat}}
        - {{name: price, role: dense, dtype: float32}}
        - {{name: clicks, role: sequence, dtype: list<string>, event: click, table: item}}
        - {{name: click_cats, role: sequence, dtype: list<int64>, event: click, attribute: action, table: cat}}
"""

GOOD: Dict[str, pa.Array] = {
    "label": pa.array([1, 0, 1, 0, 1, 0], pa.int64()),
    "item_id": pa.array(["a", "b", "c", "d", "e", "f"]),
    "cat": pa.array([0, 1, 2, 3, 0, 1], pa.int64()),
    "price": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    "clicks": pa.array([["a"], [], ["b", "c"], ["d"], [], ["e"]]),
    "click_cats": pa.array([[1], [], [2, 3], [0], [], [1]], pa.list_(pa.int64())),
}


def _mini(
    tmp_path: Path,
    train: Dict[str, pa.Array] = None,
    source: str = "parquet",
    policy: str = "error",
    train_file: Path = None,
    validate=None,
    delimiter: str = ",",
):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table(GOOD), good)
    if train_file is None:
        train_file = tmp_path / "train.parquet"
        pq.write_table(pa.table(train), train_file, row_group_size=3)
    if source == "csv":
        good = tmp_path / "good.csv"
        good.write_text(csv_text({k: v.to_pylist() for k, v in GOOD.items()}, list(GOOD), delimiter=delimiter))
    p = tmp_path / "mini.yaml"
    p.write_text(MINI.format(source=source, train=train_file, good=good).replace("rows_per_block: 4}", f'rows_per_block: 4, delimiter: "{delimiter}"}}'))
    cfg = load_config(str(p), [f"data.bad_row_policy={policy}"])
    return FileSource(cfg.data, validate=validate)


def _replace(**cols) -> Dict[str, pa.Array]:
    out = dict(GOOD)
    out.update(cols)
    return {k: v for k, v in out.items() if v is not None}


def _data_error(fn) -> str:
    with pytest.raises(DataError) as ei:
        fn()
    return str(ei.value)


def test_missing_column_names_file_and_column(tmp_path):
    msg = _data_error(lambda: _mini(tmp_path, _replace(price=None)))
    assert str(tmp_path / "train.parquet") in msg and "column 'price' not found" in msg and "'item_id'" in msg


def test_wrong_type_names_file_row_column_and_value(tmp_path):
    msg = _data_error(lambda: _mini(tmp_path, _replace(price=pa.array([None, "abc", "1", "2", "3", "4"]))))
    assert f"{tmp_path / 'train.parquet'}: row 1: column 'price' = 'abc': expected a number (float32)" in msg
    assert "type string" in msg


def test_list_column_that_is_not_a_list(tmp_path):
    msg = _data_error(lambda: _mini(tmp_path, _replace(clicks=pa.array(["a", "b", "c", "d", "e", "f"]))))
    assert f"{tmp_path / 'train.parquet'}: row 0: column 'clicks' = 'a': expected a list of string (list<string>)" in msg
    assert "not a list" in msg


def test_ids_that_do_not_hash(tmp_path):
    # float ids in Parquet
    msg = _data_error(lambda: _mini(tmp_path, _replace(item_id=pa.array([1.5, 2.0, 3.0, 4.0, 5.0, 6.0]))))
    assert f"{tmp_path / 'train.parquet'}: row 0: column 'item_id' = 1.5: expected a string" in msg
    # an integer id that is not an integer in a CSV (line 4 = header + 3rd row)
    cols = {k: v.to_pylist() for k, v in GOOD.items()}
    cols["cat"][2] = "2x"
    bad = tmp_path / "train.csv"
    bad.write_text(csv_text(cols, list(cols)))
    msg = _data_error(lambda: _mini(tmp_path, source="csv", train_file=bad))
    assert f"{bad}:4: column 'cat' = '2x': expected an integer (int64)" in msg
    # an identity id outside its table (row 4 of the file: 2nd row group)
    msg = _data_error(lambda: _mini(tmp_path, _replace(cat=pa.array([0, 1, 2, 3, 9, 1], pa.int64()))))
    assert f"{tmp_path / 'train.parquet'}: row 4: column 'cat' = 9: expected an id in [0, 4)" in msg and "id_policy=modulo" in msg


def test_empty_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert f"{empty}: empty file (0 bytes)" in _data_error(lambda: _mini(tmp_path, train_file=empty))
    no_rows = tmp_path / "norows.parquet"
    pq.write_table(pa.table(GOOD).slice(0, 0), no_rows)
    assert f"{no_rows}: empty file (0 rows)" in _data_error(lambda: _mini(tmp_path, train_file=no_rows))
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(GOOD) + "\n")
    assert f"{header_only}: empty file (no data rows after the header)" in _data_error(lambda: _mini(tmp_path, source="csv", train_file=header_only))
    zero = tmp_path / "zero.csv"
    zero.write_text("")
    assert f"{zero}: empty file (0 bytes)" in _data_error(lambda: _mini(tmp_path, source="csv", train_file=zero))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    assert f"{garbage}: not a readable Parquet file" in _data_error(lambda: _mini(tmp_path, train_file=garbage))


def test_csv_row_with_wrong_field_count_and_missing_header_column(tmp_path):
    cols = {k: v.to_pylist() for k, v in GOOD.items()}
    text = csv_text(cols, list(cols)).splitlines()
    text[5] = "1,e,0"  # line 6
    bad = tmp_path / "fields.csv"
    bad.write_text("\n".join(text) + "\n")
    msg = _data_error(lambda: _mini(tmp_path, source="csv", train_file=bad))
    assert f"{bad}:6: row has 3 fields: expected 6" in msg
    nohead = tmp_path / "nohead.csv"
    nohead.write_text(csv_text(cols, list(cols)).replace("price", "cost", 1))
    msg = _data_error(lambda: _mini(tmp_path, source="csv", train_file=nohead))
    assert f"{nohead}:1: column 'price' not in the header" in msg and "'cost'" in msg


def test_bad_values_stop_before_training_not_mid_epoch(tmp_path):
    # a null label and a sequence attribute of the wrong length, both in the last row group
    train = _replace(label=pa.array([1, 0, 1, 0, None, 0], pa.int64()))
    msg = _data_error(lambda: _mini(tmp_path, train))  # at construction: validate=true
    assert f"{tmp_path / 'train.parquet'}: row 4: column 'label' = None: expected a label" in msg
    train = _replace(click_cats=pa.array([[1], [], [2, 3], [0], [], [1, 2]], pa.list_(pa.int64())))
    msg = _data_error(lambda: _mini(tmp_path, train))
    assert f"{tmp_path / 'train.parquet'}: row 5: column 'click_cats' = [1, 2]: expected a list as long as 'clicks' (1 events)" in msg
    # with validation off, the same rows fail with a DataError when a batch reaches them
    src = _mini(tmp_path, train, validate=False)
    src.read("train", np.arange(3))  # the first row group is fine
    assert "row 5: column 'click_cats'" in _data_error(lambda: src.read("train", np.arange(6)))


def test_skip_policy_keeps_positions_with_weight_zero(tmp_path):
    train = _replace(label=pa.array([1, None, 1, 0, 1, 7], pa.int64()), price=pa.array([1.0, 2.0, float("inf"), 4.0, 5.0, 6.0]))
    src = _mini(tmp_path, train, policy="skip")
    assert src.bad_rows == 3 and src.num_examples("train") == 6
    b = src.read("train", np.arange(6))
    assert b.weights.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert b.labels[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    batch = ShardedBatches(src, "train", 6, shuffle=False).batch(0)
    assert batch.weights.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_training_on_a_malformed_file_exits_2_with_the_location(tmp_path):
    src_file = tmp_path / "train.parquet"
    pq.write_table(pa.table(_replace(price=pa.array(["1", "2", "3", "4", "5", "x"]))), src_file)
    pq.write_table(pa.table(GOOD), tmp_path / "good.parquet")
    (tmp_path / "mini.yaml").write_text(MINI.format(source="parquet", train=src_file, good=tmp_path / "good.parquet"))
    proc = subprocess.run(
        [sys.executable, "-m", "kunlun.launch.main", "--config", str(tmp_path / "mini.yaml"), f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2"],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"kunlun: error: {src_file}: row 0: column 'price' = '1': expected a number (float32)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataloader_workers_read_the_same_batches(dataset):
    from kunlun.data.loader import make_loader

    root, _, _ = dataset
    src = FileSource(_cfg(root / "job.yaml", ["data.files.validate=false"]).data)
    kw = dict(global_batch_size=64, rank=1, world_size=2, seed=3, max_batches=6)
    ref = [b.request_time.tolist() + b.context.values().tolist() for b in make_loader(ShardedBatches(src, "train", **kw), num_workers=0)]
    got = [b.request_time.tolist() + b.context.values().tolist() for b in make_loader(ShardedBatches(src, "train", **kw), num_workers=2)]
    assert len(ref) == 6 and got == ref


def _zero_id_warnings(caplog) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kunlun.data" and r.levelno == logging.WARNING and "equal to 0" in r.getMessage()]


def test_identity_id_zero_is_warned_at_start(tmp_path, caplog, monkeypatch):
    """Row 0 of every table is 'missing': a real identity id 0 silently shares it with nulls."""
    monkeypatch.setattr(logging.getLogger("kunlun"), "propagate", True)  # a trainer run in this process may have turned it off
    caplog.set_level(logging.WARNING, logger="kunlun.data")
    # validate=true: one warning per column after the pass, with the count over every row
    # (train.parquet and good.parquet each hold GOOD: cat has two 0s, click_cats one)
    _mini(tmp_path, _replace())
    got = _zero_id_warnings(caplog)
    assert len(got) == 2
    assert "table 'cat' (id_mapping=identity): column 'cat' has 4 ids equal to 0" in got[0] and "counted over all 12 rows" in got[0]
    assert "column 'click_cats' has 2 ids equal to 0" in got[1]
    assert "row 0 is reserved for missing" in got[0] and "Shift the ids by one" in got[0] and "hash or vocab" in got[0]
    # validation off: at the first chunk that shows them, once per column; nulls are missing ids, not id 0
    caplog.clear()
    src = _mini(tmp_path, _replace(cat=pa.array([None, 1, 2, 3, 0, 1], pa.int64())), validate=False)
    assert _zero_id_warnings(caplog) == []
    src.read("train", np.arange(3))  # row group 0: a null cat, no 0
    assert _zero_id_warnings(caplog) == []
    src.read("train", np.arange(6))  # row group 1: cat 0 in row 4, click_cats [0] in row 3
    got = _zero_id_warnings(caplog)
    assert len(got) == 2 and all(f"first in the chunk starting at {tmp_path / 'train.parquet'}: row 3;" in g for g in got)
    assert "column 'cat' has 1 ids equal to 0" in got[0] and "column 'click_cats' has 1 ids" in got[1]
    src.read("eval", np.arange(6))
    assert len(_zero_id_warnings(caplog)) == 2  # once per column


# ====================================================================== FLOPs sample
def test_average_sequence_lengths_spread_over_a_time_sorted_split(tmp_path):
    """Histories grow with time and files are often time-sorted: the mean history length
    for FLOPs accounting must come from the whole split, reading only a few chunks."""
    from kunlun.trainer.perf import average_sequence_lengths

    n, max_len = 40_000, 50
    lengths = np.arange(n) * 40 // n  # 0 .. 39 events, growing with the row
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    hist = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.arange(offsets[-1]) % 1000, pa.int64()))
    table = pa.table({"label": pa.array(np.arange(n) % 2, pa.int64()), "hist": hist})
    job = _same_table_job(
        tmp_path,
        table,
        f"""
      events: [{{name: view, max_len: {max_len}}}]
      columns:
        - {{name: label, role: label, dtype: int64}}
        - {{name: hist, role: sequence, dtype: list<int64>, event: view, table: item}}
""",
        row_group_size=200,
    )
    true_mean = float(np.minimum(lengths, max_len).mean())
    for seed in range(3):
        src = FileSource(_cfg(job).data, validate=False)
        got = average_sequence_lengths(src, seed=seed)["view"]
        assert abs(got - true_mean) < 0.015 * true_mean, (seed, got, true_mean)
        assert len(src._bad_by_chunk) <= 2 * 32 < len(src.chunks) // 3  # decoded chunks: ~2 per window, not all 600
        # one 4,096-row window at a random offset (the former sample) would miss that tolerance
        start = int(np.random.default_rng(seed).integers(0, n - 4096 + 1))
        assert abs(lengths[start : start + 4096].mean() - true_mean) > 0.015 * true_mean
