"""Data errors and the bad-row policy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data. The message names the file, line (1-based), field and value."""


class BadRowTracker:
    """Applies ``data.bad_row_policy`` to malformed rows.

    ``error``: raise :class:`DataError` at the first bad row. ``skip``: count it (the
    count is logged to the console and TensorBoard as ``data/bad_rows_skipped``) and
    report the first few in the log.
    """

    MAX_REPORTED = 5

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"bad_row_policy must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.count = 0

    def bad(self, path: Union[str, Path], line: int, field: str, value: str, expected: str) -> None:
        where = f"{path}:{line}" if line > 0 else str(path)
        msg = f"{where}: field {field!r} = {value!r}: expected {expected}"
        if self.policy == "error":
            raise DataError(msg + " (set data.bad_row_policy=skip to drop such rows)")
        self.count += 1
        if self.count <= self.MAX_REPORTED:
            log.warning("skipping bad row: %s", msg)
