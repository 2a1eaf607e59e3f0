"""``kunlun predict``: score every example of a split, or of given files, with a saved checkpoint, to Parquet.

    kunlun predict --run-dir R [--checkpoint latest|best|PATH|name|step] [--split eval|valid|test | --input GLOB]
                   --output DIR [--overwrite | --resume] [--rows-per-part N] [--columns a,b,c] [--no-progress] [key=value ...]
    torchrun --nproc_per_node N -m kunlun.launch.predict_cli --run-dir R --output DIR ...   (every rank)
    torchx run -s local_cwd ./launch/components.py:predict -j 1x2 --run_dir R --output DIR [--input GLOB] ...

The checkpoint is chosen and loaded exactly like ``kunlun eval`` does (same ``--checkpoint``
forms, ``R/config.yaml`` plus ``key=value`` overrides, any world size: DCP reshards it),
and scored with the same forward pass as the trainer's ``evaluate()``. Unlike the
validation pass, ``trainer.eval_max_batches`` does not apply: every example is scored
exactly once. Rank ``r`` scores its slice of each evaluation batch (``data.eval_batch_size``
examples over all ranks); the padding that completes the last batch is dropped.

What is scored:

* ``--split test`` (default) / ``eval``: that split of the run's data; ``example`` is the
  example's index in the split.
* ``--input GLOB`` (file-source runs, ``data.source=parquet|csv``; a file, directory or glob,
  ``**`` recursing): those files, read with the run's schema and format (``data.*``
  overrides apply), every row in file order (natural sort of the paths); ``example`` is the
  row's index in that sequence. They are indexed and (``data.files.validate``) checked row by
  row on every rank before the model is built. Files without the label column(s) are scored
  too (all files or none may lack them): the labels are decoded as 0 and not written. The
  model is built on the input files' source (the schema comes from the config), so the run's
  own data files are not read.

Written under ``DIR`` (made if missing):

* ``part-r<rank>-<k>.parquet``: part ``k`` of rank ``r`` holds that rank's rows of global
  batches ``[k*B, (k+1)*B)`` with ``B = ceil(rows-per-part / (eval_batch_size / world size))``
  (so about ``--rows-per-part`` rows, rounded up to whole batches; a rank with no rows in
  those batches writes no part). Columns: ``example`` (int64), ``label`` (float32, omitted
  for label-less ``--input``; NaN where a label is missing) and ``score`` (float64: the sigmoid
  probability of a binary task, the prediction of a regression task); with several tasks
  (``model.tasks``, by default one per label) ``label/<task>`` and ``score/<task>`` per task;
  then the ``--columns``. Each part is
  written under a temporary name and renamed.
* ``_PREDICT.json`` (rank 0, at start): the request (checkpoint, split or input files, world
  size, eval batch size, rows per part, columns, overrides, examples), which ``--resume`` checks.
* ``_SUCCESS.json`` (rank 0, after every rank finished): rows, rows per rank, parts, columns,
  checkpoint, step, split, input, world size, overrides, parts kept by ``--resume``, seconds.

``--columns a,b,c`` (file sources only): copy those raw columns of each example's file row
into the parts, as stored (no id hashing, transform or fill; they need not be declared in the
schema): Parquet values in the file's Arrow types, CSV fields as their text (strings, quotes
removed, an empty field is ``""``).
A column some file lacks, or one named like an output column, is refused (exit 2).

An existing non-empty ``DIR`` is refused (exit 2) unless ``--overwrite`` (the previous
parts, ``_PREDICT.json`` and ``_SUCCESS.json`` are deleted first) or ``--resume`` (an
interrupted run of the same request, per ``_PREDICT.json``: complete parts are kept and only
the missing ones scored, so the result equals an uninterrupted run's; a different request,
world size included, is refused naming what differs). A folder holding anything else is refused either way.

Progress: a tqdm bar of rows on rank 0 when stderr is a TTY (``--no-progress`` turns it off)
and a log line per part written.

Exit status: 0 done; 2 bad arguments, run folder, checkpoint, config, data, columns or output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from kunlun.data.errors import DataError
from kunlun.launch.eval_cli import checkpoint_job, run_on_checkpoint
from kunlun.trainer.config import ConfigError

log = logging.getLogger("kunlun")

SUCCESS = "_SUCCESS.json"
REQUEST = "_PREDICT.json"
FILE_SOURCES = ("parquet", "csv")
# What a previous ``kunlun predict`` may have left in DIR (--overwrite deletes only these).
_OWN_FILE = re.compile(r"^(\.tmp-)?part-r\d+-\d+\.parquet$|^_(SUCCESS|PREDICT)\.json(\.tmp)?$")
# Testing hook: a process exits (status 3, no cleanup, like a kill) after writing this many parts.
STOP_AFTER_PARTS_ENV = "KUNLUN_PREDICT_STOP_AFTER_PARTS"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunlun predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", "--run_dir", dest="run_dir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest (default) | best | a checkpoint folder | a name or step in RUN_DIR/checkpoints")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--split", default=None, help="test (default) | eval (the validation split; 'valid' is accepted too)")
    what.add_argument("--input", default=None, help="score these Parquet/CSV files (a file, directory or glob) instead of a split")
    p.add_argument("--output", required=True, help="folder for the Parquet parts, _PREDICT.json and _SUCCESS.json")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace the parts of an earlier kunlun predict in --output")
    again.add_argument("--resume", action="store_true", help="finish an interrupted kunlun predict of the same request in --output")
    p.add_argument("--rows-per-part", "--rows_per_part", dest="rows_per_part", type=int, default=1_000_000, help="rows per Parquet part (default 1000000)")
    p.add_argument("--columns", default="", help="comma-separated raw columns of the input rows to copy into the parts (file sources)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides on top of RUN_DIR/config.yaml")
    return p.parse_args(argv)


def parse_columns(spec: str) -> List[str]:
    """``--columns a,b,c`` → ``["a", "b", "c"]``; empty names and repeats are refused."""
    if not spec.strip():
        return []
    names = [c.strip() for c in spec.split(",")]
    if any(not c for c in names):
        raise ConfigError(f"--columns {spec!r}: expected comma-separated column names, got an empty name")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ConfigError(f"--columns {spec!r}: column {repeated[0]!r} is named twice")
    return names


def check_output(out: Path, overwrite: bool, resume: bool = False, request: Optional[dict] = None) -> Optional[dict]:
    """Refuse a non-empty ``out`` (without ``--overwrite`` / ``--resume``), one holding files
    that are not ``kunlun predict`` output, and (``--resume``) one written for a different
    request than ``request``. Returns the earlier ``_PREDICT.json`` that ``--resume`` continues
    (None: start afresh). Runs on every rank before anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return None
    if not (overwrite or resume):
        raise ConfigError(
            f"--output {out}: the folder exists and is not empty ({len(entries)} entries, e.g. {entries[:3]}); "
            "pass --overwrite to replace it, or --resume to finish an interrupted kunlun predict of the same request"
        )
    flag = "--overwrite" if overwrite else "--resume"
    foreign = [e for e in entries if not _OWN_FILE.match(e)]
    if foreign:
        raise ConfigError(f"--output {out}: {flag} refused: the folder holds files kunlun predict did not write: {foreign[:5]}")
    if overwrite:
        return None
    path = out / REQUEST
    if not path.is_file():
        parts = [e for e in entries if e.startswith("part-")]
        if not parts:
            return None  # only temporary files: nothing to keep
        raise ConfigError(f"--output {out}: --resume refused: {len(parts)} parts but no {REQUEST} to tell which request wrote them; use --overwrite")
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--output {out}: --resume refused: {path} is unreadable ({e}); use --overwrite") from e
    assert request is not None
    differ = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in request.items() if old.get(k) != v]
    if differ:
        raise ConfigError(f"--output {out}: --resume refused: the folder holds parts of a different request ({REQUEST}): " + "; ".join(differ))
    return old


def _file_columns(cfg_data, path: str) -> List[str]:
    """The column names of a Parquet file or a CSV file's header (headerless CSV: the declared columns)."""
    if cfg_data.source == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: not Parquet
            raise DataError(f"--input: {path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    from kunlun.data.file_schema import resolve
    from kunlun.data.formats import make_reader

    plan = resolve(cfg_data.files, "csv")
    if not cfg_data.files.csv.header:
        return [c.name for c in plan.columns]
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
    return make_reader("csv", plan, cfg_data.files.csv)._split_line(first)  # the data lines' quoting rules


def input_files(pattern: str, cfg) -> dict:
    """``--input GLOB`` → ``{files, labels}``: the matched files (absolute, natural order) and
    whether they carry the label columns (all or none of them must)."""
    from kunlun.data.file_schema import FileSchemaError, expand, resolve

    if cfg.data.source not in FILE_SOURCES:
        raise ConfigError(f"--input {pattern!r}: scores files only for runs on file data (data.source=parquet|csv); this run has data.source={cfg.data.source}")
    files = [os.path.abspath(f) for f in expand(pattern)]
    if not files:
        raise ConfigError(f"--input {pattern!r}: matches no files (expected a {cfg.data.source} file, a directory or a glob such as /data/day=*/*.parquet)")
    try:
        plan = resolve(cfg.data.files, cfg.data.source)
    except FileSchemaError as e:
        raise ConfigError(str(e), key=e.key) from e
    labels = [c.name for c in plan.labels]
    has = {f: all(name in _file_columns(cfg.data, f) for name in labels) for f in files}
    if len(set(has.values())) > 1:
        with_, without = [f for f in files if has[f]], [f for f in files if not has[f]]
        raise ConfigError(f"--input {pattern!r}: {with_[0]} has the label column(s) {labels} but {without[0]} lacks them; score the two kinds separately")
    return {"files": files, "labels": has[files[0]]}


def prepare_input(spec: dict, cfg) -> None:
    """Build ``spec["source"]``, the source the ``--input`` files are scored from (indexed and,
    with ``data.files.validate``, checked row by row now, before the model: bad files stop
    here, named as they are). The trainer is built on it (``Trainer(source=...)``), so the
    run's own data files are not read at all."""
    spec["source"] = input_source(copy.deepcopy(cfg.data), spec)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.output).expanduser().resolve()
    job: Dict = {}

    def prepare():
        if args.rows_per_part <= 0:
            raise ConfigError(f"--rows-per-part {args.rows_per_part}: must be positive")
        columns = parse_columns(args.columns)
        ns = copy.copy(args)
        ns.split = args.split or "test"
        split, cfg = checkpoint_job(ns)
        if columns and cfg.data.source not in FILE_SOURCES:
            raise ConfigError(
                f"--columns {args.columns!r}: pass-through columns need a file source (data.source=parquet|csv); "
                f"data.source={cfg.data.source} generates its examples, there are no raw rows to copy"
            )
        source_input = input_files(args.input, cfg) if args.input else None
        request = {
            "checkpoint": str(cfg.checkpoint.resume),
            "split": None if source_input else split,
            "input": source_input["files"] if source_input else None,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "eval_batch_size": int(cfg.data.eval_batch_size),
            "rows_per_part": int(args.rows_per_part),
            "columns": columns,
            "overrides": list(args.overrides),
        }
        old = check_output(out, args.overwrite, args.resume, request)
        if source_input:
            prepare_input(source_input, cfg)
        job.update(request=request, old=old, input=source_input, columns=columns, progress=args.progress)
        return (split, cfg, source_input["source"]) if source_input else (split, cfg)

    return run_on_checkpoint("kunlun predict", prepare, lambda trainer, split: predict(trainer, split, out, job))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def input_source(data_cfg, spec: dict):
    """The :class:`FileSource` over the ``--input`` files ``spec["files"]``, as split ``test``."""
    from kunlun.data.sources.files import FileSource, Segments

    class InputSource(FileSource):
        """Every row of ``spec["files"]`` as split ``test``, in file order; label columns the
        files lack (``spec["labels"]`` false) are read as 0."""

        def _build_index(self, wanted) -> None:
            if not spec["labels"]:
                self.reader = _ZeroLabels(self.source, self.plan, self.files_cfg.csv)
            parts = [(c, 0, self.chunks[c].num_rows, None) for path in spec["files"] for c in self._add_file(path)]
            self._segments["test"] = Segments.build(parts)

    return InputSource(data_cfg, splits=("test",))


class _ZeroLabels:
    """A Parquet/CSV reader for files without the label columns: reads the rest as declared
    and adds each label column as int64 zeros (decoded as label 0; ``predict`` does not write them)."""

    def __init__(self, source: str, plan, csv_cfg):
        import dataclasses

        from kunlun.common import default_cache_dir
        from kunlun.data.formats import make_reader

        self.labels = [c.name for c in plan.labels]
        columns = [dataclasses.replace(c, role="ignore") if c.role == "label" else c for c in plan.columns]
        self.inner = make_reader(source, dataclasses.replace(plan, columns=columns), csv_cfg, default_cache_dir())

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, path, part, row0, num_rows, issues, columns=None):
        import numpy as np
        import pyarrow as pa

        rest = None if columns is None else [c for c in columns if c not in self.labels]
        table = self.inner.read(path, part, row0, num_rows, issues, columns=rest)
        for name in self.labels:
            if columns is None or name in columns:
                table = table.append_column(name, pa.array(np.zeros(table.num_rows, dtype=np.int64)))
        return table


def predict(trainer, split: str, out: Path, job: dict) -> dict:
    """Score every example of ``split`` (or the ``--input`` files: split ``test`` of their
    source) into Parquet parts under ``out`` (a collective: every rank); rank 0 writes
    ``_PREDICT.json`` first and ``_SUCCESS.json`` once every rank has finished."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tqdm import tqdm

    from kunlun.trainer.checkpoint import write_json_atomic

    rank, world = trainer.info.rank, trainer.info.world_size
    request, old, columns = job["request"], job["old"], job["columns"]
    if world != request["world_size"]:
        raise ConfigError(f"WORLD_SIZE={request['world_size']} but the process group has {world} ranks")
    t0 = time.time()
    source = trainer.source  # the --input files' source when given (Trainer(source=...))
    tasks = trainer.tasks
    labels = [t.name for t in tasks]
    binary = np.array([t.type == "binary" for t in tasks])
    write_labels = job["input"] is None or job["input"]["labels"]
    names = [("label", "score")] if len(labels) == 1 else [(f"label/{n}", f"score/{n}") for n in labels]
    out_columns = ["example", *([n for n, _ in names] if write_labels else []), *[s for _, s in names]]
    for name in columns:
        if name in out_columns:
            raise ConfigError(f"--columns: {name!r} is also an output column of kunlun predict ({out_columns}); it cannot be passed through")
    for path in source.split_files(split) if columns else []:
        have = source.file_columns(path)
        missing = [c for c in columns if c not in have]
        if missing:
            raise ConfigError(f"--columns: column {missing[0]!r} not found in {path}; the file's columns: {have}")

    # The part layout: global batch i holds positions [i*G, (i+1)*G), rank r the slice
    # [i*G + r*L, i*G + (r+1)*L); part k = batches [k*B, (k+1)*B). Independent of what was
    # scored before, so a resumed run writes exactly the parts of an uninterrupted one.
    n = source.num_examples(split)
    if n <= 0:
        raise DataError(f"split {split!r} has no examples to score")
    G = int(trainer.cfg.data.eval_batch_size)
    L = G // world
    num_batches = -(-n // G)
    B = -(-request["rows_per_part"] // L)
    num_parts = -(-num_batches // B)
    firsts = np.arange(num_batches, dtype=np.int64)[:, None] * G + np.arange(world, dtype=np.int64)[None, :] * L
    rows_bw = np.clip(n - firsts, 0, L)  # [batches, ranks]: valid rows of each rank in each batch
    rows_kr = np.add.reduceat(rows_bw, np.arange(0, num_batches, B), axis=0)  # [parts, ranks]
    if old is not None and old.get("split_examples") != n:
        raise ConfigError(f"--output {out}: --resume refused: {REQUEST} records {old.get('split_examples')} examples, the data now has {n}")

    def part_name(k: int) -> str:
        return f"part-r{rank}-{k:05d}.parquet"

    if rank == 0:  # check_output allowed only our own files here
        out.mkdir(parents=True, exist_ok=True)
        for p in out.iterdir():
            if _OWN_FILE.match(p.name) and (old is None or not p.name.startswith("part-")):
                p.unlink()  # --resume keeps finished parts only
        write_json_atomic(out / REQUEST, {**request, "split_examples": int(n)})
    _barrier()

    def finished(k: int) -> bool:
        want = int(rows_kr[k, rank])
        if want == 0:
            return True
        path = out / part_name(k)
        if old is None or not path.is_file():
            return False
        try:
            return pq.read_metadata(path).num_rows == want
        except Exception:  # noqa: BLE001 - a damaged part is scored again
            return False

    # A part is skipped only when every rank has it: forward passes are collectives.
    done = np.all(np.asarray(_all_gather([finished(k) for k in range(num_parts)]), dtype=bool).reshape(-1, num_parts), axis=0)
    todo = [k for k in range(num_parts) if not done[k]]
    kept = int((rows_kr[done] > 0).sum())  # part files (all ranks) left as they were
    if old is not None:
        log.info("--resume: %d of %d parts complete on every rank in %s; scoring the other %d", num_parts - len(todo), num_parts, out, len(todo))
    stop_after = int(os.environ.get(STOP_AFTER_PARTS_ENV, "0") or 0)
    written = 0
    bar = tqdm(
        total=n,
        initial=int(n - rows_kr[todo].sum()),
        desc="predict",
        unit="row",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (rank == 0 and job["progress"] and sys.stderr.isatty()),
    )

    def write_part(k: int, pending: list) -> None:
        nonlocal written
        if not pending:
            return
        example = np.concatenate([p[0] for p in pending])
        lab = np.concatenate([p[1] for p in pending])
        score = np.concatenate([p[2] for p in pending])
        assert len(example) == rows_kr[k, rank], (k, len(example), rows_kr[k, rank])
        cols = {"example": pa.array(example, pa.int64())}
        if write_labels:
            for j, (lname, _) in enumerate(names):
                cols[lname] = pa.array(lab[:, j], pa.float32())
        for j, (_, sname) in enumerate(names):
            cols[sname] = pa.array(score[:, j], pa.float64())
        table = pa.table(cols)
        if columns:
            raw = source.read_raw(split, example, columns)
            for name in columns:
                table = table.append_column(name, raw.column(name))
        name = part_name(k)
        tmp = out / f".tmp-{name}"
        pq.write_table(table, tmp)
        os.replace(tmp, out / name)
        written += 1
        log.info("part %s: %d rows (examples %d..%d), %.1fs since start", name, len(example), example.min(), example.max(), time.time() - t0)
        if stop_after and written >= stop_after:
            log.warning("%s=%d: stopping after %d parts, as if killed", STOP_AFTER_PARTS_ENV, stop_after, written)
            logging.shutdown()
            os._exit(3)

    trainer._agree_replicas()  # as evaluate(): 2D replicas hold the same weights
    trainer.model.eval()
    # Consecutive parts to score share one loader (DataLoader workers keep prefetching).
    runs: List[List[int]] = []
    for k in todo:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    with torch.no_grad():
        for run in runs:
            first = run[0] * B
            stop = min(num_batches, (run[-1] + 1) * B)
            ds, loader = trainer._loader(split, examples_consumed=first * G, max_batches=stop - first)
            assert not ds.shuffle, "evaluation splits are read in order"
            pending: List[tuple] = []
            for j, batch in enumerate(loader):
                i = first + j  # the global batch index
                _, model_out = trainer.model(batch.to(trainer.info.device))
                logits, lab = model_out.logits, model_out.labels
                example = np.arange(i * G + rank * L, i * G + (rank + 1) * L, dtype=np.int64)
                valid = example < n  # positions past the end are padding
                if valid.any():
                    raw = logits.detach().double().cpu().reshape(L, len(labels))
                    score = np.where(binary, torch.sigmoid(raw).numpy(), raw.numpy())  # probability; regression: the prediction
                    lab_np = lab.detach().float().cpu().reshape(L, len(labels)).numpy()
                    pending.append((example[valid], lab_np[valid], score[valid]))
                bar.update(int(rows_bw[i].sum()))
                if (i + 1) % B == 0 or i + 1 == num_batches:
                    write_part(i // B, pending)
                    pending = []
    trainer.model.train()
    bar.close()

    mine = [part_name(k) for k in range(num_parts) if rows_kr[k, rank]]
    lost = [p for p in mine if not (out / p).is_file()]
    if lost:
        raise DataError(f"--output {out}: parts {lost[:3]} vanished while kunlun predict ran")
    per_rank = _all_gather((int(rows_kr[:, rank].sum()), mine))
    ckpt = trainer.resumed_from
    spec = job["input"]
    report = {
        "rows": int(sum(r for r, _ in per_rank)),
        "rows_per_rank": [int(r) for r, _ in per_rank],
        "parts": sorted(name for _, names_ in per_rank for name in names_),
        "parts_kept": kept,
        "split_examples": int(n),
        "checkpoint": str(ckpt),
        "step": int(trainer.step),
        "split": None if spec else split,
        "input": spec["files"] if spec else None,
        "world_size": world,
        "columns": out_columns + columns,
        "overrides": list(request["overrides"]),
        "seconds": round(time.time() - t0, 3),  # this invocation: scoring, writing, checks
    }
    if report["rows"] != n:
        raise DataError(f"kunlun predict scored {report['rows']} rows of split {split!r}, which has {n} examples")
    if rank == 0:
        write_json_atomic(out / SUCCESS, report)
    log.info(
        "predict %s @ step %d (%s, %d process%s): %d rows in %.2fs (%.0f rows/s; %d parts kept)\n  written: %s",
        f"--input ({len(spec['files'])} file{'s' if len(spec['files']) > 1 else ''})" if spec else split,
        trainer.step,
        ckpt,
        world,
        "es" if world > 1 else "",
        report["rows"],
        report["seconds"],
        (report["rows"] - rows_kr[done].sum()) / max(report["seconds"], 1e-9),
        report["parts_kept"],
        out,
    )
    return report


if __name__ == "__main__":
    sys.exit(main())
