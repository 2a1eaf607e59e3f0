"""History-length statistics for analytic FLOPs.

A tower's forward FLOPs per example are linear in the history length ``L`` for per-event
work (projections, FFNs, attention to a fixed number of seeds or keys) and quadratic for
attention of the sequence to itself. Averaged over examples, the linear terms need
``E[L]``, full self-attention needs ``E[L²]`` (≥ ``E[L]²``: by ~33% for lengths uniform on
``[0, n]``), and windowed attention (``|i − j| ≤ w``) needs the mean exact band size.

:class:`LengthStats` carries a sample of per-example lengths and answers all three. It *is*
a ``float`` equal to the mean length, so code that only needs ``E[L]`` (logging, linear
FLOPs, old callers passing ``{event: mean}``) keeps working; the quadratic terms call
:meth:`LengthStats.of` on whatever they are given (a plain number counts as every example
having that length) and use :meth:`mean_sq` / :meth:`band`. Arithmetic on it returns plain
floats (the sample is dropped), so shift lengths with :meth:`plus`, not ``+``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np


def band_pairs(length: Union[float, np.ndarray], window: Optional[int]) -> Union[float, np.ndarray]:
    """Number of (query, key) pairs with ``|i − j| ≤ window`` in a length-``L`` sequence.

    ``L·(2w+1) − w·(w+1)`` when ``L > w`` (each row sees ``2w+1`` keys, minus the ones
    the two ends cut off), else ``L²``; ``window=None`` is full attention, ``L²``.
    Works elementwise on arrays (fractional ``L`` interpolates the same formula).
    """
    lengths = np.asarray(length, dtype=np.float64)
    full = lengths * lengths
    if window is None:
        out = full
    else:
        w = float(window)
        out = np.where(lengths > w, lengths * (2 * w + 1) - w * (w + 1), full)
    return float(out) if out.ndim == 0 else out


class LengthStats(float):
    """Per-example history lengths (events per example) of a sample; ``float(self)`` = mean."""

    lengths: np.ndarray

    def __new__(cls, lengths) -> "LengthStats":
        arr = np.asarray(lengths, dtype=np.float64).reshape(-1)
        self = super().__new__(cls, float(arr.mean()) if arr.size else 0.0)
        self.lengths = arr
        return self

    @classmethod
    def of(cls, x: Union["LengthStats", float, int, None]) -> "LengthStats":
        """``x`` itself if it carries a sample, else the constant length ``x`` (``None`` → 0)."""
        if isinstance(x, LengthStats):
            return x
        return cls([0.0 if x is None else float(x)])

    def __reduce__(self):
        return (LengthStats, (self.lengths,))

    @property
    def mean(self) -> float:
        """``E[L]`` (events)."""
        return float(self)

    @property
    def mean_sq(self) -> float:
        """``E[L²]``: mean (query, key) pairs of full self-attention per example."""
        return float(np.mean(self.lengths**2)) if self.lengths.size else 0.0

    def band(self, window: Optional[int]) -> float:
        """Mean (query, key) pairs per example of attention with ``|i − j| ≤ window``
        (``None``: full attention, ``E[L²]``)."""
        return float(np.mean(band_pairs(self.lengths, window))) if self.lengths.size else 0.0

    def plus(self, k: float) -> "LengthStats":
        """Every length shifted by ``k`` (e.g. a CLS row prepended to each sequence)."""
        return LengthStats(self.lengths + k)


LengthLike = Union[LengthStats, float, int]
"""What ``flops_per_example`` accepts for one event type's lengths."""
