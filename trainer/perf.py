"""Model FLOPs and MFU.

MFU = achieved model FLOP/s ÷ peak FLOP/s (docs/architecture.md §6). Model FLOPs per
training example = 3 × the tower's analytic forward FLOPs (backward ≈ 2× forward;
embedding lookups and elementwise work excluded). Peak: a table of bf16 dense datasheet
numbers for known GPUs; on CPU, a matmul probe of the training dtype measured at start.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

# bf16 dense (non-sparse) peak TFLOP/s, vendor datasheets (SXM parts).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}
TRAIN_FLOPS_FACTOR = 3.0


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
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


def peak_tflops(device: torch.device) -> Dict[str, float]:
    """``{"peak": ..., "probe": ...}`` TFLOP/s of one rank's device."""
    probe = matmul_probe_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32, n=4096 if device.type == "cuda" else 512)
    table = gpu_peak_tflops(device) if device.type == "cuda" else None
    return {"peak": table if table is not None else probe, "probe": probe}


def average_sequence_lengths(source, num_examples: int = 4096, seed: int = 0) -> Dict[str, float]:
    """Mean kept history length per event type on a sample of the train split."""
    n = source.num_examples("train")
    # A contiguous window at a random offset: file sources decode whole row groups, so a
    # scattered sample would touch thousands of them.
    size = min(n, num_examples)
    start = int(np.random.default_rng(seed).integers(0, n - size + 1))
    block = source.read("train", np.arange(start, start + size))
    return {name: float(np.mean(ev.lengths)) for name, ev in block.events.items()}
