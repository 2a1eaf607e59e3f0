"""``kunlun data``: check, describe and preprocess the files of a parquet/csv job.

It lives in ``launch/`` because it loads the whole job config (``kunlun.trainer.config``);
the work itself is in ``kunlun.data`` (``report``, ``ids``, ``preprocess``).

    kunlun data inspect --config job.yaml [--split train] [--json report.json] [key=value ...]
    kunlun data vocab   --config job.yaml [--min-count 5] [--tables user,item] [--out DIR] [key=value ...]
    kunlun data convert --config job.yaml --out DIR [--row-group-size 65536] [key=value ...]

(also ``python -m kunlun.launch.data_cli ...``). The job config is loaded and validated exactly as
``kunlun.launch.main`` does; ``key=value`` overrides apply. Exit status: 0 done; 2 bad config
or data (the message names the file, row or line, column, value and what was expected).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kunlun data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", required=True, help="job YAML (or preset name) with data.source parquet|csv and data.files")
        sp.add_argument("overrides", nargs="*", help="key=value config overrides")

    ins = sub.add_parser("inspect", help="check the schema against the files; counts, label rate, lengths, cardinalities, nulls")
    common(ins)
    ins.add_argument("--split", action="append", choices=["train", "eval", "test"], help="only this split (repeatable)")
    ins.add_argument("--json", default=None, help="also write the report as JSON to this file")

    voc = sub.add_parser("vocab", help="build vocabularies (id_mapping=vocab) from the train split")
    common(voc)
    voc.add_argument("--min-count", type=int, default=None, help="default: data.files.vocab_min_count")
    voc.add_argument("--tables", default=None, help="comma-separated tables (default: those with id_mapping=vocab)")
    voc.add_argument("--out", default=None, help="default: data.files.vocab_dir")

    conv = sub.add_parser("convert", help="CSV/TSV → Parquet (typed, list columns), plus <out>/job.yaml")
    common(conv)
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--row-group-size", type=int, default=65536)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from kunlun.data.errors import DataError
    from kunlun.trainer.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.source not in ("parquet", "csv"):
            raise ConfigError(f"config key 'data.source' = {cfg.data.source!r} is invalid: expected 'parquet' or 'csv' for `kunlun data`", key="data.source")
        if args.command == "inspect":
            from kunlun.data.report import format_report, inspect

            report = inspect(cfg.data, tuple(args.split) if args.split else ("train", "eval", "test"))
            print(format_report(report))
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(report, handle, indent=2)
        elif args.command == "vocab":
            from kunlun.data.preprocess import build_vocab, format_vocab

            tables = [table_name for table_name in args.tables.split(",") if table_name] if args.tables else None
            result = build_vocab(cfg.data, tables=tables, min_count=args.min_count, out_dir=args.out)
            print(format_vocab(result))
            print(f"written to {args.out or cfg.data.files.vocab_dir}; train with data.files.vocab_dir set to it")
        else:
            from kunlun.data.preprocess import convert

            if args.row_group_size < 1:
                raise ConfigError(f"--row-group-size = {args.row_group_size}: expected an integer >= 1")
            result = convert(cfg.data, args.out, row_group_size=args.row_group_size, job_cfg=cfg)
            n_files = sum(len(paths) for paths in result["files"].values())
            print(
                f"converted {result['rows']:,} rows into {n_files} Parquet files under {args.out}"
                + (f" ({result['skipped']:,} bad rows left out)" if result["skipped"] else "")
            )
            print(f"job config: {result['config']}  (train with --config {result['config']})")
    except (ConfigError, DataError) as e:
        print(f"kunlun data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
