"""Model configs: one structured dataclass per tower, composed into ``ModelConfig``.

Plain dataclasses (no omegaconf import) so model code and benchmarks can build towers on
machines with only torch; ``kunlun.trainer.config`` composes them into the job config.
Each class checks its own fields in ``__post_init__`` (``kunlun.common.FieldError``); the
fields several towers share live in small base classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from kunlun.common import check, check_choice, check_positive

TOWER_NAMES = ("dcnv2", "dlrm", "hstu", "interformer", "kunlun", "wukong")  # = kunlun.model.towers.TOWERS
GDPA_IMPLS = ("auto", "reference", "triton")
ACTIVATIONS = ("identity", "relu", "silu", "gelu", "gelu_tanh")


def _check_widths(owner, *fields: str) -> None:
    for name in fields:
        check(owner, all(w > 0 for w in getattr(owner, name)), name, "a list of layer widths > 0")


@dataclass
class DLRMConfig:
    bottom_mlp: List[int] = field(default_factory=lambda: [64])
    top_mlp: List[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        _check_widths(self, "bottom_mlp", "top_mlp")


@dataclass
class EventTowerConfig:
    """Per-event-type capacity (event-level personalisation, docs/architecture.md §4.4).
    Checked by :class:`KunlunConfig`, which knows the number of layers."""

    dim: int = 64  # sequence width d_e
    heads: int = 2
    layers: int = 2  # L_e <= kunlun.num_layers; a shorter tower keeps its last summary
    window: int = 16  # sliding-window half width w (|i - j| <= w); -1 = full attention
    num_tokens: int = 8  # summary tokens the HSP produces
    num_seeds: int = 16  # over-complete HSP seeds (> num_tokens)


# ----------------------------------------------------------- fields towers share
@dataclass
class _TowerBase:
    """Width, depth and prediction head of a token tower."""

    dim: int = 64  # token width d
    num_layers: int = 2
    head_mlp: List[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        check_positive(self, "dim", "num_layers")
        _check_widths(self, "head_mlp")


@dataclass
class _SequenceTowerBase(_TowerBase):
    """A tower that summarises event sequences with time encodings (and GDPA kernels,
    chosen once for the whole model by ``ModelConfig.gdpa_impl``)."""

    num_summary_tokens: int = 4  # n_sum summary tokens
    temporal_buckets: int = 64  # log-spaced time-gap buckets

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_summary_tokens", "temporal_buckets")


@dataclass
class _PersonalisedFFNFields:
    """The GDPA personalised FFN and Wukong interaction blocks of Kunlun and InterFormer."""

    pffn_kv_len: int = 32  # m: keys per sample of the GDPA personalised FFN
    pffn_activation: str = "gelu_tanh"
    kv_rank: int = 64  # bottleneck of the K/V generator
    fm_rank: int = 8
    wukong_mlp: int = 128

    def _check_pffn(self) -> None:
        check_positive(self, "pffn_kv_len", "kv_rank", "fm_rank", "wukong_mlp")
        check_choice(self, "pffn_activation", ACTIVATIONS)


def _check_heads(owner) -> None:
    check(owner, owner.heads > 0, "heads", "an integer > 0")
    check(owner, owner.dim % owner.heads == 0, "heads", f"a divisor of dim={owner.dim}")


# ---------------------------------------------------------------------- towers
@dataclass
class KunlunConfig(_PersonalisedFFNFields, _SequenceTowerBase):
    hsp_rank: int = 4  # k of SumKronLinear
    summary: str = "hsp"  # hsp | pma (ablation)
    seed_attention: str = "softmax"  # softmax | a GDPA activation (silu, gelu, ...)
    compskip: bool = True  # odd layers global (PFFN + fresh HSP), even layers local (SWA)
    num_experts: int = 2  # Mixture of Wukong Experts
    wukong_layers: int = 1  # per expert per Kunlun layer
    default_event: EventTowerConfig = field(default_factory=EventTowerConfig)
    events: Dict[str, EventTowerConfig] = field(default_factory=dict)  # per event type overrides

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_pffn()
        check_positive(self, "hsp_rank", "num_experts", "wukong_layers")
        check_choice(self, "summary", ("hsp", "pma"))
        check_choice(self, "seed_attention", ("softmax", *ACTIVATIONS))
        for name, event in [("default_event", self.default_event)] + [(f"events.{n}", e) for n, e in self.events.items()]:
            for attr in ("dim", "heads", "layers", "num_tokens", "num_seeds"):
                check(self, getattr(event, attr) > 0, f"{name}.{attr}", "an integer > 0")
            check(self, event.dim % event.heads == 0, f"{name}.heads", f"a divisor of the event width dim={event.dim}")
            check(self, event.layers <= self.num_layers, f"{name}.layers", f"at most num_layers={self.num_layers}")
            check(self, event.window >= -1, f"{name}.window", "a half width >= 0, or -1 for full attention")


@dataclass
class DCNv2Config:
    """DCNv2 (Wang et al., 2021): cross layers x_{l+1} = x0 ⊙ (W x_l + b) + x_l, then an MLP."""

    num_cross_layers: int = 3
    low_rank: int = 0  # 0: full-rank W; r > 0: W = U Vᵀ of rank r
    deep_mlp: List[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        check_positive(self, "num_cross_layers")
        check(self, self.low_rank >= 0, "low_rank", "an integer >= 0")
        _check_widths(self, "deep_mlp")


@dataclass
class WukongTowerConfig(_TowerBase):
    """Wukong (Zhang et al., 2024) as a whole tower: stacked FM + LCB layers on feature tokens."""

    fm_rank: int = 8
    mlp_hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "fm_rank", "mlp_hidden")


@dataclass
class HSTUConfig(_SequenceTowerBase):
    """HSTU-style sequence tower (Zhai et al., 2024): SiLU pointwise attention through ``gdpa``."""

    heads: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_heads(self)


@dataclass
class InterFormerConfig(_PersonalisedFFNFields, _SequenceTowerBase):
    """InterFormer (Zeng et al., 2024): interleaved context/sequence arches with PFFN, PMA, gating."""

    heads: int = 2
    pma_tokens: int = 2
    recent_tokens: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_pffn()
        _check_heads(self)
        check_positive(self, "pma_tokens", "recent_tokens")


@dataclass
class ModelConfig:
    tower: str = "dlrm"
    embedding_dim: int = 32  # one dim for every table (DLRM's dot interaction needs it)
    # GDPA kernels of every tower module: auto (Triton on CUDA, reference elsewhere) |
    # reference | triton (CPU: only under TRITON_INTERPRET=1); see kunlun.model.ops.select.
    gdpa_impl: str = "auto"
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    kunlun: KunlunConfig = field(default_factory=KunlunConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    wukong: WukongTowerConfig = field(default_factory=WukongTowerConfig)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    interformer: InterFormerConfig = field(default_factory=InterFormerConfig)

    def __post_init__(self) -> None:
        check_choice(self, "tower", TOWER_NAMES)
        check_choice(self, "gdpa_impl", GDPA_IMPLS)
        check_positive(self, "embedding_dim")
