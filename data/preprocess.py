"""``kunlun data vocab`` and ``kunlun data convert``.

**vocab** counts every raw id of the tables with ``id_mapping: vocab`` over the *train*
split (never validation or test: their ids must not shape the mapping), keeps ids seen at
least ``data.files.vocab_min_count`` times, most frequent first (ties by id text), at most
``num_embeddings - 1 - oov_buckets`` of them when the table sets ``num_embeddings``, and
writes ``<vocab_dir>/<table>.vocab.parquet`` (columns ``id``, ``count``) plus
``vocab.json`` (min count, sizes, sha256 of each file). Counting runs in Arrow (hash
aggregation), merged every few chunks so memory stays proportional to the distinct ids.

**convert** rewrites CSV/TSV files as Parquet with the declared types (list columns as
Arrow lists, string request times parsed to int64 seconds), one output file per input
file and row groups of ``--row-group-size`` rows, and writes ``<out>/job.yaml``: the same
job with ``data.source=parquet`` and the new paths. Raw ids are kept (the id mapping stays
a training-time choice). Bad rows raise (``bad_row_policy=error``) or are left out
(``skip``, counted).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.decode import _list_parts, _seconds
from kunlun.data.errors import DataError
from kunlun.data.ids import canonical_text, write_vocab

log = logging.getLogger("kunlun.data")


def _merge(parts: List[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts)
    return t.group_by("id").aggregate([("count", "sum")]).rename_columns(["id", "count"])


def build_vocab(data_cfg, tables: Optional[Sequence[str]] = None, min_count: Optional[int] = None, out_dir: Optional[str] = None) -> Dict[str, Dict]:
    """Build the vocabularies; returns ``table → {distinct, kept, rows, coverage, ...}``."""
    from kunlun.data.sources.files import FileSource

    files = data_cfg.files
    vocab_dir = out_dir or files.vocab_dir
    if not vocab_dir:
        raise DataError("no vocabulary folder: set data.files.vocab_dir or pass --out")
    min_count = int(min_count if min_count is not None else files.vocab_min_count)
    src = FileSource(data_cfg, validate=False, splits=("train",), load_vocabularies=False)
    plan = src.plan
    names = list(tables) if tables else [table_name for table_name, table_spec in plan.tables.items() if table_spec.id_mapping == "vocab"]
    unknown = [table_name for table_name in names if table_name not in plan.tables or table_name.startswith("_")]
    if unknown:
        raise DataError(
            f"--tables: unknown tables {unknown}; tables of the schema: {[table_name for table_name in plan.tables if not table_name.startswith('_')]}"
        )
    if not names:
        raise DataError("no table uses id_mapping=vocab; set data.files.id_mapping=vocab (or a table's id_mapping), or pass --tables")
    counts: Dict[str, List[pa.Table]] = {table_name: [] for table_name in names}
    for chunk, sel in src.split_parts("train"):
        table, issues = src.read_table(chunk)
        src.decoder.decode(table, issues)  # the same checks as training
        keep = ~issues.bad if sel is None else np.isin(np.arange(table.num_rows), sel) & ~issues.bad
        if not keep.all():
            table = table.filter(pa.array(keep))
        for table_name in names:
            for spec in plan.table_columns.get(table_name, []):
                arr = table.column(spec.name).combine_chunks()
                values = canonical_text(_list_parts(arr)[1] if spec.is_list else arr).drop_null()
                vc = pc.value_counts(values)
                counts[table_name].append(pa.table({"id": vc.field("values"), "count": pc.cast(vc.field("counts"), pa.int64())}))
            if len(counts[table_name]) >= 64:
                counts[table_name] = [_merge(counts[table_name])]
    out: Dict[str, Dict] = {}
    for table_name in names:
        merged = _merge(counts[table_name]) if counts[table_name] else pa.table({"id": pa.array([], pa.large_string()), "count": pa.array([], pa.int64())})
        total = int(pc.sum(merged.column("count")).as_py() or 0)
        kept = merged.filter(pc.greater_equal(merged.column("count"), min_count))
        kept = kept.sort_by([("count", "descending"), ("id", "ascending")])
        cap = plan.tables[table_name].num_embeddings
        if cap:
            kept = kept.slice(0, max(0, cap - 1 - files.oov_buckets))
        covered = int(pc.sum(kept.column("count")).as_py() or 0)
        meta = {
            "min_count": min_count,
            "oov_buckets": files.oov_buckets,
            "num_embeddings": 1 + files.oov_buckets + kept.num_rows,
            "distinct_ids": merged.num_rows,
            "occurrences": total,
            "coverage": covered / total if total else 0.0,
            "split": "train",
            "files": src.files,
        }
        entry = write_vocab(Path(vocab_dir), table_name, kept.column("id").combine_chunks(), kept.column("count").to_numpy(), meta)
        out[table_name] = entry
    return out


def format_vocab(result: Dict[str, Dict]) -> str:
    rows = [(t, f"{v['distinct_ids']:,}", f"{v['entries']:,}", f"{v['num_embeddings']:,}", f"{100 * v['coverage']:.1f}%", v["file"]) for t, v in result.items()]
    header = ("table", "distinct ids", "kept", "rows", "coverage", "file")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(header, widths))]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _canonical_column(arr: pa.Array, spec) -> pa.Array:
    """A typed chunk column → the Parquet column written for it."""
    if spec.role == "request_time" and spec.dtype == "string":
        secs, valid = _seconds(arr, spec)
        return pa.array(secs, pa.int64(), mask=~valid)
    if spec.is_list:
        value_type = pa.int64() if spec.element_dtype == "int64" else pa.string()
        return pc.cast(arr, pa.list_(value_type))
    target = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string()}[spec.dtype]
    return pc.cast(arr, target)


def convert(data_cfg, out_dir: str, row_group_size: int = 65536, job_cfg=None) -> Dict:
    """CSV → Parquet for every file of every split; returns ``{"files": {split: [...]}, "rows": n, "skipped": n, "config": path}``."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from kunlun.data.sources.files import FileSource

    if data_cfg.source != "csv":
        raise DataError(f"data.source = {data_cfg.source!r}: convert reads CSV files (data.source=csv)")
    src = FileSource(data_cfg, validate=False, load_vocabularies=False)
    plan = src.plan
    specs = list({spec.name: spec for spec in plan.read_columns}.values())
    out = Path(out_dir).expanduser()
    by_split = (
        {"all": src.files}
        if data_cfg.files.split != "paths"
        else {
            split_name: [src.files[file_idx] for file_idx in sorted({src.chunks[chunk].file for chunk, _ in src.split_parts(split_name)})]
            for split_name in ("train", "eval", "test")
        }
    )
    written: Dict[str, List[str]] = {}
    rows_total = skipped = 0
    for split, paths in by_split.items():
        folder = out / ("data" if split == "all" else split)
        folder.mkdir(parents=True, exist_ok=True)
        written[split] = []
        for path in paths:
            fid = src.files.index(path)
            target = folder / (Path(path).name.split(".")[0] + ".parquet")
            if str(target) in sum(written.values(), []):
                target = folder / f"{Path(path).name.split('.')[0]}-{fid}.parquet"
            tmp = target.with_suffix(".parquet.tmp")
            writer = None
            try:
                for chunk in src._file_chunks[fid]:
                    table, issues = src.read_table(chunk)
                    src.decoder.decode(table, issues)  # value checks (labels, lists, ...)
                    if issues.bad.any():
                        skipped += int(issues.bad.sum())
                        table = table.filter(pa.array(~issues.bad))
                    typed = pa.table({spec.name: _canonical_column(table.column(spec.name).combine_chunks(), spec) for spec in specs})
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, typed.schema)
                    writer.write_table(typed, row_group_size=row_group_size)
                    rows_total += typed.num_rows
            finally:
                if writer is not None:
                    writer.close()
            tmp.replace(target)
            written[split].append(str(target))
    result = {"files": written, "rows": rows_total, "skipped": skipped}
    if job_cfg is not None:
        files = data_cfg.files
        columns = [
            replace(col, dtype="int64", time_format="") if (col.role == "request_time" and col.dtype == "string") else col
            for col in files.schema.columns
            if col.role != "ignore"
        ]
        new_files = replace(files, schema=replace(files.schema, columns=columns))
        if files.split == "paths":
            new_files = replace(new_files, train=[str(out / "train")], eval=[str(out / "eval")], test=[str(out / "test")])
        else:
            new_files = replace(new_files, paths=[str(out / "data")])
        job = replace(job_cfg, data=replace(job_cfg.data, source="parquet", files=new_files))
        cfg_path = out / "job.yaml"
        cfg_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(job)))
        result["config"] = str(cfg_path)
    return result
