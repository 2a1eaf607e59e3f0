"""Data errors and the bad-row policy.

One mechanism: :class:`BadRowTracker` applies ``data.bad_row_policy`` to every bad row of a
source (raise, or log the first few). Line-by-line parsers (MovieLens) report a row with
:meth:`BadRowTracker.bad`; chunk readers (Parquet/CSV) go through :class:`RowIssues`, which
words the message for a column of a chunk and marks the skipped rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

log = logging.getLogger(__name__)

SKIP_HINT = " (set data.bad_row_policy=skip to drop such rows)"


class DataError(ValueError):
    """Bad input data. The message names the file, line (1-based), field and value."""


class BadRowTracker:
    """Applies ``data.bad_row_policy`` to malformed rows.

    ``error``: raise :class:`DataError` at the first bad row. ``skip``: report the first
    :attr:`MAX_REPORTED` in the log and go on. :attr:`count` counts the rows given to
    :meth:`bad` (logged to the console and TensorBoard as ``data/bad_rows_skipped``); rows
    flagged through :class:`RowIssues` are counted by its ``bad`` mask instead, because a
    chunk may be decoded again after the cache dropped it.
    """

    MAX_REPORTED = 5

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"bad_row_policy must be 'error' or 'skip', got {policy!r}")
        self.policy = policy
        self.count = 0  # rows skipped through bad()
        self.reported = 0  # bad rows seen under skip; the first MAX_REPORTED are logged

    def report(self, message: str) -> None:
        """Apply the policy to one bad row described by ``message`` (where, what, expected)."""
        if self.policy == "error":
            raise DataError(message + SKIP_HINT)
        self.reported += 1
        if self.reported <= self.MAX_REPORTED:
            log.warning("skipping bad row: %s", message)

    def bad(self, path: Union[str, Path], line: int, field: str, value: str, expected: str) -> None:
        """Bad ``field`` of ``path`` at 1-based ``line`` (``line <= 0``: the file as a whole); counts the row under skip."""
        where = f"{path}:{line}" if line > 0 else str(path)
        self.report(f"{where}: field {field!r} = {value!r}: expected {expected}")
        self.count += 1


class RowIssues:
    """Bad rows of one chunk of a file (a Parquet row group, a block of CSV lines).

    ``where(i)`` names chunk row ``i`` in its file (``path:line`` for CSV, 1-based lines;
    ``path: row N`` for Parquet, 0-based rows of the file). :meth:`flag` and :meth:`fail`
    hand the first flagged row to ``tracker`` (``error`` raises :class:`DataError`) and, under
    ``skip``, mark the rows in ``bad`` (the source gives them weight 0, so they train and count
    nothing while every other row keeps its position).
    """

    MAX_VALUE_CHARS = 80  # longer values are cut in messages

    def __init__(self, tracker: BadRowTracker, where, num_rows: int):
        import numpy as np

        self.tracker = tracker
        self.where = where
        self.bad = np.zeros(num_rows, dtype=bool)

    def flag(self, mask, column: str, values, expected: str) -> None:
        """``mask [num_rows]``: rows whose ``column`` is bad; ``values(i)`` (or a sequence) gives row i's value."""
        import numpy as np

        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        first = int(np.flatnonzero(mask)[0])
        value = values(first) if callable(values) else values[first]
        if isinstance(value, str) and len(value) > self.MAX_VALUE_CHARS:
            value = value[: self.MAX_VALUE_CHARS - 3] + "..."
        self.tracker.report(f"{self.where(first)}: column {column!r} = {value!r}: expected {expected}")
        self.bad |= mask

    def fail(self, row: int, what: str) -> None:
        """A whole-row problem (wrong number of fields, ...)."""
        self.tracker.report(f"{self.where(row)}: {what}")
        self.bad[row] = True


def scalar_text(value):
    """An Arrow scalar (or anything) as a Python value for an error message."""
    try:
        return value.as_py()
    except Exception:  # noqa: BLE001 - only for messages
        return str(value)
