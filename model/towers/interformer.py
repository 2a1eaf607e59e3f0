"""InterFormer baseline tower (Zeng et al., 2024; docs/architecture.md §7.1).

Tokens:
    context  X [B, n_ns, d]: one token per context feature (pooled embedding → d, own map per
             feature) plus one token for the dense features (``Linear(num_dense → d)``);
    events   S_e [T_e + B, d] per event type: one learned CLS token per example followed by
             the history, ``Linear([item ‖ action]) + TemporalEncoding`` (jagged, oldest first;
             offsets ``offsets_e + arange(B + 1)``, so every example has ≥ 1 row).

Layer l = 0 … L−1 (the cross arch summarises the current X and S; both arches use it)::

    X_sum   = Gating(LCE(X))                                     # [B, n_sum, d]
    S_sum_e = Gating([S_CLS ‖ PMA(S_e) ‖ S_recent])              # [B, 1 + n_pma + n_recent, d]
    X       = LN(X + Wukong([X_sum ‖ S_sum_1 … ‖ S_sum_E]))      # interaction arch, n_ns tokens
    S_e     = MHA(PFFN(X_sum, S_e))                              # sequence arch

Output: one more cross arch on the final X, S gives ``MLP(flatten([X_sum ‖ S_sum_1 … ‖ S_sum_E]))
→ [B, num_labels]`` logits (InterFormer's head: σ(MLP([X_sum ‖ S_sum])), σ inside the loss).

Choices (keeping the comparison with Kunlun about the architecture, docs §7.1 "Kunlun's deltas"):

* **S_CLS** is a learned token prepended to every sequence (as in InterFormer): it goes
  through the PFFN and the self-attention with the events and its current row is read out
  as ``S_CLS``. PMA (``pma_tokens`` learned queries, softmax) attends over the whole
  sequence, CLS row included. ``S_recent`` = the last ``recent_tokens`` events (CLS
  excluded), right-aligned, zeros where the history is shorter.
* **Interaction** = one :class:`WukongLayer` on ``[X_sum ‖ S_sum …]`` mapping back to ``n_ns``
  tokens (n_F = ⌈n_ns/2⌉, n_L = ⌊n_ns/2⌋; InterFormer allows any interaction module), then
  ``X + ·`` and a LayerNorm. Kunlun's delta is the *mixture* of Wukong experts.
* **PFFN** = :class:`GDPAFFN` (the module Kunlun uses): InterFormer's ``f(X_sum)·S`` is a
  per-example FFN whose weights come from X_sum, which is exactly what GDPAFFN computes
  with K/V generated from X_sum; using the same module keeps the comparison about the
  architecture, not the FFN kernel.
* **MHA** = :class:`WindowSelfAttention` with ``window=None`` (full softmax self-attention,
  pre-LN, residual). Kunlun's delta is the window.
* **Sequences stay separate per event type** (uniform sizes ``cfg.dim``/``cfg.heads``);
  InterFormer's MaskNet merge of several sequences into one is not implemented. Temporal
  information enters through the same additive :class:`TemporalEncoding` as Kunlun instead
  of InterFormer's RoPE.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.modules.gdpa_ffn import GDPAFFN
from kunlun.model.modules.head import PredictionHead
from kunlun.model.modules.interaction import ContextSummary, Gating
from kunlun.model.modules.jagged import segment_ids
from kunlun.model.modules.seed_pooling import PMA
from kunlun.model.modules.temporal import TemporalEncoding
from kunlun.model.modules.tokenizer import ContextTokenizer
from kunlun.model.modules.window_attention import WindowSelfAttention
from kunlun.model.modules.wukong import WukongLayer
from kunlun.model.towers.base import DenseTower, TowerInputs


class SequenceSummary(nn.Module):
    """Cross arch, sequence side: ``S [T + B, d]`` (CLS first) → ``Gating([S_CLS ‖ PMA(S) ‖ S_recent])``."""

    def __init__(self, dim: int, heads: int, n_pma: int, n_recent: int, max_len: int):
        super().__init__()
        self.dim, self.n_recent, self.max_len = dim, n_recent, max_len
        self.pma = PMA(dim, heads, n_pma, max_len, "softmax")
        self.gating = Gating(dim)
        self.n_tokens = 1 + n_pma + n_recent

    def forward(self, seq: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``offsets`` include the CLS row: ``[B+1]`` with ``offsets[b]`` the CLS row of example b."""
        cls = seq[offsets[:-1]].unsqueeze(1)  # [B, 1, d]
        pma = self.pma(seq, offsets, self.max_len)  # [B, n_pma, d]
        r = self.n_recent
        idx = offsets[1:, None] - r + torch.arange(r, device=seq.device)  # [B, r] the last r rows
        valid = idx > offsets[:-1, None]  # not the CLS row, not the previous example
        recent = seq[idx.clamp(min=0)] * valid.unsqueeze(-1).to(seq.dtype)  # [B, r, d]
        return self.gating(torch.cat([cls, pma, recent], dim=1))

    def flops_per_example(self, avg_len: LengthLike) -> float:
        return self.pma.flops_per_example(avg_len) + self.n_tokens * self.gating.flops_per_token()

    def fixed_flops(self) -> float:
        return self.pma.fixed_flops()


class InterFormerSequence(nn.Module):
    """One event type's sequence side across the layers (own parameters)."""

    def __init__(self, emb_dim: int, max_len: int, cfg, n_sum: int):
        super().__init__()
        d, heads = cfg.dim, cfg.heads
        self.dim, self.max_len = d, max_len + 1  # + the CLS row
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.token = nn.Linear(2 * emb_dim, d)
        self.temporal = TemporalEncoding(d, cfg.temporal_buckets)
        self.summaries = nn.ModuleList(SequenceSummary(d, heads, cfg.pma_tokens, cfg.recent_tokens, self.max_len) for _ in range(cfg.num_layers + 1))
        self.pffn = nn.ModuleList(GDPAFFN(d, heads, n_sum, d, cfg.pffn_kv_len, cfg.kv_rank, cfg.pffn_activation) for _ in range(cfg.num_layers))
        self.mha = nn.ModuleList(WindowSelfAttention(d, heads, None) for _ in range(cfg.num_layers))
        self.n_tokens = self.summaries[0].n_tokens

    def embed(self, ev, request_time: torch.Tensor):
        """History → ``(seq [T + B, d], offsets [B + 1])`` with a CLS row opening every example."""
        events = self.temporal(self.token(torch.cat([ev.item, ev.action], dim=1)), ev.timestamps, ev.offsets, request_time)
        b, t = ev.offsets.numel() - 1, events.shape[0]
        offsets = ev.offsets + torch.arange(b + 1, device=ev.offsets.device, dtype=ev.offsets.dtype)
        rows = torch.arange(t, device=events.device) + segment_ids(ev.offsets, t) + 1  # event rows after their CLS
        seq = torch.cat([self.cls.expand(b, -1).to(events.dtype), events])  # [B + T, d]
        order = torch.cat([offsets[:-1], rows])  # where each row of ``seq`` goes
        return torch.empty_like(seq).index_copy(0, order, seq), offsets

    def summary(self, layer: int, seq: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.summaries[layer](seq, offsets)

    def step(self, layer: int, seq: torch.Tensor, offsets: torch.Tensor, x_sum: torch.Tensor) -> torch.Tensor:
        return self.mha[layer](self.pffn[layer](seq, offsets, x_sum, self.max_len), offsets, self.max_len)

    def flops_per_example(self, avg_len: LengthLike) -> float:
        stats = LengthStats.of(avg_len)
        n = stats.plus(1)  # + the CLS row (shifts every sample, so E[(L+1)²] stays exact)
        total = 2 * self.token.in_features * self.dim * stats.mean
        total += sum(s.flops_per_example(n) for s in self.summaries)
        total += sum(p.flops_per_example(n) for p in self.pffn)
        return total + sum(m.flops_per_example(n) for m in self.mha)

    def fixed_flops(self) -> float:
        return sum(s.fixed_flops() for s in self.summaries)


class InterFormerTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = cfg.dim
        self.cfg = cfg
        self.tokenizer = ContextTokenizer(len(schema.context_features), embedding_dim, d, schema.num_dense)
        self.n_ns = self.tokenizer.n_tokens
        n_sum = cfg.num_summary_tokens
        self.events = nn.ModuleDict({e.name: InterFormerSequence(embedding_dim, e.max_len, cfg, n_sum) for e in schema.event_types})
        n_seq_tokens = sum(s.n_tokens for s in self.events.values())
        self.context_summaries = nn.ModuleList(ContextSummary(self.n_ns, n_sum, d) for _ in range(cfg.num_layers + 1))
        n_in = n_sum + n_seq_tokens
        n_fmb = self.n_ns - self.n_ns // 2
        self.interactions = nn.ModuleList(WukongLayer(n_in, d, cfg.fm_rank, n_fmb, self.n_ns - n_fmb, cfg.wukong_mlp) for _ in range(cfg.num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.num_layers))
        self.head = PredictionHead(n_in * d, cfg.head_mlp, num_labels)

    def _summaries(self, layer: int, x: torch.Tensor, seqs: Dict[str, torch.Tensor], offsets: Dict[str, torch.Tensor]):
        x_sum = self.context_summaries[layer](x)
        s_sum = [self.events[n].summary(layer, seqs[n], offsets[n]) for n in self.events]
        return x_sum, torch.cat([x_sum, *s_sum], dim=1)  # X_sum, [X_sum ‖ S_sum …]

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        x = self.tokenizer([inputs.context[k] for k in self.schema.context_keys], inputs.dense)  # [B, n_ns, d]
        seqs: Dict[str, torch.Tensor] = {}
        offsets: Dict[str, torch.Tensor] = {}
        for name, tower in self.events.items():
            seqs[name], offsets[name] = tower.embed(inputs.events[name], inputs.request_time)
        for layer in range(self.cfg.num_layers):
            x_sum, t = self._summaries(layer, x, seqs, offsets)
            for name, tower in self.events.items():
                seqs[name] = tower.step(layer, seqs[name], offsets[name], x_sum)
            x = self.norms[layer](x + self.interactions[layer](t))
        _, t = self._summaries(self.cfg.num_layers, x, seqs, offsets)
        return self.head(t)

    def flops_per_example(self, avg_seq_len: Dict[str, LengthLike]) -> float:
        total = self.tokenizer.flops_per_example()
        for name, tower in self.events.items():
            total += tower.flops_per_example(avg_seq_len.get(name, 0.0))
        total += sum(s.flops_per_example() for s in self.context_summaries)
        total += sum(i.flops_per_example() for i in self.interactions)
        return total + self.head.flops_per_example()

    def fixed_flops(self) -> float:
        """Per-batch FLOPs that do not scale with the batch (PMA seed projections)."""
        return sum(t.fixed_flops() for t in self.events.values())
