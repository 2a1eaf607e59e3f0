"""Test helpers (importable as ``own_data``): a user's Parquet data set with a YAML schema.

The data set: users (string ids) and items with large integer ids (category = item % 8).
Each example draws its own two interest categories out of 8 (afresh per example: neither the
user nor anything else outside the histories knows them), then two event types of history,
``click`` (0-20 events, 80% from the interest categories) and ``purchase`` (0-6, 90%), each
event with its item, an action (the item's category) and a timestamp, and a target item (50%
from an interest category, else any item); ``label ~ Bernoulli(sigmoid(3 * (affinity - 0.6)))``
with ``affinity`` = share of clicks in the target's category + 2 x share of purchases in it.
So the label depends on the target *and* the histories together: the user, the target (its id
or category), tags, price and age are each independent of it (every category plays the same
part), and only matching the target against the histories predicts it. The item table is
shared by the target item and both histories, the category table by the target's category
and every event's action.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

NUM_USERS = 300
NUM_ITEMS = 400
NUM_CATS = 8
ITEM_ID_BASE = 10**12  # raw item ids are large integers
T0 = 1_700_000_000

SCHEMA_YAML = """\
data:
  source: parquet
  batch_size: 128
  eval_batch_size: 512
  files:
    train: {train}
    eval: {eval}
    test: {test}
    shuffle_window: 4
    schema:
      tables:
        - {{name: user, num_embeddings: 1000}}
        - {{name: item, num_embeddings: 2000}}
        - {{name: category, num_embeddings: 8, id_mapping: identity}}
        - {{name: tag, num_embeddings: 64}}
      events:
        - {{name: click, max_len: 20}}
        - {{name: purchase, max_len: 8}}
      columns:
        - {{name: clicked, role: label, dtype: int64}}
        - {{name: ts, role: request_time, dtype: int64}}
        - {{name: user_id, role: categorical, dtype: string, table: user}}
        - {{name: item_id, role: categorical, dtype: int64, table: item}}
        - {{name: item_cat, role: categorical, dtype: int64, table: category}}
        - {{name: tags, role: categorical, dtype: list<string>, table: tag, max_ids: 3}}
        - {{name: price, role: dense, dtype: float32, transform: log1p}}
        - {{name: age, role: dense, dtype: int64, fill: 30, transform: log1p}}
        - {{name: click_items, role: sequence, dtype: list<int64>, event: click, attribute: item, table: item}}
        - {{name: click_cats, role: sequence, dtype: list<int64>, event: click, attribute: action, table: category}}
        - {{name: click_ts, role: sequence, dtype: list<int64>, event: click, attribute: timestamp}}
        - {{name: buy_items, role: sequence, dtype: list<int64>, event: purchase, attribute: item, table: item}}
        - {{name: buy_cats, role: sequence, dtype: list<int64>, event: purchase, attribute: action, table: category}}
        - {{name: notes, role: ignore}}
"""


def make_rows(n: int, seed: int, t_start: int = T0) -> Dict[str, list]:
    """``n`` examples as Python columns (lists; list columns as lists of lists)."""
    rng = np.random.default_rng(seed)
    per_cat = NUM_ITEMS // NUM_CATS

    def item_in(cat):
        return int(cat + NUM_CATS * rng.integers(0, per_cat))

    cols: Dict[str, list] = {
        k: []
        for k in (
            "clicked",
            "ts",
            "user_id",
            "item_id",
            "item_cat",
            "tags",
            "price",
            "age",
            "click_items",
            "click_cats",
            "click_ts",
            "buy_items",
            "buy_cats",
            "notes",
            "affinity",
        )
    }
    for i in range(n):
        u = int(rng.integers(0, NUM_USERS))
        ts = t_start + 60 * i
        fav = rng.choice(NUM_CATS, size=2, replace=False)  # this example's interests: not the user's
        hist = {}
        for name, max_len, p_fav in (("click", 20, 0.8), ("buy", 6, 0.9)):
            length = int(rng.integers(0, max_len + 1))
            items = [item_in(fav[rng.integers(0, 2)]) if rng.random() < p_fav else int(rng.integers(0, NUM_ITEMS)) for _ in range(length)]
            hist[name] = items
        target = item_in(fav[rng.integers(0, 2)]) if rng.random() < 0.5 else int(rng.integers(0, NUM_ITEMS))
        cat = target % NUM_CATS
        aff = 0.0
        for name, w in (("click", 1.0), ("buy", 2.0)):
            items = hist[name]
            if items:
                aff += w * np.mean([it % NUM_CATS == cat for it in items])
        label = int(rng.random() < 1 / (1 + np.exp(-3.0 * (aff - 0.6))))
        cols["clicked"].append(label)
        cols["ts"].append(ts)
        cols["user_id"].append(f"u{u:04d}")
        cols["item_id"].append(ITEM_ID_BASE + target)
        cols["item_cat"].append(cat)
        cols["tags"].append([f"t{(u + k) % 50}" for k in range(int(rng.integers(0, 4)))])
        cols["price"].append(None if rng.random() < 0.05 else float(rng.gamma(2.0, 20.0)))
        cols["age"].append(None if rng.random() < 0.05 else int(rng.integers(18, 70)))
        cols["click_items"].append([ITEM_ID_BASE + it for it in hist["click"]])
        cols["click_cats"].append([it % NUM_CATS for it in hist["click"]])
        cols["click_ts"].append([ts - 30 * (len(hist["click"]) - k) for k in range(len(hist["click"]))])
        cols["buy_items"].append([ITEM_ID_BASE + it for it in hist["buy"]])
        cols["buy_cats"].append([it % NUM_CATS for it in hist["buy"]])
        cols["notes"].append("x")
        cols["affinity"].append(aff)
    return cols


def arrow_table(cols: Dict[str, list]):
    import pyarrow as pa

    types = {
        "clicked": pa.int64(),
        "ts": pa.int64(),
        "user_id": pa.string(),
        "item_id": pa.int64(),
        "item_cat": pa.int32(),
        "tags": pa.list_(pa.string()),
        "price": pa.float64(),
        "age": pa.int64(),
        "click_items": pa.list_(pa.int64()),
        "click_cats": pa.list_(pa.int64()),
        "click_ts": pa.list_(pa.int64()),
        "buy_items": pa.list_(pa.int64()),
        "buy_cats": pa.list_(pa.int64()),
        "notes": pa.string(),
        "affinity": pa.float64(),
    }
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})


HISTORY_COLUMNS = ("click_items", "click_cats", "click_ts", "buy_items", "buy_cats")


def write_dataset(
    root: Path,
    train_rows: int = 12000,
    eval_rows: int = 2000,
    test_rows: int = 2000,
    train_files: int = 3,
    row_group_size: int = 1000,
    histories: bool = True,
) -> Dict[str, List[Path]]:
    """Parquet files under ``root/{train,eval,test}/`` and ``root/job.yaml`` (schema + data paths).

    ``histories=False``: the same rows (labels, ``affinity`` and every other column alike) with
    every history list empty, in the same files and row groups."""
    import pyarrow.parquet as pq

    out: Dict[str, List[Path]] = {}
    t = T0
    for split, rows, nfiles, seed in (("train", train_rows, train_files, 1), ("eval", eval_rows, 1, 2), ("test", test_rows, 1, 3)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        per = -(-rows // nfiles)
        out[split] = []
        for k in range(nfiles):
            n = min(per, rows - k * per)
            cols = make_rows(n, seed * 100 + k, t)
            if not histories:
                cols.update({c: [[] for _ in range(n)] for c in HISTORY_COLUMNS})
            table = arrow_table(cols)
            t += 60 * n
            path = folder / f"part-{k:05d}.parquet"
            pq.write_table(table, path, row_group_size=row_group_size)
            out[split].append(path)
        (folder / "_SUCCESS").write_text("")  # ignored in directories
    (root / "job.yaml").write_text(SCHEMA_YAML.format(train=root / "train", eval=root / "eval" / "*.parquet", test=root / "test"))
    return out


def csv_text(cols: Dict[str, list], names: List[str], delimiter: str = ",", list_sep: str = "|", header: bool = True) -> str:
    """The same rows as CSV: lists joined by ``list_sep``, nulls as empty fields."""

    def field(v) -> str:
        if v is None:
            return ""
        if isinstance(v, list):
            return list_sep.join(str(x) for x in v)
        return repr(v) if isinstance(v, float) else str(v)

    lines = [delimiter.join(names)] if header else []
    n = len(cols[names[0]])
    for i in range(n):
        lines.append(delimiter.join(field(cols[c][i]) for c in names))
    return "\n".join(lines) + "\n"


def csv_yaml(train, eval_, test, rows_per_block: int = 700) -> str:
    """The schema of :data:`SCHEMA_YAML` for CSV files."""
    text = SCHEMA_YAML.format(train=train, eval=eval_, test=test).replace("source: parquet", "source: csv")
    return text.replace("    shuffle_window: 4\n", f"    shuffle_window: 4\n    csv: {{rows_per_block: {rows_per_block}}}\n")
