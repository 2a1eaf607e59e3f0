"""Raw ids (strings or integers of any size) → embedding-table rows.

Every id is first reduced to its **canonical text** (strings as they are; integers as
decimal digits, so ``123`` in Parquet and ``"123"`` or ``"0123"`` in a CSV are the same id)
and then to a 64-bit **fingerprint**::

    fingerprint(id) = splitmix64(fnv1a64(utf8(canonical_text(id))))

FNV-1a (offset 0xcbf29ce484222325, prime 0x100000001b3) over the UTF-8 bytes, then the
SplitMix64 finaliser; both fixed, so the result is the same in every process, run,
machine and Python version (Python's ``hash()`` is salted per process and never used).

Row 0 of every table means **missing** (null or empty id). Mappings (``id_mapping``):

* ``hash`` (default): ``row = 1 + fingerprint % (num_embeddings - 1)``;
* ``vocab``: rows from a vocabulary built by ``kunlun data vocab`` over the train split:
  rows ``1 .. oov_buckets`` hold out-of-vocabulary ids (``1 + fingerprint % oov_buckets``),
  then the vocabulary's ids in file order (most frequent first);
* ``identity``: integer ids are the rows and must lie in ``[0, num_embeddings)``
  (``data.id_policy=modulo`` wraps them instead).

Vectorised with numpy over Arrow arrays: no Python loop over ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.errors import DataError

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
VOCAB_FORMAT = 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def canonical_text(arr: pa.Array) -> pa.Array:
    """Integers → decimal text, strings unchanged (empty strings → null); a ``large_string`` array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_integer(arr.type):
        return pc.cast(arr, pa.large_string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.large_string())
        return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.large_string()), arr)
    raise TypeError(f"ids must be integers or strings, got {arr.type}")


def fingerprint(texts: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """``(fingerprints uint64 [N], valid bool [N])`` of a string array (nulls: valid False, fingerprint 0)."""
    if not pa.types.is_large_string(texts.type):
        texts = pc.cast(texts, pa.large_string())
    n = len(texts)
    valid = np.ones(n, dtype=bool) if texts.null_count == 0 else texts.is_valid().to_numpy(zero_copy_only=False)
    bufs = texts.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[texts.offset : texts.offset + n + 1] if n else np.zeros(1, np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = (offsets[1:] - starts) * valid
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    if n:
        active = np.flatnonzero(lengths > 0)
        k = 0
        with np.errstate(over="ignore"):
            while active.size:
                h[active] = (h[active] ^ data[starts[active] + k].astype(np.uint64)) * FNV_PRIME
                k += 1
                active = active[lengths[active] > k]
    out = _splitmix64(h)
    out[~valid] = 0
    return out, valid


def id_fingerprints(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Fingerprints of raw ids (integers or strings)."""
    return fingerprint(canonical_text(arr))


# ------------------------------------------------------------------------ mappers
class HashMapper:
    kind = "hash"

    def __init__(self, num_embeddings: int):
        self.num_embeddings = int(num_embeddings)

    def map(self, arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows int64 [N], bad bool [N])``; hashing never fails."""
        fp, valid = id_fingerprints(arr)
        rows = (np.uint64(1) + fp % np.uint64(self.num_embeddings - 1)).astype(np.int64)
        rows[~valid] = 0
        return rows, np.zeros(len(rows), dtype=bool)


class IdentityMapper:
    kind = "identity"

    def __init__(self, num_embeddings: int, id_policy: str = "error"):
        self.num_embeddings = int(num_embeddings)
        self.id_policy = id_policy

    def map(self, arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(len(arr), dtype=bool)
        if pa.types.is_unsigned_integer(arr.type):
            big = pc.greater(arr, pa.scalar(np.iinfo(np.int64).max, arr.type)).fill_null(False).to_numpy(zero_copy_only=False)
            arr = pc.if_else(big, pa.scalar(None, arr.type), arr)
        else:
            big = np.zeros(len(arr), dtype=bool)
        values = pc.cast(arr, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        n = self.num_embeddings
        if self.id_policy == "modulo":
            return np.where(valid, np.mod(values, n), 0), big
        bad = valid & ((values < 0) | (values >= n) | big)
        return np.where(valid & ~bad, values, 0), bad


def zero_id_warning(table: str, column: str, count: int, id_policy: str = "error") -> str:
    """The advice for ``count`` values of an identity ``column`` that land on row 0, the row of
    missing (null/empty) ids: such ids silently share one embedding with every missing value."""
    which = "equal to 0" + (" (or a multiple of num_embeddings: id_policy=modulo)" if id_policy == "modulo" else "")
    return (
        f"table {table!r} (id_mapping=identity): column {column!r} has {count:,} ids {which}; row 0 is reserved "
        "for missing (null/empty) ids, so they share its embedding. Shift the ids by one (id + 1, and "
        "num_embeddings + 1) or map the table with id_mapping: hash or vocab"
    )


class VocabMapper:
    kind = "vocab"

    def __init__(self, fingerprints: np.ndarray, oov_buckets: int, num_embeddings: int):
        order = np.argsort(fingerprints, kind="stable")
        self.sorted_fp = fingerprints[order]
        self.rows = (1 + oov_buckets + order).astype(np.int64)
        self.oov_buckets = int(oov_buckets)
        self.num_embeddings = int(num_embeddings)

    def map(self, arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
        fp, valid = id_fingerprints(arr)
        pos = np.searchsorted(self.sorted_fp, fp)
        pos_c = np.minimum(pos, len(self.sorted_fp) - 1) if len(self.sorted_fp) else pos
        hit = (pos < len(self.sorted_fp)) & (self.sorted_fp[pos_c] == fp) if len(self.sorted_fp) else np.zeros(len(fp), bool)
        oov = (np.uint64(1) + fp % np.uint64(self.oov_buckets)).astype(np.int64)
        rows = np.where(hit, self.rows[pos_c] if len(self.sorted_fp) else 0, oov)
        rows[~valid] = 0
        return rows, np.zeros(len(rows), dtype=bool)

    def in_vocab(self, arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
        """``(hit, valid)`` per id (for reports: the OOV rate)."""
        rows, _ = self.map(arr)
        valid = rows != 0
        return valid & (rows > self.oov_buckets), valid


# ------------------------------------------------------------------------ vocab files
def vocab_path(vocab_dir: Path, table: str) -> Path:
    return Path(vocab_dir).expanduser() / f"{table}.vocab.parquet"


def write_vocab(vocab_dir: Path, table: str, ids: pa.Array, counts: np.ndarray, meta: Dict) -> Dict:
    """Write ``<vocab_dir>/<table>.vocab.parquet`` (columns ``id``, ``count``; row order = table
    order) and update ``vocab.json``; returns the table's metadata entry."""
    import pyarrow.parquet as pq

    vocab_dir = Path(vocab_dir).expanduser()
    vocab_dir.mkdir(parents=True, exist_ok=True)
    path = vocab_path(vocab_dir, table)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"id": pc.cast(ids, pa.large_string()), "count": pa.array(counts, pa.int64())}), tmp)
    tmp.replace(path)
    entry = dict(meta, entries=int(len(ids)), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), file=path.name)
    index_path = vocab_dir / "vocab.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"format": VOCAB_FORMAT, "tables": {}}
    index["tables"][table] = entry
    tmp_index = index_path.with_suffix(".tmp")
    tmp_index.write_text(json.dumps(index, indent=2, sort_keys=True))
    tmp_index.replace(index_path)
    return entry


def load_vocab(vocab_dir: Path, table: str, oov_buckets: int, cap: int = 0) -> Tuple[VocabMapper, Dict]:
    """The mapper of one vocab table; ``cap`` > 0 keeps at most ``cap`` rows in all."""
    import pyarrow.parquet as pq

    path = vocab_path(vocab_dir, table)
    if not path.is_file():
        raise DataError(
            f"{path}: vocabulary of table {table!r} not found (id_mapping=vocab); build it with "
            f"`kunlun data vocab --config <job.yaml>` (data.files.vocab_dir={str(vocab_dir)!r})"
        )
    try:
        t = pq.read_table(path, columns=["id"])
    except Exception as e:  # noqa: BLE001 - any Arrow/IO error is a bad vocabulary file
        raise DataError(f"{path}: not a readable vocabulary file ({e})") from e
    ids = t.column("id").combine_chunks()
    if cap:
        ids = ids.slice(0, max(0, cap - 1 - oov_buckets))
    fp, valid = fingerprint(pc.cast(ids, pa.large_string()))
    if not valid.all():
        raise DataError(f"{path}: row {int(np.flatnonzero(~valid)[0])}: column 'id' is null: expected an id")
    size = 1 + oov_buckets + len(fp)
    info = {"path": str(path), "entries": int(len(fp)), "num_embeddings": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return VocabMapper(fp, oov_buckets, size), info


def build_mappers(plan, files_cfg, id_policy: str = "error", load_vocabularies: bool = True) -> Tuple[Dict[str, object], Dict[str, int], Dict[str, Dict]]:
    """``(table → mapper, table → rows, vocab table → file info)`` for a :class:`FilePlan`.

    ``load_vocabularies=False`` (while building them) maps every id of a vocab table to OOV."""
    mappers: Dict[str, object] = {}
    sizes: Dict[str, int] = {}
    vocab_info: Dict[str, Dict] = {}
    for name, t in plan.tables.items():
        if t.id_mapping == "hash":
            mappers[name] = HashMapper(t.num_embeddings)
        elif t.id_mapping == "identity":
            mappers[name] = IdentityMapper(t.num_embeddings, id_policy)
        elif not load_vocabularies:
            mappers[name] = VocabMapper(np.zeros(0, dtype=np.uint64), files_cfg.oov_buckets, 1 + files_cfg.oov_buckets)
        else:
            mapper, info = load_vocab(Path(files_cfg.vocab_dir), name, files_cfg.oov_buckets, t.num_embeddings)
            mappers[name] = mapper
            vocab_info[name] = info
        sizes[name] = mappers[name].num_embeddings  # type: ignore[attr-defined]
    return mappers, sizes, vocab_info


def fnv1a64_reference(text: str) -> int:
    """Pure-Python reference of :func:`fingerprint` for one string (tests, other tools)."""
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)
