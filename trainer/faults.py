"""Faults inside the training step: preemption (SIGTERM) and non-finite values.

* :class:`SigtermFlag` turns SIGTERM into a flag the step reads (every rank agrees on it
  through the step's one collective), so the current step finishes and a checkpoint is saved;
  a second SIGTERM exits at once.
* :func:`nonfinite_dense_grads` finds NaN/Inf dense gradients with one fused reduction.
* :class:`Preempted` / :class:`NonFiniteError` and their exit codes are what
  ``launch/main.py`` turns into the process's exit status.
"""

from __future__ import annotations

import signal
import threading
from typing import List, Sequence, Tuple

import torch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again": a checkpoint was saved, rerun resumes
NONFINITE_EXIT_CODE = 3


class Preempted(Exception):
    """SIGTERM handled: the checkpoint of the current step is saved."""


class NonFiniteError(RuntimeError):
    """NaN/Inf loss or gradients under ``trainer.nonfinite_policy`` (diagnostic written)."""


class SigtermFlag:
    """While installed, SIGTERM sets :attr:`requested` instead of killing the process; a
    second SIGTERM (a launcher escalating) restores the previous handler and exits. Outside
    the step loop SIGTERM must terminate as usual (e.g. a launcher stopping the workers after
    another rank failed), so the loop installs it and restores it when it leaves."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.requested:
                self.restore()
                raise SystemExit(128 + signal.SIGTERM)
            self.requested = True

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def nonfinite_dense_grads(named_params: Sequence[Tuple[str, torch.nn.Parameter]]) -> List[str]:
    """Names of parameters with NaN/Inf gradients (parameters without one are skipped: the
    fused embedding tables never set ``.grad``). One host read for the common all-finite case;
    names are resolved only on failure."""
    named = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not named:
        return []
    grads = [g for _, g in named]
    if all(type(g) is torch.Tensor and g.numel() for g in grads):
        # DDP (plain tensors): one fused reduction over all gradients (max |g|: NaN or Inf
        # stays non-finite) instead of a kernel per parameter.
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
    else:  # FSDP's DTensor gradients (their reduction spans the shards), empty tensors
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
