"""Kernel selection for the ops (GDPA, jagged softmax attention): the one place that maps
``impl`` to the implementation that runs.

``impl`` (the towers' ``gdpa_impl`` config field, passed down unchanged to every module):

* ``"reference"``: the PyTorch reference (any device);
* ``"triton"``: the fused kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* ``"auto"``: Triton on CUDA, the reference elsewhere, decided once per device type and cached
  (as generative-recommenders' kernel selection does), so the choice never varies per call.

:func:`kunlun.model.ops.gdpa.gdpa` resolves every call through :func:`resolve_gdpa_impl`,
:func:`kunlun.model.ops.jagged_attention.jagged_attention` through :func:`resolve_impl` with
its own name in the messages; the values and the per-device ``"auto"`` choice are shared.
Modules that call either op inherit :class:`UsesGDPA` and pass ``self.gdpa_impl``; the model
sets it once for all of them with :func:`set_gdpa_impl` (from ``model.gdpa_impl``), like
generative-recommenders sets its kernel on every module of a model, instead of threading a
string through every constructor. One choice covers both ops (the name is historical: GDPA
came first). Imports only torch.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from kunlun.model.config import GDPA_IMPLS as IMPLS  # the values the tower configs accept

DEFAULT_IMPL = "auto"

_AUTO_BY_DEVICE_TYPE: Dict[str, str] = {}


def check_impl(impl: str, op: str = "gdpa") -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r}; expected one of {IMPLS}")


def auto_impl(device: torch.device) -> str:
    """What ``"auto"`` means on ``device``: ``"triton"`` on CUDA, ``"reference"`` elsewhere."""
    choice = _AUTO_BY_DEVICE_TYPE.get(device.type)
    if choice is None:
        choice = _AUTO_BY_DEVICE_TYPE[device.type] = "triton" if device.type == "cuda" else "reference"
    return choice


def resolve_impl(impl: str, device: torch.device, op: str = "gdpa") -> str:
    """``impl`` → ``"reference"`` or ``"triton"`` for op ``op`` on tensors on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for ``"triton"`` on a
    non-CUDA device unless ``TRITON_INTERPRET=1``. ``op`` only names the op in the messages.
    """
    check_impl(impl, op)
    if impl == "auto":
        impl = auto_impl(device)
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op} impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 to run the kernels on CPU)")
    return impl


def resolve_gdpa_impl(impl: str, device: torch.device) -> str:
    """:func:`resolve_impl` for GDPA (kept for its callers)."""
    return resolve_impl(impl, device, "gdpa")


class UsesGDPA:
    """Mixin of the modules that call a jagged attention op (:func:`kunlun.model.ops.gdpa.gdpa`,
    :func:`kunlun.model.ops.jagged_attention.jagged_attention` and their ``_shared_q`` /
    ``_dense_kv`` forms): their kernel choice, ``gdpa_impl`` (default ``"auto"``), set for a
    whole model by :func:`set_gdpa_impl`."""

    gdpa_impl: str = DEFAULT_IMPL


def set_gdpa_impl(model: torch.nn.Module, impl: str) -> None:
    """Use ``impl`` (``auto``, ``reference``, ``triton``) in every jagged-attention module of
    ``model`` (GDPA and softmax alike)."""
    check_impl(impl)
    for module in model.modules():
        if isinstance(module, UsesGDPA):
            module.gdpa_impl = impl
