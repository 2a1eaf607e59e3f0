"""Layers built from ``kunlun.model.ops``: temporal encoding, GDPA personalised FFN,
hierarchical seed pooling, sliding-window attention, Wukong / mixture of Wukong experts,
InterFormer-style gating; plus the pieces the towers share: jagged helpers and pooling
(``jagged``), the context tokenizer (``tokenizer``), the prediction head (``head``) and the
MLP (``mlp``). Plain modules: no distributed code, no TorchRec."""
