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


class RowIssues:
    """Bad rows of one chunk of a file (a Parquet row group, a block of CSV lines).

    ``where(i)`` names chunk row ``i`` in its file (``path:line`` for CSV, 1-based lines;
    ``path: row N`` for Parquet, 0-based rows of the file). :meth:`flag` applies the policy of
    ``tracker``: ``error`` raises :class:`DataError` for the first flagged row; ``skip``
    marks the rows in ``bad`` (the source gives them weight 0, so they train and count
    nothing while every other row keeps its position) and logs the first few.
    """

    reported = 0  # skipped rows logged by this process (first MAX_REPORTED only)

    def __init__(self, tracker: BadRowTracker, where, num_rows: int):
        import numpy as np

        self.tracker = tracker
        self.where = where
        self.bad = np.zeros(num_rows, dtype=bool)

    def _report(self, msg: str) -> None:
        if self.tracker.policy == "error":
            raise DataError(msg + " (set data.bad_row_policy=skip to drop such rows)")
        if RowIssues.reported < BadRowTracker.MAX_REPORTED:
            RowIssues.reported += 1
            log.warning("skipping bad row: %s", msg)

    def flag(self, mask, column: str, values, expected: str) -> None:
        """``mask [num_rows]``: rows whose ``column`` is bad; ``values(i)`` (or a sequence) gives row i's value."""
        import numpy as np

        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        first = int(np.flatnonzero(mask)[0])
        value = values(first) if callable(values) else values[first]
        if isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        self._report(f"{self.where(first)}: column {column!r} = {value!r}: expected {expected}")
        self.bad |= mask

    def fail(self, row: int, what: str) -> None:
        """A whole-row problem (wrong number of fields, ...)."""
        self._report(f"{self.where(row)}: {what}")
        self.bad[row] = True


def scalar_text(value):
    """An Arrow scalar (or anything) as a Python value for an error message."""
    try:
        return value.as_py()
    except Exception:  # noqa: BLE001 - only for messages
        return str(value)
