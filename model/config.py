"""Model configs: one structured dataclass per tower, composed into ``ModelConfig``.

Plain dataclasses (no omegaconf import) so model code and benchmarks can build towers on
machines with only torch; ``kunlun.trainer.config`` composes them into the job config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class DLRMConfig:
    bottom_mlp: List[int] = field(default_factory=lambda: [64])
    top_mlp: List[int] = field(default_factory=lambda: [128, 64])


@dataclass
class EventTowerConfig:
    """Per-event-type capacity (event-level personalisation, docs/architecture.md §4.4)."""

    dim: int = 64  # sequence width d_e
    heads: int = 2
    layers: int = 2  # L_e <= kunlun.num_layers; a shorter tower keeps its last summary
    window: int = 16  # sliding-window half width w (|i - j| <= w); -1 = full attention
    num_tokens: int = 8  # summary tokens the HSP produces
    num_seeds: int = 16  # over-complete HSP seeds (> num_tokens)


@dataclass
class KunlunConfig:
    dim: int = 64  # context token width d
    num_layers: int = 2
    num_summary_tokens: int = 4  # n_sum of X_sum = Gating(LCE(X))
    pffn_kv_len: int = 32  # m: keys per sample of the GDPA personalised FFN
    pffn_activation: str = "gelu_tanh"
    kv_rank: int = 64  # bottleneck of the K/V generator
    hsp_rank: int = 4  # k of SumKronLinear
    summary: str = "hsp"  # hsp | pma (ablation)
    seed_attention: str = "softmax"  # softmax | a GDPA activation (silu, gelu, ...)
    compskip: bool = True  # odd layers global (PFFN + fresh HSP), even layers local (SWA)
    num_experts: int = 2  # Mixture of Wukong Experts
    wukong_layers: int = 1  # per expert per Kunlun layer
    fm_rank: int = 8
    wukong_mlp: int = 128
    head_mlp: List[int] = field(default_factory=lambda: [128, 64])
    temporal_buckets: int = 64
    gdpa_impl: str = "auto"  # auto | reference | triton
    default_event: EventTowerConfig = field(default_factory=EventTowerConfig)
    events: Dict[str, EventTowerConfig] = field(default_factory=dict)  # per event type overrides


@dataclass
class DCNv2Config:
    """DCNv2 (Wang et al., 2021): cross layers x_{l+1} = x0 ⊙ (W x_l + b) + x_l, then an MLP."""

    num_cross_layers: int = 3
    low_rank: int = 0  # 0: full-rank W; r > 0: W = U Vᵀ of rank r
    deep_mlp: List[int] = field(default_factory=lambda: [128, 64])


@dataclass
class WukongTowerConfig:
    """Wukong (Zhang et al., 2024) as a whole tower: stacked FM + LCB layers on feature tokens."""

    dim: int = 64
    num_layers: int = 2
    fm_rank: int = 8
    mlp_hidden: int = 128
    head_mlp: List[int] = field(default_factory=lambda: [128, 64])


@dataclass
class HSTUConfig:
    """HSTU-style sequence tower (Zhai et al., 2024): SiLU pointwise attention through ``gdpa``."""

    dim: int = 64
    heads: int = 2
    num_layers: int = 2
    num_summary_tokens: int = 4
    head_mlp: List[int] = field(default_factory=lambda: [128, 64])
    temporal_buckets: int = 64
    gdpa_impl: str = "auto"


@dataclass
class InterFormerConfig:
    """InterFormer (Zeng et al., 2024): interleaved context/sequence arches with PFFN, PMA, gating."""

    dim: int = 64
    heads: int = 2
    num_layers: int = 2
    num_summary_tokens: int = 4  # X_sum tokens
    pma_tokens: int = 2
    recent_tokens: int = 2
    head_mlp: List[int] = field(default_factory=lambda: [128, 64])
    pffn_kv_len: int = 32  # the PFFN/interaction blocks match Kunlun's defaults
    kv_rank: int = 64
    pffn_activation: str = "gelu_tanh"
    fm_rank: int = 8
    wukong_mlp: int = 128
    temporal_buckets: int = 64
    gdpa_impl: str = "auto"


@dataclass
class ModelConfig:
    tower: str = "dlrm"
    embedding_dim: int = 32  # one dim for every table (DLRM's dot interaction needs it)
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    kunlun: KunlunConfig = field(default_factory=KunlunConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    wukong: WukongTowerConfig = field(default_factory=WukongTowerConfig)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    interformer: InterFormerConfig = field(default_factory=InterFormerConfig)
