"""``kunlun export``: a self-contained serving folder from a checkpoint of a run.

    kunlun export --run-dir R [--checkpoint latest|best|PATH|name|step] --out DIR
                  [--embedding-dtype fp32|fp16|int8] [--aoti] [--overwrite] [key=value ...]

The checkpoint is chosen like ``kunlun eval`` does (``--checkpoint`` forms, ``R/config.yaml``
plus ``key=value`` overrides) and read in this one process whatever world size and 1D/2D
layout saved it. ``DIR`` gets the unsharded tables (``--embedding-dtype``: fp32, fp16 or
row-wise int8), the dense tower exported with ``torch.export``, the data schema with its id
mapping and vocabularies, the resolved config, the checkpoint's metrics and a manifest with
checksums (:mod:`kunlun.serving.format`); with ``--aoti`` also the tower compiled ahead of
time by AOTInductor (minutes of C++ compilation; it runs only on this platform and torch
version). Load it with ``kunlun.serving.load(DIR)``.

Before ``DIR`` appears, the written folder is loaded back and scores up to 512 test
examples; export fails if they differ from the checkpoint's by more than 1e-5 (fp32
tables; 0.01 for fp16/int8). An existing non-empty ``DIR`` is refused unless
``--overwrite`` and it is an earlier export; the new folder replaces it in one rename.

Exit status: 0 done; 2 bad run folder, checkpoint, config, data or output folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from kunlun.data.errors import DataError
from kunlun.launch.eval_cli import checkpoint_job
from kunlun.serving.format import EMBEDDING_DTYPES, ExportError
from kunlun.trainer.checkpoint import CheckpointError
from kunlun.trainer.config import ConfigError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunlun export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", "--run_dir", dest="run_dir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest (default) | best | a checkpoint folder | a name or step in RUN_DIR/checkpoints")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument(
        "--embedding-dtype", "--embedding_dtype", dest="embedding_dtype", default="fp32", help=f"table storage: {' | '.join(EMBEDDING_DTYPES)} (default fp32)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--aoti", action="store_true", help="also compile the tower with AOTInductor (tower.aoti.pt2; minutes, needs a C++ compiler)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides on top of RUN_DIR/config.yaml (e.g. moved data paths)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.split = "test"  # checkpoint_job's split argument; export reads a sample of it
    import logging
    import warnings

    # Our messages to stdout; TorchRec/FBGEMM's INFO chatter (kernel libraries loaded) stays off.
    logging.getLogger().setLevel(logging.WARNING)
    ours = logging.getLogger("kunlun")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not any(getattr(h, "_kunlun_export", False) for h in ours.handlers):  # main() may run more than once in a process
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[kunlun] %(message)s"))
        handler._kunlun_export = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        if args.embedding_dtype not in EMBEDDING_DTYPES:
            raise ConfigError(f"--embedding-dtype {args.embedding_dtype!r}: expected one of {list(EMBEDDING_DTYPES)}")
        _, cfg = checkpoint_job(args)
        from kunlun.trainer.export import export_checkpoint

        export_checkpoint(cfg, Path(cfg.checkpoint.resume), Path(args.out), args.embedding_dtype, args.overwrite, aoti=args.aoti)
    except (ConfigError, DataError, CheckpointError, ExportError) as e:
        print(f"kunlun export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
