"""Example sources. Each exposes ``schema``, ``num_examples(split)``, ``read(split, indices)``
(→ ``ExampleBlock``) and ``bad_rows`` (rows skipped under the ``skip`` policy); optionally
``permutation(split, epoch, seed)``, the train order of an epoch (a permutation of the
split; the file source uses it to shuffle with row-group locality).
Splits are ``train``, ``eval`` (validation) and ``test``.

``synthetic`` and ``movielens`` are built in; ``parquet`` and ``csv`` read the user's files
through the schema declared in ``data.files`` (``kunlun.data.sources.files``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kunlun.data.block import ExampleBlock
from kunlun.data.schema import FeatureSchema


class ExampleSource(Protocol):
    schema: FeatureSchema
    bad_rows: int

    def num_examples(self, split: str) -> int: ...

    def read(self, split: str, indices: np.ndarray) -> ExampleBlock: ...


def build_source(data_cfg, seed: int) -> ExampleSource:
    """The source named by ``data.source``."""
    if data_cfg.source == "synthetic":
        from kunlun.data.sources.synthetic import SyntheticSource

        return SyntheticSource(data_cfg.synthetic, seed=seed)
    if data_cfg.source == "movielens":
        from kunlun.data.sources.movielens import MovieLensSource

        return MovieLensSource(data_cfg.movielens, bad_row_policy=data_cfg.bad_row_policy, cache_dir=data_cfg.movielens.cache_dir)
    if data_cfg.source in ("parquet", "csv"):
        from kunlun.data.sources.files import FileSource

        return FileSource(data_cfg)  # shuffling is the loader's (seeded permutation)
    raise ValueError(f"data.source = {data_cfg.source!r}: expected 'synthetic', 'movielens', 'parquet' or 'csv'")
