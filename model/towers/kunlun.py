"""The Kunlun dense tower (arXiv 2602.10016; spec and defaults in docs/architecture.md).

Tokens:
    context  X [B, n_ns, d]: one token per context feature (pooled embedding → d) plus one
             token for the dense features;
    events   S_e [T_e, d_e] per event type: Linear([item ‖ action]) + temporal encoding,
             jagged (never padded outside an op).

Layer l (0-based; CompSkip: even l "global", odd l "local"; off: every layer does all)::

    X_sum = Gating(LCE(X))                                   # [B, n_sum, d]
    for each event type e with l < L_e:
        if global: S_e = GDPA_FFN_e(S_e; K, V = gen_e(X_sum))  # context → sequence
                   H_e = HSP_e(S_e)                          # fresh summary [B, n_tok_e, d_e]
        else:      S_e = SWA_e(S_e)                          # H_e reused from the last global layer
    X = LN(X + MoWukong([X_sum ‖ P_e(H_e) …]))               # sequence → context, n_ns tokens

Two choices beyond the spec (docs/architecture.md §4): the summary is taken *after* the
layer's sequence update, so every update reaches the output; and with CompSkip a local
layer that would be an event tower's last one is dropped, since its output could only
feed a summary that is never refreshed (use an odd ``layers`` count to end on a global
layer). With CompSkip off a layer runs GDPA-FFN → SWA → HSP.

Output: ``MLP(flatten(X)) → [B, num_labels]`` logits.
Event-level personalisation: every event type has its own width, heads, depth L_e,
window and summary size (``model.kunlun.events.<name>``), so high-value events get more
capacity than low-value ones.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from kunlun.data.schema import FeatureSchema
from kunlun.model.flops import LengthLike, LengthStats
from kunlun.model.modules.gdpa_ffn import GDPAFFN
from kunlun.model.modules.head import PredictionHead
from kunlun.model.modules.interaction import ContextSummary
from kunlun.model.modules.seed_pooling import PMA, HierarchicalSeedPooling
from kunlun.model.modules.temporal import TemporalEncoding
from kunlun.model.modules.tokenizer import ContextTokenizer
from kunlun.model.modules.window_attention import WindowSelfAttention
from kunlun.model.modules.wukong import MixtureOfWukongExperts
from kunlun.model.towers.base import DenseTower, TowerInputs


def is_global_layer(layer: int, compskip: bool) -> bool:
    """CompSkip schedule: layer 0 is global so a summary exists before any reuse."""
    return (not compskip) or layer % 2 == 0


class EventTower(nn.Module):
    """One event type's sequence tower across the Kunlun layers."""

    def __init__(self, name: str, emb_dim: int, max_len: int, ecfg, kcfg):
        super().__init__()
        d_e, heads = ecfg.dim, ecfg.heads
        self.name, self.dim, self.max_len, self.num_layers = name, d_e, max_len, ecfg.layers
        self.num_tokens = ecfg.num_tokens
        self.compskip = kcfg.compskip
        self.token = nn.Linear(2 * emb_dim, d_e)
        self.temporal = TemporalEncoding(d_e, kcfg.temporal_buckets)
        window = None if ecfg.window < 0 else ecfg.window
        self.summaries = nn.ModuleDict()
        self.pffn = nn.ModuleDict()
        self.swa = nn.ModuleDict()
        for layer in range(ecfg.layers):
            glob = is_global_layer(layer, kcfg.compskip)
            if kcfg.compskip and not glob and layer == ecfg.layers - 1:
                break  # a trailing local layer feeds nothing (see the module docstring)
            if glob or not kcfg.compskip:
                if kcfg.summary == "hsp":
                    self.summaries[str(layer)] = HierarchicalSeedPooling(
                        d_e, heads, ecfg.num_seeds, ecfg.num_tokens, kcfg.hsp_rank, max_len, kcfg.seed_attention
                    )
                else:
                    self.summaries[str(layer)] = PMA(d_e, heads, ecfg.num_tokens, max_len, kcfg.seed_attention)
                self.pffn[str(layer)] = GDPAFFN(d_e, heads, kcfg.num_summary_tokens, kcfg.dim, kcfg.pffn_kv_len, kcfg.kv_rank, kcfg.pffn_activation)
            if not glob or not kcfg.compskip:
                self.swa[str(layer)] = WindowSelfAttention(d_e, heads, window)
        self.project = nn.Linear(d_e, kcfg.dim)  # summary tokens → shared width d

    def embed(self, item: torch.Tensor, action: torch.Tensor, timestamps: torch.Tensor, offsets: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.token(torch.cat([item, action], dim=1)), timestamps, offsets, request_time)

    def step(self, layer: int, seq: torch.Tensor, offsets: torch.Tensor, x_sum: torch.Tensor, summary):
        """One layer: returns the new sequence and the (fresh or reused) projected summary."""
        key = str(layer)
        if key in self.pffn:
            seq = self.pffn[key](seq, offsets, x_sum, self.max_len)
        if key in self.swa:
            seq = self.swa[key](seq, offsets, self.max_len)
        if key in self.summaries:
            summary = self.project(self.summaries[key](seq, offsets, self.max_len))
        return seq, summary

    def flops_per_example(self, avg_len: LengthLike, d_ctx: int) -> float:
        """Forward FLOPs per example of this event tower; ``avg_len``: a :class:`LengthStats`
        (or a number: every example that long); ``d_ctx``: width of the context tokens."""
        total = 2 * self.token.in_features * self.dim * LengthStats.of(avg_len).mean
        for key in self.summaries:
            total += self.summaries[key].flops_per_example(avg_len) + 2 * self.dim * d_ctx * self.num_tokens
        for key in self.pffn:
            total += self.pffn[key].flops_per_example(avg_len)
        for key in self.swa:
            total += self.swa[key].flops_per_example(avg_len)
        return total

    def fixed_flops(self) -> float:
        return sum(m.fixed_flops() for m in self.summaries.values())


class KunlunTower(DenseTower):
    def __init__(self, schema: FeatureSchema, embedding_dim: int, num_labels: int, cfg):
        super().__init__(schema, embedding_dim, num_labels)
        d = cfg.dim
        self.cfg = cfg
        unknown = sorted(set(cfg.events) - {e.name for e in schema.event_types})
        if unknown:
            raise ValueError(f"model.kunlun.events: {unknown} are not event types of the data; event types: {[e.name for e in schema.event_types]}")
        self.tokenizer = ContextTokenizer(len(schema.context_features), embedding_dim, d, schema.num_dense)
        self.n_ns = self.tokenizer.n_tokens
        self.events = nn.ModuleDict(
            {e.name: EventTower(e.name, embedding_dim, e.max_len, cfg.events.get(e.name, cfg.default_event), cfg) for e in schema.event_types}
        )
        n_tokens = cfg.num_summary_tokens + sum(t.num_tokens for t in self.events.values())
        self.summaries = nn.ModuleList(ContextSummary(self.n_ns, cfg.num_summary_tokens, d) for _ in range(cfg.num_layers))
        self.interactions = nn.ModuleList(
            MixtureOfWukongExperts(n_tokens, self.n_ns, d, cfg.num_experts, cfg.wukong_layers, cfg.fm_rank, cfg.wukong_mlp) for _ in range(cfg.num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.num_layers))
        self.head = PredictionHead(self.n_ns * d, cfg.head_mlp, num_labels)

    def forward(self, inputs: TowerInputs) -> torch.Tensor:
        x = self.tokenizer([inputs.context[k] for k in self.schema.context_keys], inputs.dense)  # [B, n_ns, d]
        b = x.shape[0]
        seqs: Dict[str, torch.Tensor] = {}
        summaries: Dict[str, torch.Tensor] = {}
        for name, tower in self.events.items():
            ev = inputs.events[name]
            seqs[name] = tower.embed(ev.item, ev.action, ev.timestamps, ev.offsets, inputs.request_time)
            summaries[name] = x.new_zeros(b, tower.num_tokens, self.cfg.dim)
        for layer in range(self.cfg.num_layers):
            x_sum = self.summaries[layer](x)
            for name, tower in self.events.items():
                if layer < tower.num_layers:
                    seqs[name], summaries[name] = tower.step(layer, seqs[name], inputs.events[name].offsets, x_sum, summaries[name])
            t = torch.cat([x_sum] + [summaries[n] for n in self.events], dim=1)
            x = self.norms[layer](x + self.interactions[layer](t))
        return self.head(x)

    def flops_per_example(self, avg_seq_len: Dict[str, LengthLike]) -> float:
        d, cfg = self.cfg.dim, self.cfg
        total = self.tokenizer.flops_per_example()
        for name, tower in self.events.items():
            total += tower.flops_per_example(avg_seq_len.get(name, 0.0), d)
        for layer in range(cfg.num_layers):
            total += self.summaries[layer].flops_per_example() + self.interactions[layer].flops_per_example()
        return total + self.head.flops_per_example()

    def fixed_flops(self) -> float:
        """Per-batch FLOPs that do not scale with the batch (shared seed projections)."""
        return sum(t.fixed_flops() for t in self.events.values())
