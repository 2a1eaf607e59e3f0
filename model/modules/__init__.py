"""Layers built from ``kunlun.model.ops``: temporal encoding, GDPA personalised FFN,
hierarchical seed pooling, sliding-window attention, Wukong / mixture of Wukong experts,
InterFormer-style gating. Plain modules: no distributed code, no TorchRec."""
