"""``kunlun data inspect | vocab | convert`` on data sets written here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import BIN, REPO, job_env
from kunlun.data.ids import fnv1a64_reference
from kunlun.data.sources.files import FileSource
from kunlun.launch.data_cli import main as data_main
from kunlun.trainer.config import load_config
from own_data import csv_text, csv_yaml, make_rows, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    files = write_dataset(root, train_rows=2400, eval_rows=400, test_rows=400, train_files=2, row_group_size=500)
    raw = {s: pa.concat_tables([pq.read_table(p) for p in ps]) for s, ps in files.items()}
    return root, raw


def _col(raw, split, name):
    return raw[split].column(name).to_pylist()


def test_inspect_reports_counts_rates_lengths_cardinalities_and_nulls(dataset, tmp_path, capsys):
    root, raw = dataset
    out_json = tmp_path / "report.json"
    assert data_main(["inspect", "--config", str(root / "job.yaml"), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    for split, n in (("train", 2400), ("eval", 400), ("test", 400)):
        s = rep["splits"][split]
        labels = _col(raw, split, "clicked")
        assert s["rows"] == n and s["bad_rows"] == 0
        assert s["label_rate"]["clicked"] == pytest.approx(np.mean(labels), abs=1e-9)
        assert s["request_time"] == [min(_col(raw, split, "ts")), max(_col(raw, split, "ts"))]
        assert f"{n:,}" in text and f"{np.mean(labels):.4f}" in text
    assert rep["splits"]["train"]["files"] == 2 and rep["splits"]["train"]["chunks"] == 6
    every = {k: sum((_col(raw, s, k) for s in ("train", "eval", "test")), []) for k in raw["train"].column_names}
    c = rep["columns"]
    assert c["price"]["nulls"] == sum(v is None for v in every["price"]) > 0
    assert c["age"]["nulls"] == sum(v is None for v in every["age"]) > 0
    assert c["user_id"]["distinct_ids"] == len(set(every["user_id"]))
    assert c["tags"]["distinct_ids"] == len({t for ts in every["tags"] for t in ts})
    assert c["age"]["min"] == min(v for v in every["age"] if v is not None)
    lengths = np.array([len(x) for x in every["click_items"]])
    ev = rep["events"]["click"]
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        assert ev[key] == int(np.quantile(lengths, q, method="inverted_cdf"))
    assert ev["max"] == lengths.max() == 20 and ev["truncated"] == 0.0 and ev["at_or_after_request"] == 0
    assert rep["events"]["purchase"]["at_or_after_request"] is None  # no timestamp column
    items = set(every["item_id"]) | {x for k in ("click_items", "buy_items") for xs in every[k] for x in xs}
    t = rep["tables"]["item"]
    per_row = Counter(1 + fnv1a64_reference(str(i)) % 1999 for i in items)
    colliding = sum(c for c in per_row.values() if c > 1)  # ids sharing their row with another id
    assert (t["distinct_ids"], t["rows_used"], t["colliding_ids"]) == (len(items), len(per_row), colliding)
    assert t["collision_rate"] == pytest.approx(colliding / len(items)) and t["suggested_rows"] >= 99 * len(items)
    # identity ids equal to 0 share row 0 with missing ids: counted per table, warned per column
    zeros = {k: sum(x == 0 for v in every[k] for x in (v if isinstance(v, list) else [v])) for k in ("item_cat", "click_cats", "buy_cats")}
    assert min(zeros.values()) > 0
    assert rep["tables"]["category"] == {"id_mapping": "identity", "rows": 8, "distinct_ids": 8, "rows_used": 8, "zero_ids": sum(zeros.values())}
    for column, count in zeros.items():
        line = f"table 'category' (id_mapping=identity): column {column!r} has {count:,} ids equal to 0"
        assert any(w.startswith(line) for w in rep["warnings"]) and f"WARNING: {line}" in text
    for header in ("splits", "columns", "sequence lengths (before truncation)", "tables", "click_items", "colliding ids", "suggested rows", "id 0"):
        assert header in text


def test_inspect_reports_hash_collisions_and_suggests_a_table_size(tmp_path, capsys):
    """16,500 users hashed into 40,000 rows: a third of them share a row (a real job lost ~0.01 AUC)."""
    n = 16_500
    users = [f"user{i}" for i in range(n)]
    table = pa.table({"y": pa.array(np.arange(n) % 2, pa.int64()), "user": pa.array(users), "item": pa.array([f"i{i % 50}" for i in range(n)])})
    for s in ("train", "eval", "test"):
        pq.write_table(table, tmp_path / f"{s}.parquet")
    (tmp_path / "j.yaml").write_text(
        f"data:\n  source: parquet\n  files:\n    train: {tmp_path}/train.parquet\n    eval: {tmp_path}/eval.parquet\n"
        f"    test: {tmp_path}/test.parquet\n    schema:\n      tables: [{{name: user, num_embeddings: 40000}}, {{name: item, num_embeddings: 1000000}}]\n"
        "      columns:\n        - {name: y, role: label, dtype: int64}\n"
        "        - {name: user, role: categorical, dtype: string, table: user}\n        - {name: item, role: categorical, dtype: string, table: item}\n"
    )
    out_json = tmp_path / "report.json"
    assert data_main(["inspect", "--config", str(tmp_path / "j.yaml"), "--split", "train", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    per_row = Counter(1 + fnv1a64_reference(u) % 39_999 for u in users)
    colliding = sum(c for c in per_row.values() if c > 1)
    user = rep["tables"]["user"]
    assert (user["distinct_ids"], user["colliding_ids"]) == (n, colliding)
    assert user["collision_rate"] == pytest.approx(colliding / n) and 0.3 < user["collision_rate"] < 0.37  # 1 - exp(-16499/39999) = 0.34
    # the smallest 2-significant-digit size with an expected share under 1%: 1 - exp(-(n-1)/(rows-1))
    assert user["suggested_rows"] == 1_700_000
    assert 1 - np.exp(-(n - 1) / (1_700_000 - 1)) < 0.01 < 1 - np.exp(-(n - 1) / (1_600_000 - 1))
    warning = (
        f"table 'user': {user['collision_rate']:.1%} of its 16,500 distinct ids share an embedding row with another id "
        "(id_mapping=hash, num_embeddings=40,000); set num_embeddings: 1,700,000"
    )
    assert [w for w in rep["warnings"] if w.startswith(warning)] == rep["warnings"] and "kunlun data vocab" in rep["warnings"][0]
    assert f"WARNING: {warning}" in text
    # 50 ids in a million rows: no collisions, no warning, a small suggestion
    assert rep["tables"]["item"]["colliding_ids"] == 0 and rep["tables"]["item"]["suggested_rows"] == 4_900
    row = next(line.split() for line in text.split("\ntables\n")[1].splitlines() if line.startswith("user "))
    assert row[1:] == ["hash", "40,000", "16,500", f"{len(per_row):,}", f"{colliding:,}", f"{100 * colliding / n:.1f}%", "1,700,000", "-", "-"]


def test_console_script_and_module_entry_points(dataset):
    root, _ = dataset
    proc = subprocess.run(
        [str(BIN / "kunlun"), "data", "inspect", "--config", str(root / "job.yaml"), "--split", "eval"],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.split("columns")[0].splitlines() if line.startswith(("train", "eval", "test"))]
    assert [r[:4] for r in rows] == [["eval", "1", "1", "400"]]
    proc = subprocess.run(
        [sys.executable, "-m", "kunlun.launch.data_cli", "inspect", "--help"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--config" in proc.stdout and "--json" in proc.stdout


def test_cli_errors_exit_2_with_the_key_and_value(dataset, capsys):
    root, _ = dataset
    assert data_main(["inspect", "--config", str(root / "job.yaml"), "data.files.train=/no/such/*.parquet"]) == 2
    err = capsys.readouterr().err
    assert "kunlun data: error: command line: config key 'data.files.train' = '/no/such/*.parquet'" in err
    assert data_main(["inspect", "--config", "tiny"]) == 2
    assert "'data.source' = 'synthetic'" in capsys.readouterr().err


def test_vocab_builds_from_train_only_and_training_maps_through_it(dataset, tmp_path, capsys):
    root, raw = dataset
    vocab_dir = tmp_path / "vocab"
    job = (
        (root / "job.yaml")
        .read_text()
        .replace("        - {name: item, num_embeddings: 2000}", "        - {name: item, id_mapping: vocab}")
        .replace("    shuffle_window: 4\n", f"    shuffle_window: 4\n    vocab_dir: {vocab_dir}\n    vocab_min_count: 3\n    oov_buckets: 2\n")
    )
    (tmp_path / "vocab.yaml").write_text(job)
    cfg = load_config(str(tmp_path / "vocab.yaml"))
    from kunlun.data.errors import DataError

    with pytest.raises(DataError, match="kunlun data vocab"):
        FileSource(cfg.data)
    assert data_main(["vocab", "--config", str(tmp_path / "vocab.yaml")]) == 0
    assert "item" in capsys.readouterr().out
    counts = Counter(_col(raw, "train", "item_id"))
    for k in ("click_items", "buy_items"):
        counts.update(x for xs in _col(raw, "train", k) for x in xs)
    kept = sorted(((str(i), c) for i, c in counts.items() if c >= 3), key=lambda ic: (-ic[1], ic[0]))
    vocab = pq.read_table(vocab_dir / "item.vocab.parquet")
    assert list(zip(vocab.column("id").to_pylist(), vocab.column("count").to_pylist())) == kept
    meta = json.loads((vocab_dir / "vocab.json").read_text())["tables"]["item"]
    assert meta["entries"] == len(kept) and meta["num_embeddings"] == 3 + len(kept) and meta["min_count"] == 3

    src = FileSource(cfg.data)
    assert src.schema.table_sizes["item"] == 3 + len(kept)
    order = {i: k for k, (i, _) in enumerate(kept)}
    block = src.read("test", np.arange(400))
    for raw_id, row in zip(_col(raw, "test", "item_id"), block.context["item_id"].values):
        expected = 3 + order[str(raw_id)] if str(raw_id) in order else 1 + fnv1a64_reference(str(raw_id)) % 2
        assert row == expected


def test_convert_csv_to_parquet_keeps_every_example(tmp_path, capsys):
    for split, n, seed in (("train", 600, 1), ("eval", 150, 2), ("test", 150, 3)):
        cols = make_rows(n, seed)
        (tmp_path / f"{split}.csv").write_text(csv_text(cols, [c for c in cols if c != "affinity"]))
    (tmp_path / "c.yaml").write_text(csv_yaml(tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "test.csv", rows_per_block=200))
    out = tmp_path / "pq"
    assert data_main(["convert", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--row-group-size", "128"]) == 0
    assert "converted 900 rows into 3 Parquet files" in capsys.readouterr().out
    pf = pq.ParquetFile(out / "train" / "train.parquet")
    assert pf.metadata.num_rows == 600 and pf.metadata.num_row_groups == 6  # 3 blocks of 200 → groups of 128 + 72
    assert pf.schema_arrow.field("click_items").type == pa.list_(pa.int64()) and "notes" not in pf.schema_arrow.names
    c = FileSource(load_config(str(tmp_path / "c.yaml")).data)
    p = FileSource(load_config(str(out / "job.yaml")).data)
    assert p.source == "parquet"
    for split in ("train", "eval", "test"):
        idx = np.arange(c.num_examples(split))
        a, b = c.read(split, idx), p.read(split, idx)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6)
        for k in a.context:
            np.testing.assert_array_equal(a.context[k].values, b.context[k].values)
        for k in a.events:
            np.testing.assert_array_equal(a.events[k].items, b.events[k].items)
            np.testing.assert_array_equal(a.events[k].timestamps, b.events[k].timestamps)


def test_convert_reports_bad_rows_with_line_or_drops_them(tmp_path, capsys):
    cols = make_rows(50, 4)
    names = [c for c in cols if c != "affinity"]
    lines = csv_text(cols, names).splitlines()
    lines[10] = lines[10].replace(lines[10].split(",")[0] + ",", "maybe,", 1)  # line 11: label 'maybe'
    for s in ("train", "eval", "test"):
        (tmp_path / f"{s}.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "c.yaml").write_text(csv_yaml(tmp_path / "train.csv", tmp_path / "eval.csv", tmp_path / "test.csv"))
    assert data_main(["convert", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.csv'}:11: column 'clicked' = 'maybe': expected an integer (int64)" in err
    assert data_main(["convert", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "data.bad_row_policy=skip"]) == 0
    assert "147 rows" in capsys.readouterr().out and pq.ParquetFile(tmp_path / "o" / "train" / "train.parquet").metadata.num_rows == 49


def test_kunlun_command_dispatches_subcommands(dataset, capsys):
    from kunlun.launch.cli import main as kunlun_main

    root, _ = dataset
    assert kunlun_main([]) == 2 and "kunlun data inspect" in capsys.readouterr().out
    assert kunlun_main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert kunlun_main(["data", "inspect", "--config", str(root / "job.yaml"), "--split", "test"]) == 0
    assert "400" in capsys.readouterr().out
