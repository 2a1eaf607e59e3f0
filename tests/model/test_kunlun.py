"""Kunlun modules against direct formulas, and the tower's analytic FLOPs against
``torch.utils.flop_counter`` (CompSkip and event-level personalisation included)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.model.modules.gdpa_ffn import GDPAFFN
from kunlun.model.modules.seed_pooling import HierarchicalSeedPooling, SumKronLinear
from kunlun.model.modules.temporal import TemporalEncoding, log_bucket
from kunlun.model.modules.window_attention import WindowSelfAttention
from kunlun.model.ops.select import set_gdpa_impl
from kunlun.model.towers.base import EventSequence, TowerInputs
from kunlun.model.towers.kunlun import KunlunTower, is_global_layer
from kunlun.trainer.config import EventTowerConfig, KunlunConfig


def offsets_of(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])


def test_sum_kron_linear_matches_its_definition():
    torch.manual_seed(0)
    m = SumKronLinear(n_in=6, n_out=3, dim=5, rank=2)
    x = torch.randn(4, 6, 5)
    want = sum(m.z[i].T @ x @ m.w[i] for i in range(2))  # Σ_i Z_iᵀ X_b W_i
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_window_attention_matches_per_sample_loop(window):
    torch.manual_seed(1)
    m = WindowSelfAttention(dim=8, heads=2, window=window)
    lengths = [5, 0, 1, 7]
    off = offsets_of(lengths)
    seq = torch.randn(int(off[-1]), 8)
    out = m(seq, off, max_len=7)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        x = seq[off[b] : off[b + 1]]
        q, k, v = m.qkv(m.norm(x)).view(n, 3, 2, 4).permute(1, 2, 0, 3)
        mask = None
        if window is not None:
            i = torch.arange(n)[:, None]
            mask = (i - i.T).abs() <= window
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(n, 8)
        torch.testing.assert_close(out[off[b] : off[b + 1]], x + m.out(att), atol=1e-5, rtol=1e-5)


def test_gdpa_ffn_is_a_personalised_ffn():
    torch.manual_seed(2)
    m = GDPAFFN(dim=8, heads=2, n_sum=3, d_ctx=6, m=5, rank=4, activation="gelu")
    set_gdpa_impl(m, "reference")
    off = offsets_of([3, 0, 4])
    seq = torch.randn(7, 8)
    x_sum = torch.randn(3, 3, 6)
    out = m(seq, off, x_sum, max_len=4)
    k, v = m.kv(x_sum)  # [B, m, H, dh]
    for b in range(3):
        s = seq[off[b] : off[b + 1]]
        ln = m.norm_in(s).view(-1, 2, 4)
        hidden = F.gelu(torch.einsum("thd,mhd->thm", ln, k[b]) / 2.0)  # qk_scale = 1/√dh
        o = torch.einsum("thm,mhd->thd", hidden, v[b]) / 5 + ln  # out_scale = 1/m, residual on ln(q)
        want = m.norm_out(o.reshape(-1, 8)) + s
        torch.testing.assert_close(out[off[b] : off[b + 1]], want, atol=1e-5, rtol=1e-5)


def test_temporal_encoding_buckets_and_recency():
    assert log_bucket(torch.tensor([0, 59, 60, 180, 10**9]), 64).tolist() == [0, 0, 1, 2, 23]
    enc = TemporalEncoding(dim=4, num_buckets=8)
    off = offsets_of([3])
    ts = torch.tensor([100, 160, 400])
    out = enc(torch.zeros(3, 4), ts, off, torch.tensor([460]))
    # newest event: recency 0, age 60 s → bucket 1, gap 240 s → bucket 2
    want = enc.age.weight[1] + enc.gap.weight[2] + enc.position.weight[0]
    torch.testing.assert_close(out[2], want)
    torch.testing.assert_close(out[0], enc.age.weight[log_bucket(torch.tensor(360), 8)] + enc.gap.weight[0] + enc.position.weight[2])


# ------------------------------------------------------------------------ the tower
SCHEMA = FeatureSchema(
    tables=[TableSpec("u", 10), TableSpec("i", 10), TableSpec("item", 10), TableSpec("act", 3)],
    dense_features=["d0", "d1"],
    context_features=[ContextFeature("user", "u"), ContextFeature("target", "i")],
    event_types=[EventType("click", "item", "act", 6), EventType("view", "item", "act", 6)],
)
EMB = 8


def tower_cfg(**overrides) -> KunlunConfig:
    cfg = KunlunConfig(
        dim=16,
        num_layers=3,
        num_summary_tokens=2,
        pffn_kv_len=4,
        kv_rank=8,
        hsp_rank=2,
        wukong_mlp=16,
        head_mlp=[16],
        default_event=EventTowerConfig(dim=8, heads=2, layers=3, window=-1, num_tokens=2, num_seeds=4),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def inputs(batch: int, length: int) -> TowerInputs:
    g = torch.Generator().manual_seed(3)
    lengths = torch.full((batch,), length, dtype=torch.long)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    t = int(off[-1])
    events = {
        name: EventSequence(
            item=torch.randn(t, EMB, generator=g),
            action=torch.randn(t, EMB, generator=g),
            timestamps=torch.arange(t) * 60,
            lengths=lengths,
            offsets=off,
        )
        for name in ("click", "view")
    }
    return TowerInputs(
        dense=torch.randn(batch, 2, generator=g),
        context={"user": torch.randn(batch, EMB, generator=g), "target": torch.randn(batch, EMB, generator=g)},
        events=events,
        request_time=torch.full((batch,), t * 60 + 600),
    )


if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in torch.utils.flop_counter.flop_registry:
    # torch's counter has formulas for the CUDA SDPA kernels but not for the CPU one.
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)


def counted_flops(tower, x) -> float:
    with FlopCounterMode(display=False) as counter:
        tower(x)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("compskip", [True, False])
def test_analytic_flops_match_flop_counter(compskip):
    torch.manual_seed(4)
    tower = KunlunTower(SCHEMA, EMB, 1, tower_cfg(compskip=compskip))
    b, length = 5, 6  # every sequence full: no padding work for the reference ops
    x = inputs(b, length)
    analytic = b * tower.flops_per_example({"click": length, "view": length}) + tower.fixed_flops()
    assert counted_flops(tower, x) == pytest.approx(analytic, rel=0.01)
    assert tower(x).shape == (b, 1)


def test_compskip_saves_the_fraction_its_schedule_implies():
    torch.manual_seed(5)
    full = KunlunTower(SCHEMA, EMB, 1, tower_cfg(compskip=False))
    skip = KunlunTower(SCHEMA, EMB, 1, tower_cfg(compskip=True))
    lens = {"click": 6.0, "view": 6.0}
    # Implied saving: per event tower, the modules the schedule drops, i.e. self-attention on
    # global layers and summary + personalised FFN on local layers.
    implied = 0.0
    for name, tower in full.events.items():
        for layer in range(tower.num_layers):
            key = str(layer)
            if is_global_layer(layer, compskip=True):
                implied += tower.swa[key].flops_per_example(lens[name])
            else:
                implied += tower.summaries[key].flops_per_example(lens[name]) + 2 * tower.dim * 16 * tower.num_tokens
                implied += tower.pffn[key].flops_per_example(lens[name])
    f_full, f_skip = full.flops_per_example(lens), skip.flops_per_example(lens)
    assert f_full - f_skip == pytest.approx(implied, rel=1e-9)
    assert 0.1 < implied / f_full < 0.9
    # ... and the real forward work drops by the same fraction.
    x = inputs(4, 6)
    measured = 1 - counted_flops(skip, x) / counted_flops(full, x)
    expected = 1 - (4 * f_skip + skip.fixed_flops()) / (4 * f_full + full.fixed_flops())
    assert measured == pytest.approx(expected, rel=0.02)


def test_event_level_personalisation_shrinks_low_value_towers():
    cfg_uniform = tower_cfg()
    cfg_personal = copy.deepcopy(cfg_uniform)
    cfg_personal.events = {"view": EventTowerConfig(dim=4, heads=2, layers=1, window=-1, num_tokens=1, num_seeds=2)}
    uniform = KunlunTower(SCHEMA, EMB, 1, cfg_uniform)
    personal = KunlunTower(SCHEMA, EMB, 1, cfg_personal)
    lens = {"click": 6.0, "view": 6.0}
    assert personal.events["view"].dim == 4 and personal.events["view"].num_layers == 1
    assert personal.events["click"].flops_per_example(6.0, 16) == uniform.events["click"].flops_per_example(6.0, 16)
    assert personal.flops_per_example(lens) < uniform.flops_per_example(lens)
    x = inputs(4, 6)
    assert counted_flops(personal, x) < counted_flops(uniform, x)
    assert personal(x).shape == (4, 1)


def test_unknown_event_in_config_is_named():
    cfg = tower_cfg()
    cfg.events = {"purchase": EventTowerConfig()}
    with pytest.raises(ValueError, match=r"\['purchase'\] are not event types"):
        KunlunTower(SCHEMA, EMB, 1, cfg)


def test_hsp_handles_empty_histories():
    torch.manual_seed(6)
    hsp = HierarchicalSeedPooling(dim=8, heads=2, n_seeds=4, n_tokens=2, rank=2, max_len=5)
    off = offsets_of([0, 3])
    out = hsp(torch.randn(3, 8), off, max_len=5)
    assert out.shape == (2, 2, 8) and torch.isfinite(out).all()


def test_tower_gradients_reach_every_parameter():
    torch.manual_seed(7)
    tower = KunlunTower(SCHEMA, EMB, 1, tower_cfg(compskip=True))
    tower(inputs(3, 5)).sum().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None]
    assert not missing, missing


def test_the_gdpa_kernel_is_chosen_once_for_every_module():
    """``model.gdpa_impl`` reaches every GDPA and jagged softmax attention module of every
    sequence tower (no per-module strings)."""
    from kunlun.model.config import ModelConfig
    from kunlun.model.modules.seed_pooling import SeedAttention
    from kunlun.model.ops.select import UsesGDPA
    from kunlun.model.towers import build_tower

    for tower in ("kunlun", "hstu", "interformer"):
        built = build_tower(SCHEMA, ModelConfig(tower=tower, embedding_dim=EMB, gdpa_impl="triton"), num_labels=1)
        users = [m for m in built.modules() if isinstance(m, UsesGDPA)]
        assert users and all(m.gdpa_impl == "triton" for m in users), tower
        softmax = [m for m in built.modules() if isinstance(m, (WindowSelfAttention, SeedAttention))]
        assert softmax and all(isinstance(m, UsesGDPA) for m in softmax), tower
    with pytest.raises(ValueError, match="impl='fast'"):
        set_gdpa_impl(built, "fast")
