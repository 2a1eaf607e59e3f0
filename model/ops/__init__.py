"""Operators: one dispatching entry point each, a PyTorch reference in ``pytorch/`` and
fused kernels in ``triton/``; ``select`` picks which one runs. Imports only torch (and triton lazily)."""

from kunlun.model.ops.gdpa import gdpa, gdpa_dense_kv, gdpa_shared_q  # noqa: F401
from kunlun.model.ops.jagged_attention import jagged_attention, jagged_attention_shared_q  # noqa: F401
from kunlun.model.ops.select import DEFAULT_IMPL, IMPLS, resolve_gdpa_impl, resolve_impl  # noqa: F401
