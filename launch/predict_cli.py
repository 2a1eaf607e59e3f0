"""``kunlun predict``: score every example of a split with a saved checkpoint, to Parquet.

    kunlun predict --run-dir R [--checkpoint latest|best|PATH|name|step] [--split eval|valid|test] --output DIR
                   [--overwrite] [--rows-per-part N] [key=value ...]
    torchrun --nproc_per_node N -m kunlun.launch.predict_cli --run-dir R --output DIR ...   (every rank)

The checkpoint is chosen and loaded exactly like ``kunlun eval`` does (same ``--checkpoint``
forms, ``R/config.yaml`` plus ``key=value`` overrides, any world size: DCP reshards it),
and scored with the same forward pass as the trainer's ``evaluate()``. Unlike the
validation pass, ``trainer.eval_max_batches`` does not apply: every example of the split
is scored exactly once. Rank ``r`` scores its slice of each evaluation batch; the padding
that completes the last batch is dropped.

Written under ``DIR`` (made if missing):

* ``part-r<rank>-<k>.parquet`` (``k`` = 00000, 00001, ...: a new part once ``--rows-per-part``
  rows are pending, so parts hold that many rows rounded up to whole batches), columns
  ``example`` (int64: the example's index in the split), ``label`` (float32) and ``score``
  (float64: the sigmoid probability); with several labels ``label/<name>`` and
  ``score/<name>`` per label. Each part is written under a temporary name and renamed.
* ``_SUCCESS.json`` (rank 0, after every rank finished): rows, rows per rank, parts,
  columns, checkpoint, step, split, world size, overrides.

An existing non-empty ``DIR`` is refused (exit 2) unless ``--overwrite``; with it, the
previous parts and ``_SUCCESS.json`` are deleted first (a folder holding anything else is
refused: it is not a ``kunlun predict`` output). Raw id pass-through columns are not
written (join on ``example``: the row's index in the split).

Exit status: 0 done; 2 bad run folder, checkpoint, config, data or output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from kunlun.data.errors import DataError
from kunlun.launch.eval_cli import checkpoint_job, run_on_checkpoint
from kunlun.trainer.config import ConfigError

log = logging.getLogger("kunlun")

SUCCESS = "_SUCCESS.json"
# What a previous ``kunlun predict`` may have left in DIR (--overwrite deletes only these).
_OWN_FILE = re.compile(r"^(\.tmp-)?part-r\d+-\d+\.parquet$|^_SUCCESS\.json$")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunlun predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", "--run_dir", dest="run_dir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest (default) | best | a checkpoint folder | a name or step in RUN_DIR/checkpoints")
    p.add_argument("--split", default="test", help="test (default) | eval (the validation split; 'valid' is accepted too)")
    p.add_argument("--output", required=True, help="folder for the Parquet parts and _SUCCESS.json")
    p.add_argument("--overwrite", action="store_true", help="replace the parts of an earlier kunlun predict in --output")
    p.add_argument("--rows-per-part", "--rows_per_part", dest="rows_per_part", type=int, default=1_000_000, help="rows per Parquet part (default 1000000)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides on top of RUN_DIR/config.yaml")
    return p.parse_args(argv)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (without ``--overwrite``) or one holding files that are
    not ``kunlun predict`` output (with it). Runs on every rank before anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"--output {out}: the folder exists and is not empty ({len(entries)} entries, e.g. {entries[:3]}); pass --overwrite to replace it")
    foreign = [e for e in entries if not _OWN_FILE.match(e)]
    if foreign:
        raise ConfigError(f"--output {out}: --overwrite refused: the folder holds files kunlun predict did not write: {foreign[:5]}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.output).expanduser().resolve()

    def prepare():
        if args.rows_per_part <= 0:
            raise ConfigError(f"--rows-per-part {args.rows_per_part}: must be positive")
        check_output(out, args.overwrite)
        return checkpoint_job(args)

    return run_on_checkpoint("kunlun predict", prepare, lambda trainer, split: predict(trainer, split, out, args.rows_per_part, args.overrides))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def predict(trainer, split: str, out: Path, rows_per_part: int, overrides: List[str]) -> dict:
    """Score every example of ``split`` (a collective: every rank) into Parquet parts under
    ``out``; rank 0 writes ``_SUCCESS.json`` once every rank has finished."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from kunlun.trainer.checkpoint import write_json_atomic

    rank, world = trainer.info.rank, trainer.info.world_size
    if rank == 0:  # check_output allowed only our own files here
        out.mkdir(parents=True, exist_ok=True)
        for p in out.iterdir():
            if _OWN_FILE.match(p.name):
                p.unlink()
    _barrier()

    labels = list(trainer.schema.labels)
    names = [("label", "score")] if len(labels) == 1 else [(f"label/{n}", f"score/{n}") for n in labels]
    t0 = time.time()
    trainer._agree_replicas()  # as evaluate(): 2D replicas hold the same weights
    ds, loader = trainer._loader(split)  # the whole split: no eval_max_batches
    assert not ds.shuffle, "evaluation splits are read in order"
    n_split, local = ds.num_examples, ds.local_batch_size

    parts: List[str] = []
    pending: List[tuple] = []
    rows = 0

    def flush() -> None:
        if not pending:
            return
        example = np.concatenate([p[0] for p in pending])
        lab = np.concatenate([p[1] for p in pending])
        score = np.concatenate([p[2] for p in pending])
        cols = {"example": pa.array(example, pa.int64())}
        for j, (lname, _) in enumerate(names):
            cols[lname] = pa.array(lab[:, j], pa.float32())
        for j, (_, sname) in enumerate(names):
            cols[sname] = pa.array(score[:, j], pa.float64())
        name = f"part-r{rank}-{len(parts):05d}.parquet"
        tmp = out / f".tmp-{name}"
        pq.write_table(pa.table(cols), tmp)
        os.replace(tmp, out / name)
        parts.append(name)
        pending.clear()

    trainer.model.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            _, (_, logits, lab, _) = trainer.model(batch.to(trainer.info.device))
            # The rows of this rank's slice of global batch i, as ShardedBatches.batch lays
            # them out (no shuffle: position = example index); positions past the end are padding.
            start = ds.examples_consumed + i * ds.global_batch_size + rank * local
            example = np.arange(start, start + local, dtype=np.int64)
            valid = example < n_split
            if not valid.any():
                continue
            score = torch.sigmoid(logits.detach().double().cpu().reshape(len(example), len(labels))).numpy()
            lab_np = lab.detach().float().cpu().reshape(len(example), len(labels)).numpy()
            pending.append((example[valid], lab_np[valid], score[valid]))
            n = int(valid.sum())
            rows += n
            if sum(len(p[0]) for p in pending) >= rows_per_part:
                flush()
    trainer.model.train()
    flush()

    per_rank = [(rows, parts)]
    if dist.is_available() and dist.is_initialized() and world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (rows, parts))
    ckpt = trainer.resumed_from
    report = {
        "rows": int(sum(r for r, _ in per_rank)),
        "rows_per_rank": [int(r) for r, _ in per_rank],
        "parts": sorted(name for _, names_ in per_rank for name in names_),
        "split_examples": int(n_split),
        "checkpoint": str(ckpt),
        "step": int(trainer.step),
        "split": split,
        "world_size": world,
        "columns": ["example", *[n for n, _ in names], *[s for _, s in names]],
        "overrides": list(overrides),
    }
    if report["rows"] != n_split:
        raise DataError(f"kunlun predict scored {report['rows']} rows of split {split!r}, which has {n_split} examples")
    if rank == 0:
        write_json_atomic(out / SUCCESS, report)
    log.info(
        "predict %s @ step %d (%s, %d process%s): %d rows in %.1fs\n  written: %s",
        split,
        trainer.step,
        ckpt,
        world,
        "es" if world > 1 else "",
        report["rows"],
        time.time() - t0,
        out,
    )
    return report


if __name__ == "__main__":
    sys.exit(main())
