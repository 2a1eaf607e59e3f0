"""Parquet and CSV/TSV readers for the declared schema: files → chunks → typed Arrow tables.

A file is cut into **chunks**, the unit of reading and caching: a Parquet row group, or a
block of ``data.files.csv.rows_per_block`` CSV lines (found by one scan for newlines, so
a block can be read with one seek; quoted fields must not contain newlines). The CSV
delimiter may have several characters (MovieLens' ``::``): pyarrow's parser takes one byte,
so such a delimiter is replaced by a control byte absent from the block first (and put back
inside quoted values). A reader

* lists a file's chunks (``chunks``) after checking its structure against the schema:
  empty files, missing columns, wrong Parquet types, list columns that are not lists, a CSV
  header without a declared column — each a :class:`DataError` naming the file, the
  column and (for types) the first row and its value;
* reads one chunk as an Arrow table of the declared columns (``read``), values converted to
  the declared dtypes. CSV fields that do not parse (``"12x"`` for an int64, a row with the
  wrong number of fields) go through :class:`RowIssues`: an error naming ``file:line``,
  column, value and what was expected, or (``bad_row_policy=skip``) a null value in a row
  marked bad, which keeps its position.

Typed columns: ``int64`` → any Arrow integer (timestamps for times), ``float32`` → float64,
``string`` → string, ``list<int64>`` / ``list<string>`` → lists of those.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from kunlun.data.errors import DataError, RowIssues, scalar_text
from kunlun.data.file_schema import ColumnSpec, FilePlan

log = logging.getLogger(__name__)

ChunkInfo = Tuple[int, int, int]  # (part, first row in the file, rows)


# ------------------------------------------------------------------ type checks
def _elem_ok(t: pa.DataType, dtype: str, role: str) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if dtype == "int64":
        return pa.types.is_integer(t) or (role == "label" and pa.types.is_boolean(t)) or (role in ("request_time", "sequence") and pa.types.is_timestamp(t))
    if dtype == "float32":
        return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
    if dtype == "string":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    return False


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def type_ok(t: pa.DataType, spec: ColumnSpec) -> bool:
    if spec.is_list:
        return _is_list(t) and _elem_ok(t.value_type, spec.element_dtype, spec.role)
    return not _is_list(t) and _elem_ok(t, spec.dtype, spec.role)


def describe_expected(spec: ColumnSpec) -> str:
    if spec.is_list:
        return f"a list of {spec.element_dtype} ({spec.dtype})"
    return {"int64": "an integer (int64)", "float32": "a number (float32)", "string": "a string"}[spec.dtype]


# ---------------------------------------------------------------------- Parquet
class ParquetReader:
    """Row groups of Parquet files, only the declared columns (pyarrow)."""

    kind = "parquet"

    def __init__(self, plan: FilePlan, csv_cfg=None, cache_dir: Optional[Path] = None):
        self.plan = plan
        self._files: Dict[str, object] = {}
        self._pid = os.getpid()

    def _open(self, path: str):
        import pyarrow.parquet as pq

        if os.getpid() != self._pid:  # forked DataLoader worker: do not share file handles
            self._files, self._pid = {}, os.getpid()
        pf = self._files.get(path)
        if pf is None:
            if os.path.getsize(path) == 0:
                raise DataError(f"{path}: empty file (0 bytes): expected a Parquet file")
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: not Parquet
                raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
            self._files[path] = pf
        return pf

    def where(self, path: str, row0: int) -> Callable[[int], str]:
        return lambda i: f"{path}: row {row0 + i}"

    def chunks(self, path: str) -> List[ChunkInfo]:
        pf = self._open(path)
        schema = pf.schema_arrow
        names = schema.names
        for spec in self.plan.read_columns:
            if spec.name not in names:
                raise DataError(f"{path}: column {spec.name!r} not found (declared at {spec.key}); the file's columns: {names}")
            t = schema.field(spec.name).type
            if not type_ok(t, spec):
                row, value = self._first_value(pf, spec.name)
                hint = f"the file's column has type {t}" + (", not a list" if spec.is_list and not _is_list(t) else "")
                raise DataError(f"{path}: row {row}: column {spec.name!r} = {value!r}: expected {describe_expected(spec)} ({hint}; declared at {spec.key})")
        md = pf.metadata
        if md.num_rows == 0:
            raise DataError(f"{path}: empty file (0 rows)")
        out: List[ChunkInfo] = []
        row0 = 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n:
                out.append((rg, row0, n))
            row0 += n
        return out

    @staticmethod
    def _first_value(pf, name: str):
        row0 = 0
        for rg in range(pf.metadata.num_row_groups):
            col = pf.read_row_group(rg, columns=[name]).column(0)
            valid = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False)) if len(col) else []
            if len(valid):
                return row0 + int(valid[0]), scalar_text(col[int(valid[0])])
            row0 += len(col)
        return 0, None

    def read(self, path: str, part: int, row0: int, num_rows: int, issues: RowIssues, columns: Optional[List[str]] = None) -> pa.Table:
        pf = self._open(path)
        names = columns or list(dict.fromkeys(s.name for s in self.plan.read_columns))
        try:
            return pf.read_row_group(part, columns=names)
        except Exception as e:  # noqa: BLE001 - a corrupt page
            raise DataError(f"{path}: rows {row0}..{row0 + num_rows - 1} (row group {part}): cannot be read ({type(e).__name__}: {e})") from e

    def time_stats(self, path: str, part: int, column: str) -> Optional[Tuple[int, int]]:
        """(min, max) of an integer request-time column from the row-group statistics, if present."""
        pf = self._open(path)
        idx = pf.schema_arrow.get_field_index(column)
        if idx < 0:
            return None
        try:
            st = pf.metadata.row_group(part).column(idx).statistics
        except Exception:  # noqa: BLE001
            return None
        if st is None or not st.has_min_max or st.null_count:
            return None
        lo, hi = st.min, st.max
        if not isinstance(lo, (int, np.integer)):
            return None
        return int(lo), int(hi)


# -------------------------------------------------------------------------- CSV
_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|(?i:inf|infinity|nan))$"


def _blank_to_null(arr: pa.Array) -> pa.Array:
    arr = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _parse_scalars(strings: pa.Array, dtype: str) -> Tuple[pa.Array, np.ndarray]:
    """Strings → typed array; ``bad [N]`` marks values that do not parse (set to null)."""
    if dtype == "string":
        return pc.if_else(pc.equal(strings, ""), pa.scalar(None, strings.type), strings), np.zeros(len(strings), dtype=bool)
    s = _blank_to_null(strings)
    target = pa.int64() if dtype == "int64" else pa.float64()
    try:
        return pc.cast(s, target), np.zeros(len(s), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    ok = pc.match_substring_regex(s, _INT_RE if dtype == "int64" else _FLOAT_RE).fill_null(True).to_numpy(zero_copy_only=False)
    bad = ~ok
    if dtype == "int64":  # in range? (19+ digit numbers may overflow int64)
        long = pc.greater(pc.utf8_length(s), 18).fill_null(False).to_numpy(zero_copy_only=False) & ok
        for i in np.flatnonzero(long):
            if not -(2**63) <= int(s[int(i)].as_py()) < 2**63:
                bad[i] = True
    s = pc.if_else(pa.array(bad), pa.scalar(None, s.type), s)
    return pc.cast(s, target), bad


# Stand-ins for a delimiter that is not one byte (pyarrow's parser needs one byte): control
# characters, which text data practically never contains; a block holding them all is refused.
_STAND_INS = [bytes([b]) for b in (0x1F, 0x1E, 0x1D, 0x1C, *range(0x01, 0x09), *range(0x0E, 0x1C))]


def _free_byte(data: bytes, taken: str = "") -> Optional[bytes]:
    """The first stand-in byte that occurs neither in ``data`` nor in ``taken`` (None if none is free)."""
    return next((b for b in _STAND_INS if b not in data and b.decode() not in taken), None)


class CsvReader:
    """CSV/TSV files in blocks of lines (see the module docstring)."""

    kind = "csv"

    def __init__(self, plan: FilePlan, csv_cfg, cache_dir: Optional[Path] = None):
        self.plan = plan
        self.cfg = csv_cfg
        self.cache_dir = cache_dir
        self._blocks: Dict[str, np.ndarray] = {}  # path → byte offsets [num_blocks + 1]
        self._names: Dict[str, List[str]] = {}  # path → column names of the file
        self._header_lines = 1 if csv_cfg.header else 0
        self._delimiter = csv_cfg.delimiter.encode("utf-8")
        self._one_byte = len(self._delimiter) == 1  # else the stand-in path (see _STAND_INS)
        self._taken = csv_cfg.list_separator + csv_cfg.quote_char  # never a stand-in

    def where(self, path: str, row0: int) -> Callable[[int], str]:
        return lambda i: f"{path}:{row0 + i + 1 + self._header_lines}"

    def _split_line(self, line: str) -> List[str]:
        """One line (the header) → fields, with the quoting rules of the data lines."""
        quote = self.cfg.quote_char or None
        delimiter, stand_in = self.cfg.delimiter, None
        if not self._one_byte:  # the csv module also takes one character only
            stand_in = (_free_byte(line.encode("utf-8"), self._taken) or b"\x1f").decode()
            line, delimiter = line.replace(delimiter, stand_in), stand_in
        reader = csv.reader([line], delimiter=delimiter, quotechar=quote or '"', quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE)
        fields = next(reader, [])
        return [f.replace(stand_in, self.cfg.delimiter) for f in fields] if stand_in else fields

    def _one_byte_delimiter(self, data: bytes, lines: str) -> Tuple[bytes, str, Optional[str]]:
        """``(data, delimiter for pyarrow, stand-in or None)``: a delimiter of several bytes is
        replaced by a byte absent from ``data`` (``lines`` names the block in errors)."""
        if self._one_byte:
            return data, self.cfg.delimiter, None
        stand_in = _free_byte(data, self._taken)
        if stand_in is None:
            raise DataError(
                f"{lines}: every control character (\\x01-\\x08, \\x0e-\\x1f) occurs in these lines; "
                f"the delimiter {self.cfg.delimiter!r} ({len(self._delimiter)} bytes) needs one of them free (or use a one-byte delimiter)"
            )
        return data.replace(self._delimiter, stand_in), stand_in.decode(), stand_in.decode()

    def _restore_delimiter(self, table: pa.Table, stand_in: str) -> pa.Table:
        """Put the delimiter back where the stand-in ended up inside (quoted) values."""
        cols = [pc.replace_substring(col, stand_in, self.cfg.delimiter) for col in table.columns]
        return pa.table(cols, names=table.column_names)

    def chunks(self, path: str) -> List[ChunkInfo]:
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(min(size, 1 << 20))
        if head[:2] == b"\x1f\x8b":
            raise DataError(f"{path}: gzip-compressed; CSV sources read uncompressed files (gunzip it first)")
        declared = [s.name for s in self.plan.columns]
        if self.cfg.header:
            nl = head.find(b"\n")
            if nl < 0 and size > len(head):
                raise DataError(f"{path}:1: header line longer than 1 MiB")
            first = head[: nl if nl >= 0 else len(head)].decode("utf-8-sig", errors="replace").rstrip("\r")  # BOM-tolerant
            names = self._split_line(first)
            data_start = nl + 1 if nl >= 0 else size
            for spec in self.plan.read_columns:
                if spec.name not in names:
                    raise DataError(f"{path}:1: column {spec.name!r} not in the header (declared at {spec.key}); header columns: {names}")
        else:
            names = declared
            data_start = 0
        self._names[path] = names
        offsets, total = self._index(path, size, data_start)
        if total == 0:
            raise DataError(f"{path}: empty file (no data rows" + (" after the header)" if self.cfg.header else ")"))
        self._blocks[path] = offsets
        r = self.cfg.rows_per_block
        return [(b, b * r, min(r, total - b * r)) for b in range(len(offsets) - 1)]

    def _index(self, path: str, size: int, data_start: int) -> Tuple[np.ndarray, int]:
        """Byte offsets of every ``rows_per_block``-th line start (and the end), and the line count."""
        r = self.cfg.rows_per_block
        cache_file = None
        if self.cache_dir is not None and size > (64 << 20):
            st = os.stat(path)
            key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{r}|{data_start}".encode()).hexdigest()
            cache_file = Path(self.cache_dir) / "csv-index" / f"{key}.npy"
            if cache_file.is_file():
                arr = np.load(cache_file)
                return arr[:-1], int(arr[-1])
        starts = [data_start]  # start of line 0, r, 2r, ... (+ possibly the end of the file)
        lines = 0
        last_byte = b""
        with open(path, "rb") as f:
            f.seek(data_start)
            pos = data_start
            while True:
                buf = f.read(16 << 20)
                if not buf:
                    break
                nl = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + pos
                done = lines + np.arange(1, len(nl) + 1)  # lines completed at each newline
                starts += (nl[done % r == 0] + 1).tolist()
                lines += len(nl)
                pos += len(buf)
                last_byte = buf[-1:]
        if pos > data_start and last_byte != b"\n":
            lines += 1  # a last line without a newline
        num_blocks = -(-lines // r)
        offsets = np.asarray(starts[:num_blocks] + [size], dtype=np.int64)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, np.append(offsets, lines))
            os.replace(tmp, cache_file)
        return offsets, lines

    def read_strings(self, path: str, part: int, row0: int, num_rows: int, issues: RowIssues) -> pa.Table:
        """The block as string columns (all declared columns), rows aligned with the file's lines."""
        offsets = self._blocks.get(path)
        if offsets is None:
            self.chunks(path)
            offsets = self._blocks[path]
        start, end = int(offsets[part]), int(offsets[part + 1])
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        names = self._names[path]
        read_names = list(dict.fromkeys(spec.name for spec in self.plan.read_columns))
        lines = f"{path}: lines {row0 + 1 + self._header_lines}..{row0 + num_rows + self._header_lines}"
        data, delimiter, stand_in = self._one_byte_delimiter(data, lines)
        invalid: List[Tuple[Optional[int], int, int, str]] = []

        def handler(row) -> str:
            invalid.append((row.number, row.expected_columns, row.actual_columns, row.text))
            return "skip"

        try:
            table = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=max(len(data) + 1, 1 << 20)),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter,
                    quote_char=self.cfg.quote_char or False,
                    newlines_in_values=False,
                    ignore_empty_lines=False,
                    invalid_row_handler=handler,
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=read_names,
                    column_types={col_name: pa.string() for col_name in read_names},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as e:
            msg = str(e).replace(stand_in, self.cfg.delimiter) if stand_in else str(e)
            raise DataError(f"{lines}: cannot be parsed as CSV ({msg})") from e
        if stand_in and self.cfg.quote_char and self.cfg.quote_char.encode("utf-8") in data:
            # outside quotes every stand-in split fields; one left in a value was a quoted delimiter
            table = self._restore_delimiter(table, stand_in)
        if invalid:
            keep = np.ones(num_rows, dtype=bool)
            for number, expected, actual, text in invalid:
                i = (number - 1) if number is not None else self._find_line(data, text)
                keep[i] = False
                shown = text.replace(stand_in, self.cfg.delimiter) if stand_in else text
                issues.fail(i, f"row has {actual} fields: expected {expected} separated by {self.cfg.delimiter!r} ({shown[:60]!r})")
            take = np.full(num_rows, -1, dtype=np.int64)
            take[keep] = np.arange(int(keep.sum()))
            idx = pa.array(take, mask=~keep)
            table = table.take(idx)
        if table.num_rows != num_rows:
            raise DataError(
                f"{path}: lines {row0 + 1 + self._header_lines}..: expected {num_rows} rows in this block, parsed {table.num_rows}; "
                "fields must not contain newlines"
            )
        return table

    @staticmethod
    def _find_line(data: bytes, text: str) -> int:
        for i, line in enumerate(data.split(b"\n")):
            if line.rstrip(b"\r").decode("utf-8", errors="replace") == text:
                return i
        return 0

    def read(self, path: str, part: int, row0: int, num_rows: int, issues: RowIssues, columns: Optional[List[str]] = None) -> pa.Table:
        raw = self.read_strings(path, part, row0, num_rows, issues)
        cols: Dict[str, pa.Array] = {}
        for spec in self.plan.read_columns:
            if spec.name in cols or (columns is not None and spec.name not in columns):
                continue
            strings = raw.column(spec.name).combine_chunks()
            cols[spec.name] = self._convert(strings, spec, issues)
        return pa.table(cols)

    def _convert(self, strings: pa.Array, spec: ColumnSpec, issues: RowIssues) -> pa.Array:
        if spec.role == "request_time" and spec.dtype == "string":
            return pc.if_else(pc.equal(strings, ""), pa.scalar(None, strings.type), strings)
        if not spec.is_list:
            typed, bad = _parse_scalars(strings, spec.dtype)
            issues.flag(bad, spec.name, lambda i: strings[i].as_py(), describe_expected(spec))
            return typed
        s = pc.if_else(pc.equal(strings, ""), pa.scalar(None, strings.type), strings)
        lists = pc.split_pattern(s, self.cfg.list_separator)
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(lists)
        values, bad_el = _parse_scalars(flat, spec.element_dtype)
        if bad_el.any():
            parent = np.repeat(np.arange(len(lengths)), lengths)
            rows = np.zeros(len(lengths), dtype=bool)
            rows[parent[bad_el]] = True
            first_el = {}
            for e in np.flatnonzero(bad_el)[::-1]:
                first_el[int(parent[e])] = int(e)
            issues.flag(
                rows,
                spec.name,
                lambda i: f"{strings[i].as_py()} (element {flat[first_el[i]].as_py()!r})",
                f"a {self.cfg.list_separator!r}-separated list of {spec.element_dtype}",
            )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)

    def time_stats(self, path: str, part: int, column: str) -> Optional[Tuple[int, int]]:
        return None


def make_reader(source: str, plan: FilePlan, csv_cfg, cache_dir: Optional[Path] = None):
    if source == "parquet":
        return ParquetReader(plan, csv_cfg, cache_dir)
    if source == "csv":
        return CsvReader(plan, csv_cfg, cache_dir)
    raise ValueError(f"no reader for data.source={source!r}")
