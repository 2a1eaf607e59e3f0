"""Raw rows of a file-source job → :class:`ExampleBlock`, with the training-time decoding.

The rows go through the same :class:`kunlun.data.decode.Decoder` and id mappers (hash
parameters, vocabularies copied into the export, identity ranges, ``id_policy``) that the
trainer's file source used, so an id, a history list or a timestamp is mapped exactly as in
training. Input: a ``pyarrow.Table`` or a list of dicts with the declared columns (typed
values, as in a Parquet file: lists as lists). Label and weight columns may be absent.
Every problem is an error (``bad_row_policy`` does not apply to scoring: a request must not
be scored on made-up values) naming the row, the column, the value and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import pyarrow as pa

from kunlun.data.block import ExampleBlock
from kunlun.data.errors import BadRowTracker, DataError, RowIssues, scalar_text
from kunlun.serving.format import ExportError

_ARROW = {"int64": pa.int64(), "float32": pa.float64(), "string": pa.large_string()}


def _arrow_type(spec) -> pa.DataType:
    """The Arrow type a list of Python values of this column converts to."""
    elem = _ARROW[spec.element_dtype]
    return pa.large_list(elem) if spec.is_list else elem


class RowDecoder:
    """Decodes raw rows for one exported file-source job.

    Args:
        data_cfg: the job's ``DataConfig`` (``data.yaml`` of the export).
        vocab_dir: the export's ``vocab/`` folder (vocab tables are read from there).
        table_sizes: table → rows of the exported tables (must match the mappers).
    """

    def __init__(self, data_cfg, vocab_dir: Path, table_sizes: Dict[str, int]):
        from kunlun.data.decode import Decoder
        from kunlun.data.file_schema import FileSchemaError, resolve
        from kunlun.data.ids import build_mappers

        files = data_cfg.files
        files.vocab_dir = str(vocab_dir)
        try:
            self.plan = resolve(files, data_cfg.source)
        except FileSchemaError as e:
            raise ExportError(f"data.yaml: {e}") from e
        mappers, sizes, _ = build_mappers(self.plan, files, data_cfg.id_policy)
        if sizes != table_sizes:
            diff = {t: (sizes.get(t), table_sizes.get(t)) for t in set(sizes) | set(table_sizes) if sizes.get(t) != table_sizes.get(t)}
            raise ExportError(f"data.yaml / vocab: table sizes differ from the exported tables (table: (mapping, tables.pt)): {diff}")
        self.decoder = Decoder(self.plan, mappers)
        self.columns = list(dict.fromkeys(c.name for c in self.plan.read_columns))
        # Scoring needs neither labels, their mask columns nor the example weight.
        self._optional = {c.name for c in self.plan.labels} | {c.name for c in getattr(self.plan, "masks", [])}
        if self.plan.weight is not None:
            self._optional.add(self.plan.weight.name)
        self._specs = {c.name: c for c in self.plan.read_columns}

    # ------------------------------------------------------------------ input
    def _from_dicts(self, rows: Sequence[Dict[str, Any]]) -> pa.Table:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"rows[{i}]: a {type(row).__name__}: expected a dict of column → value")
        cols = {}
        for name in self.columns:
            if not any(name in row for row in rows):
                continue  # missing everywhere: reported (or filled, for labels) by _check_table
            spec = self._specs[name]
            values = [row.get(name) for row in rows]
            try:
                cols[name] = pa.array(values, type=_arrow_type(spec))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as e:
                for i, v in enumerate(values):
                    try:
                        pa.array([v], type=_arrow_type(spec))
                    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                        raise DataError(f"rows[{i}]: column {name!r} = {v!r}: expected {_describe(spec)} (declared at {spec.key})") from e
                raise DataError(f"column {name!r}: cannot be converted to {_describe(spec)} ({e})") from e
        return pa.table(cols) if cols else pa.table({"__empty__": pa.nulls(len(rows))})

    def _check_table(self, table: pa.Table) -> pa.Table:
        from kunlun.data.formats import type_ok

        n = table.num_rows
        for name in self.columns:
            spec = self._specs[name]
            if name not in table.column_names:
                if name in self._optional:  # scoring needs no label; decoding wants a value
                    fill = np.ones(n) if spec.role == "weight" else np.zeros(n)  # labels and masks: 0 (unused)
                    table = table.append_column(name, pa.array(fill.astype(np.int64 if spec.element_dtype == "int64" else np.float64), _arrow_type(spec)))
                    continue
                raise DataError(f"rows: column {name!r} is missing (declared at {spec.key} as {_describe(spec)}); the rows have columns {table.column_names}")
            t = table.schema.field(name).type
            if not type_ok(t, spec) and not (pa.types.is_null(t) or (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_null(t.value_type)):
                col = table.column(name)
                valid = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False)) if n else []
                row = int(valid[0]) if len(valid) else 0
                value = scalar_text(col[row]) if n else None
                raise DataError(f"rows[{row}]: column {name!r} = {value!r}: expected {_describe(spec)} (the column has type {t}; declared at {spec.key})")
            if pa.types.is_null(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_null(t.value_type)):
                table = table.set_column(table.column_names.index(name), name, table.column(name).cast(_arrow_type(spec)))
        return table

    def decode(self, rows: Union[pa.Table, Sequence[Dict[str, Any]]]) -> ExampleBlock:
        """``rows`` (N) → an :class:`ExampleBlock` of N examples (labels 0 where absent)."""
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        if not isinstance(rows, pa.Table):
            if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)):
                raise DataError(f"rows: a {type(rows).__name__}: expected a pyarrow.Table or a list of dicts")
            rows = self._from_dicts(rows)
        table = self._check_table(rows)
        issues = RowIssues(BadRowTracker("error"), lambda i: f"rows[{i}]", table.num_rows)
        return self.decoder.decode(table, issues)


def _describe(spec) -> str:
    from kunlun.data.formats import describe_expected

    return describe_expected(spec)
