"""The sequence towers (Kunlun, HSTU, InterFormer) keep event sequences jagged end to end:
no padding helper is called on their forward or backward, and the jagged ops give the same
outputs and gradients as the padded implementation they replaced.

* Every padding helper a tower or module could reach (``to_padded``, ``from_padded``,
  ``padding_mask``, ``masked_softmax_attention``, ...) is replaced, at every import site under
  ``kunlun.model.modules`` / ``kunlun.model.towers``, by a function that raises; forward and
  backward still run. Padding inside an op's PyTorch reference (``kunlun.model.ops.pytorch``)
  is allowed: that is a kernel's business.
* With ``impl="triton"`` (the fused kernels; on CPU under ``TRITON_INTERPRET=1``) even the
  ops' own padding helpers raise: nothing pads anywhere.
* The previous padded implementation (``to_padded`` → masked SDPA → ``from_padded``, kept
  here as ``padded_*``) on the same weights gives the same logits (1e-5) and gradients.

Kunlun runs sliding-window attention on a banded path (``click``: up to 160 events, w = 2),
a band-masked full path (``view``: up to 9 events, w = 3) and full attention (``like``),
softmax HSP on every layer (CompSkip off) and PMA in a second preset.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec  # noqa: E402
from kunlun.model.config import EventTowerConfig, ModelConfig  # noqa: E402
from kunlun.model.modules.seed_pooling import SeedAttention  # noqa: E402
from kunlun.model.modules.window_attention import WindowSelfAttention  # noqa: E402
from kunlun.model.ops.select import set_gdpa_impl  # noqa: E402
from kunlun.model.towers import build_tower  # noqa: E402
from kunlun.model.towers.base import EventSequence, TowerInputs  # noqa: E402

EMB = 8


def schema(click_max_len: int) -> FeatureSchema:
    return FeatureSchema(
        tables=[TableSpec("u", 10), TableSpec("item", 10), TableSpec("act", 3)],
        dense_features=["d0", "d1"],
        context_features=[ContextFeature("user", "u")],
        event_types=[EventType("click", "item", "act", click_max_len), EventType("view", "item", "act", 9), EventType("like", "item", "act", 7)],
    )


LENGTHS = {"click": [160, 0, 77, 3, 126], "view": [9, 2, 0, 5, 9], "like": [1, 7, 0, 0, 4]}
# The Triton interpreter is slow: shorter clicks there (its grid grows with the longest sample).
SHORT = {"click": [20, 0, 7, 3, 16], "view": [9, 2, 0, 5, 9], "like": [1, 7, 0, 0, 4]}
PADDING_HELPERS = ("to_padded", "from_padded", "padding_mask", "key_mask", "masked_softmax_attention", "jagged_to_padded", "padded_to_jagged")


def model_config(tower: str, **kunlun) -> ModelConfig:
    cfg = ModelConfig(tower=tower, embedding_dim=EMB, gdpa_impl="reference")
    for c in (cfg.hstu, cfg.interformer):
        c.dim, c.num_layers, c.num_summary_tokens, c.head_mlp = 16, 2, 2, [16]
    cfg.interformer.pffn_kv_len, cfg.interformer.kv_rank, cfg.interformer.wukong_mlp = 4, 8, 16
    k = cfg.kunlun
    k.dim, k.num_layers, k.num_summary_tokens, k.pffn_kv_len, k.kv_rank, k.hsp_rank = 16, 2, 2, 4, 8, 2
    k.wukong_mlp, k.head_mlp, k.compskip = 16, [16], False
    k.default_event = EventTowerConfig(dim=8, heads=2, layers=2, window=2, num_tokens=2, num_seeds=4)
    k.events = {
        "view": EventTowerConfig(dim=8, heads=2, layers=2, window=3, num_tokens=2, num_seeds=4),
        "like": EventTowerConfig(dim=8, heads=2, layers=1, window=-1, num_tokens=2, num_seeds=4),
    }
    for name, value in kunlun.items():
        setattr(k, name, value)
    return cfg


PRESETS = {
    "kunlun": model_config("kunlun"),
    "kunlun_pma": model_config("kunlun", summary="pma"),
    "hstu": model_config("hstu"),
    "interformer": model_config("interformer"),
}


def inputs(seed: int = 0, event_lengths=LENGTHS) -> TowerInputs:
    g = torch.Generator().manual_seed(seed)
    events = {}
    for name, lengths in event_lengths.items():
        lengths = torch.tensor(lengths)
        off = F.pad(lengths.cumsum(0), (1, 0))
        t = int(off[-1])
        events[name] = EventSequence(
            item=torch.randn(t, EMB, generator=g),
            action=torch.randn(t, EMB, generator=g),
            timestamps=torch.arange(t) * 60,
            lengths=lengths,
            offsets=off,
        )
    b = len(event_lengths["click"])
    return TowerInputs(
        dense=torch.randn(b, 2, generator=g),
        context={"user": torch.randn(b, EMB, generator=g)},
        events=events,
        request_time=torch.full((b,), 10**6),
    )


# ----------------------------------------------- the padded implementation that was replaced
def _pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[T, ...]`` → ``[B, max_len, ...]``, zeros past each length."""
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pos = torch.arange(values.shape[0]) - offsets[:-1][seg]
    out = values.new_zeros((lengths.numel(), max_len) + tuple(values.shape[1:]))
    out[seg, pos] = values
    return out


def _unpad(padded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return padded[seg, torch.arange(seg.numel()) - offsets[:-1][seg]]


def _masked_attention(q, k, v, key_valid, window=None):
    """``q [B, H, Lq, dh]``, ``k/v [B, H, Lk, dh]``, ``key_valid [B, Lk]``; rows without keys → 0."""
    lq, lk = q.shape[2], k.shape[2]
    mask = key_valid[:, None, None, :].expand(-1, 1, lq, lk)
    if window is not None:
        i = torch.arange(lq)[:, None]
        mask = mask & ((i - torch.arange(lk)[None, :]).abs() <= window)
    any_key = mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key) * any_key


def padded_window_forward(self, seq, offsets, max_len):
    if seq.shape[0] == 0:
        return seq
    qkv = _pad(self.qkv(self.norm(seq)), offsets, max_len)
    b = qkv.shape[0]
    q, k, v = qkv.view(b, max_len, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    valid = torch.arange(max_len)[None, :] < (offsets[1:] - offsets[:-1])[:, None]
    att = _masked_attention(q, k, v, valid, self.window).transpose(1, 2).reshape(b, max_len, self.dim)
    return seq + self.out(_unpad(att, offsets))


def padded_seed_forward(self, seq, offsets, max_len):
    assert self.attention == "softmax"
    b = offsets.numel() - 1
    q = self.q(self.norm_seeds(self.seeds)).view(self.n_seeds, self.heads, self.head_dim)
    kp = _pad(self.kv(self.norm_seq(seq)).view(-1, 2, self.heads, self.head_dim), offsets, max_len)
    k, v = kp[:, :, 0].transpose(1, 2), kp[:, :, 1].transpose(1, 2)
    qb = q.transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
    valid = torch.arange(max_len)[None, :] < (offsets[1:] - offsets[:-1])[:, None]
    att = _masked_attention(qb, k, v, valid).transpose(1, 2)
    return self.out(att.reshape(b, self.n_seeds, self.dim))


# ------------------------------------------------------------------------------ helpers
def _raise(name):
    def helper(*args, **kwargs):
        raise AssertionError(f"padding helper {name} called on the tower's path")

    return helper


def forbid_padding(monkeypatch, packages=("kunlun.model.modules", "kunlun.model.towers")):
    """Replace every padding helper at every import site under ``packages`` (and in the
    helper module itself, where none is left) by one that raises. Returns how many sites."""
    monkeypatch.setattr("kunlun.model.modules.jagged.to_padded", _raise("to_padded"), raising=False)
    monkeypatch.setattr("kunlun.model.modules.jagged.from_padded", _raise("from_padded"), raising=False)
    sites = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(packages):
            continue
        for name in PADDING_HELPERS:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _raise(name))
                sites += 1
    return sites


def step(tower, x):
    """Forward + backward of a fixed weighted sum → ``(logits, {name: grad})``."""
    tower.zero_grad(set_to_none=True)
    out = tower(x)
    w = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    return out.detach(), grads


def built(name: str, seed: int = 0, click_max_len: int = 160):
    torch.manual_seed(seed)
    return build_tower(schema(click_max_len), PRESETS[name], num_labels=1)


# -------------------------------------------------------------------------------- tests
def test_padding_helpers_are_gone():
    import kunlun.model.modules.jagged as jagged

    assert not any(hasattr(jagged, n) for n in ("to_padded", "from_padded", "padding_mask"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_no_padding_and_same_numbers_as_the_padded_implementation(name, monkeypatch):
    tower, x = built(name), inputs()
    attn = [m for m in tower.modules() if isinstance(m, (WindowSelfAttention, SeedAttention))]
    assert attn, "the preset has softmax attention"
    if name.startswith("kunlun"):
        windows = {m.window for m in tower.modules() if isinstance(m, WindowSelfAttention)}
        assert windows == {2, 3, None}  # banded, band-masked and full attention
    with monkeypatch.context() as m:
        m.setattr(WindowSelfAttention, "forward", padded_window_forward)
        m.setattr(SeedAttention, "forward", padded_seed_forward)
        want, want_grads = step(tower, x)
    forbid_padding(monkeypatch)
    got, grads = step(tower, x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and len(grads) == len(list(tower.parameters()))
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], atol=1e-5, rtol=1e-4, msg=lambda msg: f"{name} d{n}: {msg}")


@pytest.mark.parametrize("name", ["kunlun", "hstu"])
def test_fused_kernels_pad_nowhere(name, monkeypatch):
    """``impl="triton"``: not even the ops pad (their reference padding helpers raise too),
    and the result matches the reference impl. Kunlun and HSTU between them call every
    attention module InterFormer uses (window attention, PMA, GDPA-FFN)."""
    tower, x = built(name, seed=1, click_max_len=20), inputs(seed=1, event_lengths=SHORT)
    want, want_grads = step(tower, x)
    set_gdpa_impl(tower, "triton")
    assert forbid_padding(monkeypatch, ("kunlun.model.modules", "kunlun.model.towers", "kunlun.model.ops")) >= 2
    got, grads = step(tower, x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], atol=1e-4, rtol=1e-3, msg=lambda msg: f"{name} d{n}: {msg}")
