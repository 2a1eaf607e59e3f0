"""Plain ReLU MLP and its analytic FLOPs, shared by the towers' heads and DLRM/DCNv2's MLPs."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(sizes: Sequence[int], final_activation: bool = True) -> nn.Sequential:
    """``Linear(sizes[i] → sizes[i+1])`` with ReLU between (and after the last unless ``final_activation=False``)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_flops(sizes: Sequence[int]) -> int:
    """Forward FLOPs per example of :func:`mlp` (matmuls only, multiply-add = 2)."""
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))
