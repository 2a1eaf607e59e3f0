"""Typed Arrow table of one chunk → :class:`ExampleBlock` (ids mapped, values checked).

Per role:

* ``label``: numeric. Binary (default): ``threshold`` → ``value >= threshold``, else in
  ``[0, 1]``; regression: any finite number. Null/NaN: a bad row (``missing: error``) or
  NaN = missing (``missing: mask``); ``mask_column``: its 0/false/null → NaN (missing),
  1/true → the label as read; any other value is a bad row;
* ``weight``: finite and >= 0; ``dense``: null/NaN → ``fill``, ±inf is bad; ``log1p`` →
  ``log(1 + max(x, 0))`` (as DLRM's Criteo preprocessing);
* ``request_time``: integer seconds, an Arrow timestamp, or a string parsed with
  ``time_format`` (UTC); never null;
* ``categorical``: ids → rows (``kunlun.data.ids``); a null id is row 0; lists keep their
  first ``max_ids`` ids (a null list is an empty bag);
* ``sequence``: per event type the item list, optional action and timestamp lists of the
  same length (else the row is bad); ``newest_first`` lists are reversed; the most recent
  ``max_len`` events are kept. No action column: action 0; no timestamps: the request time.

Bad rows follow :class:`RowIssues`: an error naming file/row/column/value, or weight 0.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.block import EventColumns, ExampleBlock, Jagged, ranges
from kunlun.data.errors import RowIssues, scalar_text
from kunlun.data.file_schema import ColumnSpec, FilePlan


def _col(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _valid(arr: pa.Array) -> np.ndarray:
    return arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(len(arr), dtype=bool)


def _floats(arr: pa.Array) -> np.ndarray:
    """Numeric / boolean / decimal → float64 with NaN for nulls."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_floating(arr.type):
        arr = pc.cast(arr, pa.float64())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)


def _seconds(arr: pa.Array, spec: ColumnSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Times → (int64 seconds, valid); strings via ``time_format``."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        parsed = pc.strptime(arr, format=spec.time_format, unit="s", error_is_null=True)
        return pc.cast(parsed, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), _valid(parsed)
    if pa.types.is_timestamp(arr.type):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s"), safe=False), pa.int64())
    valid = _valid(arr)
    return pc.cast(arr, pa.int64(), safe=False).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), valid


def _list_parts(arr: pa.Array) -> Tuple[np.ndarray, pa.Array]:
    """A list array → (lengths [N] int64, a null list is empty; flat values)."""
    if pa.types.is_fixed_size_list(arr.type):
        arr = pc.cast(arr, pa.list_(arr.type.value_type))
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, pc.list_flatten(arr)


class Decoder:
    """Turns typed chunks into example blocks for one :class:`FilePlan` and its id mappers."""

    def __init__(self, plan: FilePlan, mappers: Dict[str, object]):
        self.plan = plan
        self.mappers = mappers
        # (table, column) → identity ids decoded so far that land on row 0 ("missing"): a real
        # id 0 there is silently merged with nulls, so the source warns about it.
        self.zero_ids: Dict[Tuple[str, str], int] = {}

    def _ids(self, spec: ColumnSpec, values: pa.Array, issues: RowIssues, rows_of: Optional[np.ndarray], n: int, raw) -> np.ndarray:
        mapper = self.mappers[spec.table]
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        rows, bad = mapper.map(values)  # type: ignore[attr-defined]
        if bad.any():
            row_mask = np.zeros(n, dtype=bool)
            row_mask[bad if rows_of is None else rows_of[bad]] = True
            expected = f"an id in [0, {mapper.num_embeddings}) (table {spec.table!r}, id_mapping=identity; or data.id_policy=modulo)"  # type: ignore[attr-defined]
            issues.flag(row_mask, spec.name, lambda i: scalar_text(raw[i]), expected)
        if mapper.kind == "identity":  # type: ignore[attr-defined]
            self._count_zero_ids(spec, values, rows, bad)
        return rows

    def _count_zero_ids(self, spec: ColumnSpec, values: pa.Array, rows: np.ndarray, bad: np.ndarray) -> None:
        """Add the non-null, in-range ids of ``values [N]`` mapped to row 0 to :attr:`zero_ids`."""
        zero = int(np.count_nonzero((rows == 0) & _valid(values) & ~bad))
        if zero:
            key = (spec.table, spec.name)
            self.zero_ids[key] = self.zero_ids.get(key, 0) + zero

    def _label(self, table: pa.Table, spec: ColumnSpec, issues: RowIssues) -> np.ndarray:
        """One label column → ``[N]`` float32, NaN where missing (see the module docstring).
        Bad values are flagged and read as 0; where the mask column says missing, the
        label's value is not looked at (it may be null)."""
        arr = _col(table, spec.name)
        values = _floats(arr)
        observed = np.ones(len(values), dtype=bool)
        if spec.mask_column:
            mask_arr = _col(table, spec.mask_column)
            mask = _floats(mask_arr)
            issues.flag(
                ~np.isnan(mask) & (mask != 0) & (mask != 1),
                spec.mask_column,
                lambda i, arr=mask_arr: scalar_text(arr[i]),
                f"0 or 1, false or true, or null (mask of label {spec.name!r}, {spec.key}.mask_column)",
            )
            observed = mask == 1
        null = np.isnan(values) & observed

        def text(i: int, arr=arr) -> str:
            return scalar_text(arr[i])

        if spec.missing == "error":
            issues.flag(null, spec.name, text, "a label (not null; or set missing: mask)")
        if spec.label_type == "regression":
            with np.errstate(invalid="ignore"):
                bad = (np.isinf(values) | (np.abs(values) > np.finfo(np.float32).max)) & observed
            issues.flag(bad, spec.name, text, "a finite number within float32 range (regression label)")
            out = np.where(np.isfinite(values) & ~bad, values, 0.0)
        elif spec.threshold is not None:
            out = (values >= spec.threshold).astype(np.float64)
        else:
            in_range = (values >= 0) & (values <= 1)
            issues.flag(~np.isnan(values) & ~in_range & observed, spec.name, text, "a label in [0, 1] (or set a threshold)")
            out = np.where(in_range, values, 0.0)
        out = out.astype(np.float32)
        if spec.missing == "mask":
            out[null] = np.nan
        out[~observed] = np.nan
        return out

    def decode(self, table: pa.Table, issues: RowIssues) -> ExampleBlock:
        plan = self.plan
        num_rows = table.num_rows

        # ------------------------------------------------------------ request time
        if plan.request_time is not None:
            spec = plan.request_time
            arr = _col(table, spec.name)
            request_time, valid = _seconds(arr, spec)
            what = f"a time like {spec.time_format!r}" if spec.time_format else "a request time in seconds"
            issues.flag(~valid, spec.name, lambda i, arr=arr: scalar_text(arr[i]), what)
        else:
            request_time = np.zeros(num_rows, dtype=np.int64)

        # ------------------------------------------------------------------ labels
        labels = np.zeros((num_rows, len(plan.labels)), dtype=np.float32)
        for j, spec in enumerate(plan.labels):
            labels[:, j] = self._label(table, spec, issues)

        # ----------------------------------------------------------------- weights
        weights = None
        if plan.weight is not None:
            spec = plan.weight
            arr = _col(table, spec.name)
            raw_weights = _floats(arr)
            bad = ~np.isfinite(raw_weights) | (raw_weights < 0)
            issues.flag(bad, spec.name, lambda i, arr=arr: scalar_text(arr[i]), "a finite example weight >= 0")
            weights = np.where(bad, 0.0, raw_weights).astype(np.float32)

        # ------------------------------------------------------------------- dense
        dense = np.zeros((num_rows, len(plan.dense)), dtype=np.float32)
        for j, spec in enumerate(plan.dense):
            arr = _col(table, spec.name)
            values = _floats(arr)
            issues.flag(np.isinf(values), spec.name, lambda i, arr=arr: scalar_text(arr[i]), "a finite number (nulls and NaN take the column's fill value)")
            values = np.where(np.isfinite(values), values, spec.fill)
            if spec.transform == "log1p":
                values = np.log1p(np.maximum(values, 0.0))
            dense[:, j] = values

        # ------------------------------------------------------------- categorical
        context: Dict[str, Jagged] = {}
        for spec in plan.categorical:
            arr = _col(table, spec.name)
            if spec.is_list:
                lengths, flat = _list_parts(arr)
                row_of = np.repeat(np.arange(num_rows), lengths)
                rows = self._ids(spec, flat, issues, row_of, num_rows, arr)
                keep_len = np.minimum(lengths, spec.max_ids)
                starts = np.cumsum(lengths) - lengths
                context[spec.feature] = Jagged(keep_len, rows[ranges(starts, keep_len)])
            else:
                rows = self._ids(spec, arr, issues, None, num_rows, arr)
                context[spec.feature] = Jagged(np.ones(num_rows, dtype=np.int64), rows)

        # ---------------------------------------------------------------- sequences
        events: Dict[str, EventColumns] = {}
        for ev in plan.events:
            arr = _col(table, ev.item.name)
            lengths, flat = _list_parts(arr)
            row_of = np.repeat(np.arange(num_rows), lengths)
            items = self._ids(ev.item, flat, issues, row_of, num_rows, arr)
            ok = np.ones(num_rows, dtype=bool)
            actions = np.zeros(len(items), dtype=np.int64)
            if ev.action is not None:
                a_arr, a_len, a_flat, mismatch = _attribute_list(table, ev.action, ev.item, lengths, issues)
                ok &= ~mismatch
                if not mismatch.any():
                    actions = self._ids(ev.action, a_flat, issues, row_of, num_rows, a_arr)
                else:
                    a_rows = self._ids(ev.action, a_flat, issues, np.repeat(np.arange(num_rows), a_len), num_rows, a_arr)
                    actions = _align(a_rows, a_len, lengths, ok)
            if ev.timestamp is not None:
                t_arr, t_len, t_flat, mismatch = _attribute_list(table, ev.timestamp, ev.item, lengths, issues)
                ok &= ~mismatch
                t_vals, t_valid = _seconds(t_flat, ev.timestamp)
                if not t_valid.all():
                    t_rows = np.repeat(np.arange(num_rows), t_len)
                    bad = np.zeros(num_rows, dtype=bool)
                    bad[t_rows[~t_valid]] = True
                    issues.flag(bad, ev.timestamp.name, lambda i, t_arr=t_arr: scalar_text(t_arr[i]), "event timestamps in seconds (no nulls)")
                timestamps = _align(t_vals, t_len, lengths, ok) if mismatch.any() else t_vals
            else:
                timestamps = np.repeat(request_time, lengths)
            # rows whose attribute lists disagree keep no events
            lengths_ok = np.where(ok, lengths, 0)
            starts = np.cumsum(lengths) - lengths
            if ev.order == "newest_first":
                pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
                rev = np.repeat(starts + lengths - 1, lengths) - pos
                items, actions, timestamps = items[rev], actions[rev], timestamps[rev]
            keep = np.minimum(lengths_ok, ev.max_len)
            idx = ranges(starts + lengths_ok - keep, keep)  # the most recent max_len events
            events[ev.name] = EventColumns(keep.astype(np.int64), items[idx], actions[idx], timestamps[idx].astype(np.int64))

        bad = issues.bad
        if bad.any():
            weights = np.where(bad, 0.0, 1.0 if weights is None else weights).astype(np.float32)
            labels[bad] = 0.0
        return ExampleBlock(dense=dense, context=context, events=events, request_time=request_time, labels=labels, weights=weights)


def issues_first(mask: np.ndarray) -> int:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else 0


def _attribute_list(table: pa.Table, column, item_column, lengths: np.ndarray, issues):
    """An event attribute's list column: (array, lengths, flat values, rows whose list length
    differs from the item list's — flagged as issues)."""
    arr = _col(table, column.name)
    have, flat = _list_parts(arr)
    mismatch = have != lengths
    issues.flag(
        mismatch, column.name, lambda i, arr=arr: scalar_text(arr[i]), f"a list as long as {item_column.name!r} ({int(lengths[issues_first(mismatch)])} events)"
    )
    return arr, have, flat, mismatch


def _align(values: np.ndarray, have: np.ndarray, want: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Attribute values laid out with lengths ``have`` → layout ``want`` (rows not ``ok`` get zeros)."""
    out = np.zeros(int(want.sum()), dtype=values.dtype)
    src_starts = np.cumsum(have) - have
    dst_starts = np.cumsum(want) - want
    rows = np.flatnonzero(ok)
    out[ranges(dst_starts[rows], want[rows])] = values[ranges(src_starts[rows], have[rows])]
    return out
