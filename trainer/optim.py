"""The optimizers and the learning-rate schedule of a job.

* :func:`build_optimizer`: TorchRec's ``CombinedOptimizer`` of the fused sparse optimizer
  (row-wise AdaGrad, applied inside backward by the TBE kernels) and the dense one
  (``optim.dense``) over the parameters the fused one does not own.
* :func:`build_lr_scheduler`: ``torch.optim.lr_scheduler.LambdaLR`` over both, with
  :func:`lr_factor` (linear warm-up, then constant / linear / cosine decay to
  ``trainer.max_steps``). The trainer steps it after every training step (skipped ones
  too), so before step ``s`` every group holds ``base · lr_factor(s)``. TorchRec's fused
  optimizer copies its group's rate into the TBE kernels in ``zero_grad()`` / ``step()``;
  a pipeline's ``zero_grad()`` at the start of step ``s`` therefore hands the kernels step
  ``s``'s rate before the backward that applies it.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch.optim.lr_scheduler import LambdaLR
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter


def build_optimizer(model: torch.nn.Module, o) -> CombinedOptimizer:
    """``o``: the job's ``optim`` config. Groups are named ``sparse`` and ``dense``."""
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))

    def make(params):
        if o.dense == "adam":
            return torch.optim.Adam(params, lr=o.dense_lr, weight_decay=o.weight_decay)
        if o.dense == "adamw":
            return torch.optim.AdamW(params, lr=o.dense_lr, weight_decay=o.weight_decay)
        if o.dense == "adagrad":
            return torch.optim.Adagrad(params, lr=o.dense_lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=o.dense_lr, weight_decay=o.weight_decay)

    return CombinedOptimizer([("sparse", model.fused_optimizer), ("dense", KeyedOptimizerWrapper(dense_params, make))])


def lr_factor(step: int, o, max_steps: int) -> float:
    """Multiplier of both base learning rates for the update made at ``step`` (0-based)."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    frac = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
    return 1.0 - frac if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))


def build_lr_scheduler(optimizer: CombinedOptimizer, base_lrs: Dict[str, float], o, max_steps: int, step: int) -> LambdaLR:
    """A ``LambdaLR`` positioned at ``step`` (0 for a new run, the checkpoint's step after a
    resume): every group of optimizer ``name`` gets ``base_lrs[name] · lr_factor(step)``.
    The position is the trainer's step count, so a checkpoint needs no scheduler state."""
    for name, opt in optimizer.optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = base_lrs[name]
    return LambdaLR(optimizer, lambda s: lr_factor(s, o, max_steps), last_epoch=step - 1)


def current_lrs(optimizer: CombinedOptimizer) -> Dict[str, float]:
    """``{"sparse": lr, "dense": lr}`` as the groups hold them now."""
    return {name: opt.param_groups[0]["lr"] for name, opt in optimizer.optimizers if opt.param_groups}
