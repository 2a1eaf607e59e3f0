"""Pointwise activations used by GDPA, by name, with a stable integer code per name.

The codes are what the Triton kernels specialise on (``tl.constexpr``); the PyTorch
functions here are the reference the kernels are tested against.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
import torch.nn.functional as F

ACTIVATIONS: Dict[str, int] = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}

_TORCH: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def torch_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return _TORCH[name]


def per_head(activation: Union[str, Sequence[str]], num_heads: int) -> List[str]:
    """Normalise ``activation`` (one name, or one per head) to a list of ``num_heads`` names."""
    names = [activation] * num_heads if isinstance(activation, str) else list(activation)
    if len(names) != num_heads:
        raise ValueError(f"activation: got {len(names)} names for {num_heads} heads: {names}")
    for n in names:
        if n not in ACTIVATIONS:
            raise ValueError(f"activation {n!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return names
