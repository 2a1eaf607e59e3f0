"""Model FLOPs and MFU.

MFU = achieved model FLOP/s ÷ peak FLOP/s (docs/architecture.md §6). Model FLOPs per
training example = :data:`TRAIN_FLOPS_FACTOR` × the tower's analytic forward FLOPs
(embedding lookups and elementwise work excluded).

One backward convention for every matmul, attention included: backward = 2× forward (the
gradients w.r.t. both operands of each product), so forward + backward = 3× forward. These
are *model* FLOPs: work a kernel repeats to save memory (FlashAttention-style kernels, and
the GDPA kernels, recompute ``Q Kᵀ`` in backward, which the "backward = 2.5× forward"
attention convention counts) is not model work, so it is not counted — MFU, not HFU. Peak: a table of bf16 dense datasheet
numbers for known GPUs; on CPU, a matmul probe of the training dtype measured at start.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

from kunlun.model.flops import LengthStats

# bf16 dense (non-sparse) peak TFLOP/s, vendor datasheets (SXM parts).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}
# fp32 peak TFLOP/s (CUDA cores; PyTorch's default matmul precision does not use TF32), datasheets.
GPU_PEAK_TFLOPS_FP32 = {"H100": 67.0, "H200": 67.0, "B200": 80.0, "A100": 19.5}
BACKWARD_FLOPS_FACTOR = 2.0  # backward FLOPs ÷ forward FLOPs, every matmul (attention too)
TRAIN_FLOPS_FACTOR = 1.0 + BACKWARD_FLOPS_FACTOR  # forward + backward ÷ forward


def gpu_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Datasheet peak of this GPU for matmuls in ``dtype`` (bf16/fp16 tensor cores, or fp32)."""
    name = torch.cuda.get_device_name(device)
    table = GPU_PEAK_TFLOPS_FP32 if dtype == torch.float32 else GPU_PEAK_TFLOPS
    for key, tflops in table.items():
        if key in name:
            return tflops
    return None


def matmul_probe_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 512, repeats: int = 5) -> float:
    """Measured dense matmul rate of this process (median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e12


def format_flops(flops: float) -> str:
    """``1.52e6`` → ``"1.52 MFLOPs"``: a unit that shows three significant digits (a small
    tower's per-example count printed in GFLOPs read as 0.0000)."""
    for scale, unit in ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOPs"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` → ``"fp32"`` or ``"bf16"`` (auto: bf16 on GPU, fp32 on CPU, where
    bf16 matmuls are emulated and slower)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """``{"peak": ..., "probe": ...}`` TFLOP/s of one rank's device for matmuls in ``dtype``:
    the dtype the dense tower actually computes in (``trainer.precision``), so MFU divides
    bf16 work by the bf16 peak and fp32 work by the fp32 one."""
    probe = matmul_probe_tflops(device, dtype, n=4096 if device.type == "cuda" else 512)
    table = gpu_peak_tflops(device, dtype) if device.type == "cuda" else None
    return {"peak": table if table is not None else probe, "probe": probe}


def average_sequence_lengths(source, num_examples: int = 4096, seed: int = 0, num_windows: int = 32, split: str = "train") -> Dict[str, LengthStats]:
    """Kept history lengths per event type (events per example, after ``max_len``) on about
    ``num_examples`` examples of ``split`` (default train): ``{event type: LengthStats}``.

    Each value is a ``float`` equal to the mean length (what callers logging "mean history
    lengths" print) that also carries the sampled lengths, so ``flops_per_example`` charges
    full self-attention ``E[L²]`` and windowed attention its exact band, not ``mean(L)²``.

    The sample is ``num_windows`` contiguous windows, one at a random offset inside each of
    ``num_windows`` equal strata of the split. Spread over the whole split because histories
    grow with time and files are often time-sorted (one window of a time-sorted file read
    20.0 for a true mean of 13.8); contiguous because file sources decode whole row groups /
    CSV blocks, so the sample decodes at most ~2 chunks per window, not one per example
    (MovieLens and synthetic sources cost the same for any indices).
    """
    total = source.num_examples(split)
    if total <= num_examples:
        indices = np.arange(total)
    else:
        bounds = np.linspace(0, total, num_windows + 1).astype(np.int64)  # stratum k: [bounds[k], bounds[k + 1])
        strata = np.diff(bounds)
        window = min(-(-num_examples // num_windows), int(strata.min()))
        starts = bounds[:-1] + np.random.default_rng(seed).integers(0, strata - window + 1)
        indices = (starts[:, None] + np.arange(window)).ravel()
    block = source.read(split, indices)
    return {name: LengthStats(np.asarray(ev.lengths)) for name, ev in block.events.items()}
