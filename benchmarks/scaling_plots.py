"""Plots of the scaling study: eval NE vs training FLOPs per tower with its power-law fit
(``scaling.png``, matplotlib, Agg backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from scaling_defs import TOWERS


def plot(rows: List[Dict], fits: Dict[str, Dict], floor: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=100)
    for i, tower in enumerate(t for t in TOWERS if t in fits):
        pts = sorted((r["train_flops"], r["eval_ne"]) for r in rows if r["tower"] == tower)
        c = np.array([p[0] for p in pts])
        color = f"C{i}"
        ax.scatter(c, [p[1] for p in pts], color=color, s=18)
        f = fits[tower]
        grid = np.geomspace(c.min(), c.max(), 50)
        ax.plot(grid, f["power_a"] * grid ** (-f["power_b"]), color=color, label=f"{tower}: b={f['power_b']:.4f}, η={f['loglin_eta']:.4f}")
    ax.set_xscale("log")
    if floor is not None:  # far below the curves: a line would flatten them, so a note
        ax.text(0.01, 0.01, f"Bayes floor (NE of the true logits): {floor:.3f}", transform=ax.transAxes, fontsize=7, color="gray")
    ax.set_xlabel("training FLOPs (3 × forward FLOPs/example × examples)")
    ax.set_ylabel("eval NE")
    ax.set_title("NE vs training compute (synthetic rich signal, one pass over the same examples)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
