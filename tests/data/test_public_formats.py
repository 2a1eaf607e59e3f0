"""The two public formats through their presets, on small files in those formats written here
(the real data sets are not reachable from CI): Criteo TSV (``configs/criteo.yaml``) and the
TaobaoAd-style CSV of FuxiCTR/BARS (``configs/taobao_ad.yaml``)."""

from __future__ import annotations

import calendar
import math

import numpy as np
import pytest
import torch

from kunlun.data.ids import fnv1a64_reference
from kunlun.data.loader import ShardedBatches
from kunlun.data.sources import build_source
from kunlun.model.embeddings import ec_context_features
from kunlun.model.rec_model import RecModel
from kunlun.trainer.config import load_config

TINY_MODEL = ["model.embedding_dim=8", "model.dlrm.bottom_mlp=[16]", "model.dlrm.top_mlp=[16]"]


def _row(raw: str, n: int) -> int:
    return 0 if raw == "" else 1 + fnv1a64_reference(raw) % (n - 1)


def _train_step(src, model_cfg):
    torch.manual_seed(0)
    model = RecModel(src.schema, model_cfg, embedding_device=torch.device("cpu"))
    batch = ShardedBatches(src, "train", 64, seed=0).batch(0)
    loss, out = model(batch)
    logits = out.logits
    assert logits.shape == (64, 1) and torch.isfinite(loss)
    loss.backward()
    return model


# ------------------------------------------------------------------------- Criteo
def _criteo_lines(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(int(rng.random() < 0.25))
        ints = ["" if rng.random() < 0.15 else str(int(rng.integers(-3, 5000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)) % (40 + 7 * j):08x}" for j in range(26)]
        rows.append([label, *ints, *cats])
    return rows


def test_criteo_tsv_preset(tmp_path):
    rows = _criteo_lines(600)
    path = tmp_path / "train.txt"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    cfg = load_config(
        "criteo",
        [f"data.files.paths={path}", "data.files.default_num_embeddings=1000", "data.files.csv.rows_per_block=256", "data.files.validate=true", *TINY_MODEL],
    )
    src = build_source(cfg.data, 0)
    s = src.schema
    assert s.dense_features == [f"I{i}" for i in range(1, 14)] and s.context_keys == [f"C{i}" for i in range(1, 27)]
    assert s.event_types == [] and s.labels == ["label"] and set(s.table_sizes.values()) == {1000}
    # split=rows: the last 1/14 is test, the 1/14 before validation (the file is in time order)
    assert {k: src.num_examples(k) for k in ("train", "eval", "test")} == {"train": 514, "eval": 43, "test": 43}
    test = src.read("test", np.arange(43))
    for j, r in enumerate(rows[557:]):
        assert test.labels[j, 0] == float(r[0])
        expect_dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in r[1:14]]
        np.testing.assert_allclose(test.dense[j], expect_dense, rtol=1e-6)
        assert [int(test.context[f"C{k}"].values[j]) for k in range(1, 27)] == [_row(x, 1000) for x in r[14:]]
    _train_step(src, cfg.model)


def test_criteo_bad_line_is_located(tmp_path):
    rows = _criteo_lines(30)
    rows[20] = rows[20][:30]  # a truncated line: 30 fields instead of 40
    path = tmp_path / "day_0"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    from kunlun.data.errors import DataError

    cfg = load_config("criteo", [f"data.files.paths={path}", "data.files.validate=true"])
    with pytest.raises(DataError) as ei:
        build_source(cfg.data, 0)
    assert f"{path}:21: row has 30 fields: expected 40 separated by '\\t'" in str(ei.value)


# ---------------------------------------------------------------------- TaobaoAd
TAOBAO_HEADER = (
    "clk,time_stamp,userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,price,cms_segid,cms_group_id,"
    "final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level,click_sequence"
)


def _taobao_rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        day, hour, minute = 6 + i % 7, int(rng.integers(0, 24)), int(rng.integers(0, 60))
        seq = [str(int(rng.integers(100000, 100050))) for _ in range(int(rng.integers(0, 5)))]
        out.append(
            [
                str(int(rng.random() < 0.1)),
                f"2017/5/{day} {hour}:{minute:02d}",
                str(int(rng.integers(1, 2000))),
                str(int(rng.integers(100000, 100050))),
                ["430548_1007", "430539_1007"][i % 2],
                str(int(rng.integers(1, 9000))),
                str(int(rng.integers(1, 400000))),
                str(int(rng.integers(1, 250000))),
                "" if rng.random() < 0.2 else str(int(rng.integers(1, 450000))),
                f"{rng.gamma(2.0, 50.0):.2f}",
                str(int(rng.integers(0, 90))),
                str(int(rng.integers(0, 12))),
                str(int(rng.integers(1, 3))),
                str(int(rng.integers(0, 7))),
                "" if rng.random() < 0.5 else str(int(rng.integers(1, 4))),
                str(int(rng.integers(1, 4))),
                str(int(rng.integers(0, 2))),
                "" if rng.random() < 0.3 else str(int(rng.integers(1, 5))),
                "^".join(seq),
            ]
        )
    return out


def test_taobao_ad_csv_preset(tmp_path):
    data = {}
    for split, n, seed in (("train", 300, 1), ("valid", 80, 2), ("test", 80, 3)):
        data[split] = _taobao_rows(n, seed)
        (tmp_path / f"{split}.csv").write_text(TAOBAO_HEADER + "\n" + "\n".join(",".join(r) for r in data[split]) + "\n")
    small = [f"data.files.schema.tables[{i}].num_embeddings=5000" for i in (0, 1, 3, 4, 5, 6)]
    cfg = load_config(
        "taobao_ad",
        [
            f"data.files.train={tmp_path}/train.csv",
            f"data.files.eval={tmp_path}/valid.csv",
            f"data.files.test={tmp_path}/test.csv",
            "data.files.csv.rows_per_block=100",
            *small,
            *TINY_MODEL,
        ],
    )
    src = build_source(cfg.data, 0)
    s = src.schema
    assert [(e.name, e.item_table, e.max_len) for e in s.event_types] == [("click", "adgroup", 50)]
    assert "adgroup_id" in [f.name for f in ec_context_features(s)]  # the target ad shares the table with the clicks
    assert {k: src.num_examples(k) for k in ("train", "eval", "test")} == {"train": 300, "eval": 80, "test": 80}
    b = src.read("eval", np.arange(80))
    rows = data["valid"]
    for j, r in enumerate(rows):
        date, clock = r[1].split(" ")
        y, mo, d = (int(x) for x in date.split("/"))
        h, mi = (int(x) for x in clock.split(":"))
        assert b.request_time[j] == calendar.timegm((y, mo, d, h, mi, 0))
        assert b.labels[j, 0] == float(r[0])
        assert b.context["adgroup_id"].values[j] == _row(r[3], 5000)
        assert b.context["pid"].values[j] == _row(r[4], 16)
        assert b.context["pvalue_level"].values[j] == _row(r[14], 8)  # empty → row 0
        assert b.dense[j, 0] == pytest.approx(math.log1p(float(r[9])), rel=1e-6)
    seqs = [r[18].split("^") if r[18] else [] for r in rows]
    ev = b.events["click"]
    assert ev.lengths.tolist() == [len(x) for x in seqs]
    assert ev.items.tolist() == [_row(x, 5000) for xs in seqs for x in xs]
    assert ev.timestamps.tolist() == [int(t) for t, xs in zip(b.request_time, seqs) for _ in xs]  # no event times: the request time
    model = _train_step(src, cfg.model)
    assert "adgroup_id" in model.ec.embedding_configs()[0].feature_names
