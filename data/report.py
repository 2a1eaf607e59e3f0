"""``kunlun data inspect``: check the declared schema against the files and report on them.

Reads every row of the requested splits through the same readers and decoder as training
(so it fails, or counts bad rows, exactly as training would) and collects:

* per split: files, chunks, rows, label rate of every label, rows dropped as bad
  (``bad_row_policy=skip``), request-time range;
* per column: nulls; for id columns the number of distinct raw ids; for dense columns
  min / mean / max (before ``fill`` and transforms);
* per event type: history length percentiles (p50 / p90 / p99 / max, before truncation),
  the share of histories longer than ``max_len``, and events stamped at or after their
  example's request time (a leak of the future into the features);
* per table: its mapping and rows, distinct ids over every column that reads it, rows
  actually used; for hash tables the ids that share a row with another id (collisions),
  their share of the distinct ids and the ``num_embeddings`` that keeps the expected share
  under 1%; for identity tables the ids equal to 0 (they share row 0 with missing ids); for
  vocab tables the share of ids that are out of vocabulary;
* warnings (``report["warnings"]``, printed last): hash tables with more than 1% colliding
  ids, identity columns holding id 0.

Distinct counts are exact (64-bit fingerprints, 8 bytes per distinct id in memory).
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from kunlun.data.block import take_block
from kunlun.data.decode import _floats, _list_parts
from kunlun.data.ids import canonical_text, fingerprint, zero_id_warning

COLLISION_TARGET = 0.01  # share of a hash table's ids that may share a row before inspect warns


def hash_collisions(fingerprints: np.ndarray, num_embeddings: int) -> int:
    """How many of the distinct ids (``fingerprints [n]``, unique uint64) share their hash row
    (``1 + fingerprint % (num_embeddings - 1)``, as ``HashMapper``) with another id."""
    rows = fingerprints % np.uint64(num_embeddings - 1)
    _, counts = np.unique(rows, return_counts=True)
    return int(counts[counts > 1].sum())


def suggested_num_embeddings(num_ids: int, target: float = COLLISION_TARGET) -> int:
    """The smallest hash table (rows, row 0 included; rounded up to two significant digits)
    whose expected share of colliding ids is at most ``target`` for ``num_ids`` distinct ids.

    With n ids hashed uniformly into m rows an id shares its row unless the n - 1 others all
    miss it: expected share ≈ 1 - (1 - 1/m)^(n-1) ≈ 1 - exp(-(n-1)/m). So
    m >= (n - 1) / -ln(1 - target), about 100 (n - 1) rows for 1%.
    """
    if num_ids <= 1:
        return 2
    need = 1 + math.ceil((num_ids - 1) / -math.log1p(-target))
    scale = 10 ** max(0, len(str(need)) - 2)
    return -(-need // scale) * scale


def _table_warnings(name: str, entry: Dict, zero_by_column: Dict[str, int], id_policy: str) -> List[str]:
    """Warning lines for one table's report entry."""
    out = []
    if entry.get("collision_rate", 0.0) > COLLISION_TARGET:
        out.append(
            f"table {name!r}: {entry['collision_rate']:.1%} of its {entry['distinct_ids']:,} distinct ids share an embedding row "
            f"with another id (id_mapping=hash, num_embeddings={entry['rows']:,}); set num_embeddings: {entry['suggested_rows']:,} "
            f"(< {COLLISION_TARGET:.0%} expected), or use id_mapping: vocab (`kunlun data vocab`: one row per id, no collisions)"
        )
    for column, count in zero_by_column.items():
        if count:
            out.append(zero_id_warning(name, column, count, id_policy))
    return out


def _percentile_from_counts(counts: np.ndarray, q: float) -> int:
    total = counts.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(counts), q * total, side="left"))


def _union(a: Optional[np.ndarray], b: np.ndarray) -> np.ndarray:
    b = np.unique(b)
    return b if a is None else np.union1d(a, b)


def inspect(data_cfg, splits: Sequence[str] = ("train", "eval", "test")) -> Dict:
    """The report (a JSON-able dict); raises ``DataError`` like training would."""
    from kunlun.data.sources.files import FileSource

    src = FileSource(data_cfg, validate=False, splits=tuple(splits))
    plan = src.plan
    report: Dict = {"source": src.source, "num_files": len(src.files), "splits": {}, "columns": {}, "events": {}, "tables": {}, "warnings": []}
    col_stats: Dict[str, Dict] = {col.name: {"role": col.role, "dtype": col.dtype, "nulls": 0, "values": 0} for col in plan.read_columns}
    col_fp: Dict[str, Optional[np.ndarray]] = {}
    dense_acc: Dict[str, List[float]] = {col.name: [np.inf, -np.inf, 0.0, 0] for col in plan.dense}
    table_fp: Dict[str, Optional[np.ndarray]] = {table_name: None for table_name in plan.tables}
    table_rows: Dict[str, Optional[np.ndarray]] = {table_name: None for table_name in plan.tables}
    table_oov = {table_name: [0, 0] for table_name in plan.tables}
    table_zero: Dict[str, Dict[str, int]] = {table_name: {} for table_name in plan.tables}  # identity: column → ids mapped to row 0
    ev_counts = {event.name: np.zeros(1, dtype=np.int64) for event in plan.events}
    ev_future = {event.name: 0 for event in plan.events}

    for split in splits:
        parts = src.split_parts(split)
        files = sorted({src.chunks[chunk].file for chunk, _ in parts})
        rows = 0
        bad = 0
        positives = np.zeros(len(plan.labels))
        label_weight = np.zeros(len(plan.labels))  # weight of the rows where each label is present
        weight_sum = 0.0
        t_lo, t_hi = None, None
        for chunk, sel in parts:
            table, issues = src.read_table(chunk)
            block = src.decoder.decode(table, issues)
            if sel is not None:
                table = table.take(pa.array(sel))
                block = take_block(block, sel)
                bad_rows = issues.bad[sel]
            else:
                bad_rows = issues.bad
            num_rows = table.num_rows
            rows += num_rows
            bad += int(bad_rows.sum())
            weights = block.weights if block.weights is not None else np.ones(num_rows, np.float32)
            present = ~np.isnan(block.labels)  # NaN = a missing label (mask column / null under missing: mask)
            positives += (np.where(present, block.labels, 0.0) * weights[:, None]).sum(axis=0)
            label_weight += (present * weights[:, None]).sum(axis=0)
            weight_sum += float(weights.sum())
            if plan.request_time is not None and num_rows:
                good = ~bad_rows
                if good.any():
                    lo, hi = int(block.request_time[good].min()), int(block.request_time[good].max())
                    t_lo = lo if t_lo is None else min(t_lo, lo)
                    t_hi = hi if t_hi is None else max(t_hi, hi)
            for spec in plan.read_columns:
                arr = table.column(spec.name).combine_chunks()
                st = col_stats[spec.name]
                st["nulls"] += arr.null_count
                st["values"] += len(arr)
                if spec.role == "dense":
                    dense_values = _floats(arr)
                    dense_values = dense_values[np.isfinite(dense_values)]
                    if len(dense_values):
                        acc = dense_acc[spec.name]
                        acc[0], acc[1] = min(acc[0], float(dense_values.min())), max(acc[1], float(dense_values.max()))
                        acc[2] += float(dense_values.sum())
                        acc[3] += len(dense_values)
                if spec.table:
                    values = _list_parts(arr)[1] if spec.is_list else arr
                    fp, valid = fingerprint(canonical_text(values))
                    col_fp[spec.name] = _union(col_fp.get(spec.name), fp[valid])
                    table_fp[spec.table] = _union(table_fp[spec.table], fp[valid])
                    mapped, bad_ids = src.mappers[spec.table].map(values)  # type: ignore[attr-defined]
                    table_rows[spec.table] = _union(table_rows[spec.table], mapped[valid])
                    if plan.tables[spec.table].id_mapping == "identity":
                        zero = int(((mapped == 0) & valid & ~bad_ids).sum())
                        table_zero[spec.table][spec.name] = table_zero[spec.table].get(spec.name, 0) + zero
                    if plan.tables[spec.table].id_mapping == "vocab":
                        oov = src.mappers[spec.table].oov_buckets  # type: ignore[attr-defined]
                        table_oov[spec.table][0] += int(((mapped >= 1) & (mapped <= oov) & valid).sum())
                        table_oov[spec.table][1] += int(valid.sum())
            for ev in plan.events:
                lengths, _ = _list_parts(table.column(ev.item.name).combine_chunks())
                counts = np.bincount(lengths)
                acc = ev_counts[ev.name]
                if len(counts) > len(acc):
                    acc = np.pad(acc, (0, len(counts) - len(acc)))
                acc[: len(counts)] += counts
                ev_counts[ev.name] = acc
                if ev.timestamp is not None:
                    event_cols = block.events[ev.name]
                    owner = np.repeat(np.arange(len(event_cols.lengths)), event_cols.lengths)
                    ev_future[ev.name] += int((event_cols.timestamps >= block.request_time[owner]).sum())
        report["splits"][split] = {
            "files": len(files),
            "chunks": len(parts),
            "rows": rows,
            "bad_rows": bad,
            # positive rate of a binary label, mean of a regression label, over the rows that have it
            "label_rate": {lab.feature: (float(pos / w) if w else 0.0) for lab, pos, w in zip(plan.labels, positives, label_weight)},
            "request_time": [t_lo, t_hi],
        }
    for spec in plan.read_columns:
        st = col_stats[spec.name]
        entry = {"role": st["role"], "dtype": st["dtype"], "nulls": st["nulls"], "rows": st["values"]}
        if spec.name in col_fp:
            entry["distinct_ids"] = int(len(col_fp[spec.name]))
        if spec.name in dense_acc and dense_acc[spec.name][3]:
            lo, hi, total, cnt = dense_acc[spec.name]
            entry.update(min=lo, mean=total / cnt, max=hi)
        report["columns"][spec.name] = entry
    for ev in plan.events:
        counts = ev_counts[ev.name]
        total = int(counts.sum())
        report["events"][ev.name] = {
            "p50": _percentile_from_counts(counts, 0.5),
            "p90": _percentile_from_counts(counts, 0.9),
            "p99": _percentile_from_counts(counts, 0.99),
            "max": int(len(counts) - 1 if counts.any() else 0),
            "mean": float((counts * np.arange(len(counts))).sum() / total) if total else 0.0,
            "truncated": float(counts[ev.max_len + 1 :].sum() / total) if total else 0.0,
            "max_len": ev.max_len,
            "at_or_after_request": ev_future[ev.name] if ev.timestamp is not None else None,
        }
    for name, table_spec in plan.tables.items():
        if name.startswith("_"):  # internal (_no_action)
            continue
        distinct = 0 if table_fp[name] is None else int(len(table_fp[name]))
        used = 0 if table_rows[name] is None else int(len(table_rows[name]))
        entry = {"id_mapping": table_spec.id_mapping, "rows": int(src.table_sizes[name]), "distinct_ids": distinct, "rows_used": used}
        if table_spec.id_mapping == "hash":
            colliding = 0 if table_fp[name] is None else hash_collisions(table_fp[name], entry["rows"])
            entry.update(colliding_ids=colliding, collision_rate=colliding / distinct if distinct else 0.0, suggested_rows=suggested_num_embeddings(distinct))
        if table_spec.id_mapping == "identity":
            entry["zero_ids"] = sum(table_zero[name].values())
        if table_spec.id_mapping == "vocab":
            oov, total = table_oov[name]
            entry["oov_share"] = oov / total if total else 0.0
        report["tables"][name] = entry
        report["warnings"] += _table_warnings(name, entry, table_zero[name], getattr(src.mappers[name], "id_policy", "error"))
    return report


def _fmt_time(t: Optional[int]) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_report(report: Dict) -> str:
    out = [f"source: {report['source']}, {report['num_files']} files"]
    labels = next(iter(report["splits"].values()))["label_rate"].keys() if report["splits"] else []
    out.append("\nsplits")
    out.append(
        _table(
            ["split", "files", "chunks", "rows", *[f"{lab} rate/mean" for lab in labels], "bad rows", "request time from", "to"],
            [
                [
                    split,
                    str(stats["files"]),
                    str(stats["chunks"]),
                    f"{stats['rows']:,}",
                    *[f"{stats['label_rate'][lab]:.4f}" for lab in labels],
                    f"{stats['bad_rows']:,}",
                    _fmt_time(stats["request_time"][0]),
                    _fmt_time(stats["request_time"][1]),
                ]
                for split, stats in report["splits"].items()
            ],
        )
    )
    out.append("\ncolumns")
    rows = []
    for name, col in report["columns"].items():
        extra = ""
        if "distinct_ids" in col:
            extra = f"{col['distinct_ids']:,} distinct ids"
        elif "mean" in col:
            extra = f"min {col['min']:.4g}  mean {col['mean']:.4g}  max {col['max']:.4g}"
        rows.append([name, col["role"], col["dtype"], f"{col['nulls']:,}", extra])
    out.append(_table(["column", "role", "dtype", "nulls", "values"], rows))
    if report["events"]:
        out.append("\nsequence lengths (before truncation)")
        out.append(
            _table(
                ["event", "mean", "p50", "p90", "p99", "max", "max_len", "truncated", "at/after request"],
                [
                    [
                        event,
                        f"{stats['mean']:.2f}",
                        str(stats["p50"]),
                        str(stats["p90"]),
                        str(stats["p99"]),
                        str(stats["max"]),
                        str(stats["max_len"]),
                        f"{100 * stats['truncated']:.1f}%",
                        "-" if stats["at_or_after_request"] is None else f"{stats['at_or_after_request']:,}",
                    ]
                    for event, stats in report["events"].items()
                ],
            )
        )
    out.append("\ntables")
    out.append(
        _table(
            ["table", "id_mapping", "rows", "distinct ids", "rows used", "colliding ids", "collision rate", "suggested rows", "id 0", "oov"],
            [
                [
                    table_name,
                    stats["id_mapping"],
                    f"{stats['rows']:,}",
                    f"{stats['distinct_ids']:,}",
                    f"{stats['rows_used']:,}",
                    f"{stats['colliding_ids']:,}" if "colliding_ids" in stats else "-",
                    f"{100 * stats['collision_rate']:.1f}%" if "collision_rate" in stats else "-",
                    f"{stats['suggested_rows']:,}" if "suggested_rows" in stats else "-",
                    f"{stats['zero_ids']:,}" if "zero_ids" in stats else "-",
                    f"{100 * stats['oov_share']:.1f}%" if "oov_share" in stats else "-",
                ]
                for table_name, stats in report["tables"].items()
            ],
        )
    )
    if any("suggested_rows" in stats for stats in report["tables"].values()):
        out.append(
            f"(colliding ids: ids sharing a hash row with another id; suggested rows: the num_embeddings keeping the expected "
            f"share under {COLLISION_TARGET:.0%}, 1 - exp(-(ids - 1) / rows); id_mapping: vocab (`kunlun data vocab`) has no collisions)"
        )
    if report.get("warnings"):
        out.append("\nwarnings")
        out += [f"WARNING: {warning}" for warning in report["warnings"]]
    return "\n".join(out)
