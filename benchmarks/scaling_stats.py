"""Statistics of the scaling study: least-squares line fits with standard errors and
Student-t 95% intervals (``fit_line``, ``t975``), the power-law and log-linear fits of NE
against training FLOPs (``fit_scaling``) and delta-method slope ratios (``slope_ratio``).
Pure numpy: no training, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table; between rows the smaller dof, i.e. the
    wider interval; 1.96 beyond 30 degrees of freedom)."""
    if dof <= 0:
        return float("nan")
    if dof > 30:
        return 1.96
    return _T975[max(k for k in _T975 if k <= dof)]


@dataclass
class LineFit:
    """y = intercept + slope · x by least squares, with standard errors and 95% CIs."""

    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    r2: float
    n: int

    @property
    def slope_ci(self) -> Tuple[float, float]:
        h = t975(self.n - 2) * self.slope_se
        return self.slope - h, self.slope + h


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3:
        raise ValueError(f"need >= 3 points for a fit with an error estimate, got {n}")
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    s2 = float((resid**2).sum() / (n - 2))
    sst = float(((y - ym) ** 2).sum())
    return LineFit(
        slope=slope,
        intercept=intercept,
        slope_se=math.sqrt(s2 / sxx),
        intercept_se=math.sqrt(s2 * (1 / n + xm**2 / sxx)),
        r2=1 - float((resid**2).sum()) / sst if sst > 0 else 1.0,
        n=n,
    )


def fit_scaling(train_flops: Sequence[float], ne: Sequence[float]) -> Dict:
    """Power-law and log-linear fits of NE against training FLOPs C (C in FLOPs)."""
    logc = np.log10(np.asarray(train_flops, float))
    power = fit_line(np.log(np.asarray(train_flops, float)), np.log(np.asarray(ne, float)))
    loglin = fit_line(logc - 9.0, ne)  # x = log10(C / 1 GFLOP)
    b_lo, b_hi = -power.slope_ci[1], -power.slope_ci[0]
    eta_lo, eta_hi = -loglin.slope_ci[1], -loglin.slope_ci[0]
    return {
        "power_a": math.exp(power.intercept),
        "power_b": -power.slope,
        "power_b_se": power.slope_se,
        "power_b_ci95": [b_lo, b_hi],
        "power_r2": power.r2,
        "loglin_ne0": loglin.intercept,
        "loglin_eta": -loglin.slope,
        "loglin_eta_se": loglin.slope_se,
        "loglin_eta_ci95": [eta_lo, eta_hi],
        "loglin_r2": loglin.r2,
        "points": len(ne),
        "decades": float(logc.max() - logc.min()),
    }


def slope_ratio(num: float, num_se: float, den: float, den_se: float) -> Tuple[float, float, float]:
    """num/den with a 95% delta-method interval (normal approximation)."""
    r = num / den
    se = abs(r) * math.sqrt((num_se / num) ** 2 + (den_se / den) ** 2)
    return r, r - 1.96 * se, r + 1.96 * se
