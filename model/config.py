"""Model configs: one structured dataclass per tower, composed into ``ModelConfig``.

Plain dataclasses (no omegaconf import) so model code and benchmarks can build towers on
machines with only torch; ``kunlun.trainer.config`` composes them into the job config.
Each class checks its own fields in ``__post_init__`` (``kunlun.common.FieldError``); the
fields several towers share live in small base classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from kunlun.common import FieldError, check, check_choice, check_positive

TOWER_NAMES = ("dcnv2", "dlrm", "hstu", "interformer", "kunlun", "wukong")  # = kunlun.model.towers.TOWERS
GDPA_IMPLS = ("auto", "reference", "triton")
EMBEDDING_DTYPES = ("fp32", "fp16", "bf16")
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


TASK_TYPES = ("binary", "regression")
REGRESSION_LOSSES = ("mse", "huber")
MIXERS = ("shared", "mmoe", "ple")


@dataclass
class TaskConfig:
    """One prediction task (``model.tasks``): a head on a label of the data.

    ``binary``: binary cross-entropy on the logit, metrics AUC / NE / log loss; ``regression``:
    ``loss`` (mse, or huber with ``huber_delta``) on the raw output, metrics MSE / MAE. A
    missing label (NaN in the data: a mask column or a null) adds nothing to the task's loss
    or metrics. The total loss is the ``weight``-ed sum of the tasks' example-weighted means.
    """

    name: str = ""
    label: str = ""  # the data's label it predicts (default: the task's name)
    type: str = "binary"  # binary | regression
    weight: float = 1.0
    loss: str = "mse"  # regression: mse | huber
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        # Checked by ModelConfig, which knows the task's index (model.tasks[i].<field> in errors).
        if not self.label:
            self.label = self.name

    def check(self, owner, i: int) -> None:
        key = f"tasks[{i}]"
        check(owner, bool(self.name) and "/" not in self.name, f"{key}.name", "a non-empty name without '/' (it names metrics: eval/<task>/<metric>)")
        check(owner, self.type in TASK_TYPES, f"{key}.type", f"one of {list(TASK_TYPES)}")
        check(owner, self.weight >= 0, f"{key}.weight", "a weight >= 0")
        check(owner, self.loss in REGRESSION_LOSSES, f"{key}.loss", f"one of {list(REGRESSION_LOSSES)}")
        check(owner, self.huber_delta > 0, f"{key}.huber_delta", "a value > 0")


@dataclass
class MultiTaskConfig:
    """How tasks share the tower (``model.multitask``; README "Several tasks and domains").

    ``shared``: the tower's last layer has one output per task (shared bottom: the towers as
    they are). ``mmoe``: the tower ends in a ``tower_out``-wide representation, ``num_experts``
    expert MLPs (``expert_mlp``) read it, each task mixes them with its own softmax gate and
    runs its own MLP (``task_mlp``) to one output. ``ple``: progressive layered extraction,
    ``levels`` levels of ``shared_experts`` shared and ``task_experts`` per-task experts.
    ``domain_feature`` (a single-id context feature, e.g. the surface): per-domain gates
    (mmoe/ple), ``domain_experts`` experts of its own per domain, and per-domain calibration
    (a scale and a bias per domain and task on the output); metrics are also reported per domain.
    """

    mixer: str = "shared"  # shared | mmoe | ple
    tower_out: int = 64  # width of the tower's representation (mmoe/ple/domain-aware)
    num_experts: int = 4  # mmoe
    shared_experts: int = 2  # ple
    task_experts: int = 1  # ple, per task
    levels: int = 1  # ple extraction levels
    expert_mlp: List[int] = field(default_factory=lambda: [64])
    task_mlp: List[int] = field(default_factory=lambda: [32])
    domain_feature: str = ""  # a context feature with one id per example; "" = no domains
    domain_experts: int = 1  # experts per domain (with domain_feature)
    domain_calibration: bool = True  # per-domain scale and bias of every task's output

    def __post_init__(self) -> None:
        check_choice(self, "mixer", MIXERS)
        check_positive(self, "tower_out", "num_experts", "levels")
        check(self, self.shared_experts >= 0 and self.task_experts >= 0, "shared_experts", "counts >= 0")
        check(self, self.shared_experts + self.task_experts > 0, "task_experts", "at least one expert per task (shared_experts + task_experts > 0)")
        check(self, self.domain_experts >= 0, "domain_experts", "a count >= 0")
        _check_widths(self, "expert_mlp", "task_mlp")
        check(self, len(self.expert_mlp) > 0, "expert_mlp", "at least one layer")


@dataclass
class ModelConfig:
    tower: str = "dlrm"
    embedding_dim: int = 32  # one dim for every table (DLRM's dot interaction needs it)
    # Storage precision of the embedding tables (TBE weights): fp32 | fp16 | bf16. The
    # row-wise AdaGrad state stays fp32; lookups reach the tower in fp32.
    embedding_dtype: str = "fp32"
    # GDPA and jagged softmax attention kernels of every tower module: auto (Triton on CUDA, reference elsewhere) |
    # reference | triton (CPU: only under TRITON_INTERPRET=1); see kunlun.model.ops.select.
    gdpa_impl: str = "auto"
    # torch.compile the dense tower (dynamic jagged totals; nn.Module.compile keeps parameter
    # names, so checkpoints are unchanged). Backend: inductor | aot_eager | eager.
    compile: bool = False
    compile_backend: str = "inductor"
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    kunlun: KunlunConfig = field(default_factory=KunlunConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    wukong: WukongTowerConfig = field(default_factory=WukongTowerConfig)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    interformer: InterFormerConfig = field(default_factory=InterFormerConfig)
    # Prediction tasks; empty: one binary task per label of the data, named after it, each
    # weighted 1/num_labels (the mean over labels, as before tasks existed).
    tasks: List[TaskConfig] = field(default_factory=list)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)

    def __post_init__(self) -> None:
        for i, task in enumerate(self.tasks):
            task.check(self, i)
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise FieldError(type(self), "tasks", names, "distinct task names")
        check_choice(self, "tower", TOWER_NAMES)
        check_choice(self, "gdpa_impl", GDPA_IMPLS)
        check_choice(self, "compile_backend", ("inductor", "aot_eager", "eager"))
        check_positive(self, "embedding_dim")
        check_choice(self, "embedding_dtype", EMBEDDING_DTYPES)
