"""Operators: one dispatching entry point each, a PyTorch reference in ``pytorch/`` and
fused kernels in ``triton/``. Imports only torch (and triton lazily)."""

from kunlun.model.ops.gdpa import gdpa, gdpa_dense_kv, gdpa_shared_q  # noqa: F401
