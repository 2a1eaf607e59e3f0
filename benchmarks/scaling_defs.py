"""Definitions of the scaling study (``benchmarks/scaling.py``): the towers, their width
ladders, how a width sizes each tower (``tower_overrides``), the Kunlun ablation table and
the seed / layer ladders. Pure data and config overrides: no training, no fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
TOWERS = ("kunlun", "interformer", "hstu", "wukong", "dcnv2", "dlrm")
# Five widths per tower, chosen so that each spans >= 1.5 decades of FLOPs/example (towers
# whose FLOPs grow about linearly in w need a wider ladder) while the largest run stays a
# few minutes on one CPU core.
WIDTHS = {
    "kunlun": (12, 20, 32, 52, 80),
    "interformer": (12, 20, 32, 48, 72),
    "hstu": (16, 24, 40, 72, 128),
    "wukong": (8, 16, 32, 64, 128),
    "dcnv2": (8, 16, 32, 64, 128),
    "dlrm": (8, 16, 32, 64, 128),
}
ABLATION_WIDTH = 32
MIN_DECADES = 1.5


def tower_overrides(tower: str, w: int, low_value_event: str = "purchase") -> List[str]:
    """Config overrides that size ``tower`` at width ``w`` (every hidden size follows w).

    ``low_value_event``: the event type Kunlun gives half the capacity (event-level
    personalisation): ``purchase`` on the synthetic data, ``dislike`` on MovieLens.
    """
    if tower == "kunlun":
        h = max(8, w // 2)
        return [
            f"model.kunlun.dim={w}",
            f"model.kunlun.kv_rank={w}",
            f"model.kunlun.pffn_kv_len={h}",
            f"model.kunlun.wukong_mlp={2 * w}",
            f"model.kunlun.head_mlp=[{2 * w}]",
            "model.kunlun.num_layers=3",
            "model.kunlun.num_summary_tokens=4",
            # Event-level personalisation: clicks get the full width, purchases half of it.
            f"model.kunlun.default_event={{dim: {w}, heads: 2, layers: 3, window: 4, num_tokens: 4, num_seeds: 8}}",
            f"model.kunlun.events={{{low_value_event}: {{dim: {h}, heads: 2, layers: 1, window: 2, num_tokens: 2, num_seeds: 4}}}}",
        ]
    if tower == "interformer":
        return [
            f"model.interformer.dim={w}",
            "model.interformer.heads=2",
            "model.interformer.num_layers=2",
            f"model.interformer.kv_rank={w}",
            f"model.interformer.pffn_kv_len={max(8, w // 2)}",
            f"model.interformer.wukong_mlp={2 * w}",
            f"model.interformer.head_mlp=[{2 * w}]",
        ]
    if tower == "hstu":
        return [f"model.hstu.dim={w}", "model.hstu.heads=2", "model.hstu.num_layers=2", f"model.hstu.head_mlp=[{2 * w}]"]
    if tower == "wukong":
        return [f"model.wukong.dim={w}", "model.wukong.num_layers=2", f"model.wukong.mlp_hidden={2 * w}", f"model.wukong.head_mlp=[{2 * w}]"]
    if tower == "dcnv2":
        return ["model.dcnv2.num_cross_layers=2", f"model.dcnv2.low_rank={w}", f"model.dcnv2.deep_mlp=[{8 * w},{4 * w}]"]
    if tower == "dlrm":
        return [f"model.dlrm.bottom_mlp=[{2 * w}]", f"model.dlrm.top_mlp=[{8 * w},{4 * w}]"]
    raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")


# Ablations of Kunlun at ABLATION_WIDTH: variant → (overrides on top of the sized config,
# the feature the variant removes, the paper's reported effect of that feature (the
# Kunlun paper's ablation table, arXiv 2602.10016)).
ABLATIONS: Dict[str, Tuple[Optional[List[str]], str, str]] = {
    "kunlun (all on)": ([], "", ""),
    "CompSkip off": (["model.kunlun.compskip=false"], "CompSkip", "−43.1% FLOPs, +35% QPS, NE-neutral"),
    "full attention (no window)": (
        ["model.kunlun.default_event.window=-1", "model.kunlun.events.purchase.window=-1"],
        "sliding window",
        "−29.5% FLOPs, +31.1% QPS, NE-neutral",
    ),
    "PMA instead of HSP": (["model.kunlun.summary=pma"], "HSP (vs PMA)", "+0.08% NE gain"),
    "event personalisation off": (None, "event personalisation", "−11% FLOPs, +13% QPS"),  # see ablation_overrides
    "unfused PFFN (reference GDPA)": (["model.gdpa_impl=reference"], "fused GDPA", "MFU 34→37%, +0.04% NE gain"),
}


def ablation_overrides(name: str, w: int = ABLATION_WIDTH) -> List[str]:
    base = tower_overrides("kunlun", w)
    if name == "event personalisation off":  # purchases get the clicks' config too
        return [o for o in base if not o.startswith("model.kunlun.events=")] + ["model.kunlun.events={}"]
    return base + list(ABLATIONS[name][0] or [])


GPU_ONLY_ABLATIONS = ("unfused PFFN (reference GDPA)",)  # on CPU "auto" already is the reference


NOISE_SEEDS = (1, 2)  # the full model again with other seeds: the run-to-run spread of NE


LAYERS = (1, 2, 3, 4, 6)


def slug(name: str) -> str:
    """Folder name of an ablation variant (``ablate/<slug>``)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
