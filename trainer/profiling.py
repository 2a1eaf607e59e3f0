"""Where a training step's time goes: torch.profiler over a window of steps.

``logging.profile.num_steps > 0`` profiles steps ``[start_step, start_step + num_steps)``
of rank 0..N (each rank its own files) and writes, under ``<run_dir>/profile/``:

* ``trace_rank<r>.json``: Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing);
* ``summary_rank<r>.json``: the step time split into categories, in ms per step and as shares.

Categories (each profiled op's *self* time goes to exactly one):

=================  ==========================================================================
data               ``kunlun/data``: next batch from the loader + host→device copy
embedding          ``kunlun/embedding_lookup`` (TorchRec input dist, TBE lookup, output dist
                   outside collectives) and TBE backward/fused update ops in backward
dense_compute      ``kunlun/dense_tower`` forward and every other backward op
optimizer          ``kunlun/optimizer``: dense optimizer step and 2D replica sync
communication      collectives anywhere in the step (all-reduce, all-to-all, ...)
other              the rest of the step: loss, finiteness flags, logging, Python
=================  ==========================================================================

The regions are ``torch.profiler.record_function`` ranges set by the trainer and
``RecModel``; a profiler keeps its own timings, so nothing is measured when profiling
is off. Times are host (CPU) wall times; on CUDA the device self time per category is
reported as well (``device_ms``), which is what MFU work should read.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

log = logging.getLogger("kunlun")

CATEGORIES = ("data", "embedding", "dense_compute", "optimizer", "communication", "other")
_REGION_CATEGORY = {
    "kunlun/data": "data",
    "kunlun/embedding_lookup": "embedding",
    "kunlun/dense_tower": "dense_compute",
    "kunlun/backward": "dense_compute",
    "kunlun/optimizer": "optimizer",
}
_COMM_MARKERS = (
    "all_reduce",
    "allreduce",
    "all_to_all",
    "alltoall",
    "all2all",
    "all_gather",
    "allgather",
    "reduce_scatter",
    "broadcast",
    "c10d::",
    "gloo",
    "nccl",
    "record_param_comms",
)
_EMBEDDING_MARKERS = ("fbgemm", "split_embedding", "lookupfunction", "embedding_bag", "tbe")
STEP_REGION = "kunlun/step"


def _category(event) -> Optional[str]:
    """Category of one profiled op's self time; None outside a profiled step (e.g. the
    logging all-reduce between steps, recorded while the profiler runs)."""
    parent, region = event, None
    while parent is not None:
        if parent.name in _REGION_CATEGORY and region is None:
            region = parent.name
        if parent.name == STEP_REGION:
            break
        parent = parent.cpu_parent
    if parent is None:
        return None
    name = event.name.lower()
    if any(m in name for m in _COMM_MARKERS):
        return "communication"
    if region is None:
        return "other"
    if region == "kunlun/backward" and any(m in name for m in _EMBEDDING_MARKERS):
        return "embedding"
    return _REGION_CATEGORY[region]


def summarize(prof: torch.profiler.profile, num_steps: int) -> Dict:
    """Per-step ms and shares of each category (host time; device time on CUDA)."""
    events = prof.events()
    step_us = sum(e.cpu_time_total for e in events if e.name == STEP_REGION)
    host = {c: 0.0 for c in CATEGORIES}
    device = {c: 0.0 for c in CATEGORIES}
    for e in events:
        if e.name == STEP_REGION:
            continue
        cat = _category(e)
        if cat is None:
            continue
        host[cat] += e.self_cpu_time_total
        device[cat] += getattr(e, "self_device_time_total", 0.0) or 0.0
    # Self times of the regions themselves (Python between ops) belong to their category;
    # what is left of the step wall time (e.g. the step region's own self time) is "other".
    host["other"] += max(step_us - sum(host.values()), 0.0)
    n = max(num_steps, 1)
    out = {
        "steps": num_steps,
        "step_ms": step_us / 1e3 / n,
        "host_ms": {c: v / 1e3 / n for c, v in host.items()},
        "host_share": {c: (v / step_us if step_us else 0.0) for c, v in host.items()},
    }
    out["outside_dense_compute_share"] = 1.0 - out["host_share"]["dense_compute"]
    dev_total = sum(device.values())
    if dev_total > 0:
        out["device_ms"] = {c: v / 1e3 / n for c, v in device.items()}
        out["device_share"] = {c: v / dev_total for c, v in device.items()}
    return out


class StepProfiler:
    """Profiles a window of training steps; ``region(name)`` marks the parts of a step."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, num_steps: int, device: torch.device):
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.start, self.stop = start_step, start_step + num_steps
        self.device = device
        self._prof: Optional[torch.profiler.profile] = None
        self._steps = 0
        self.summary: Optional[Dict] = None

    @property
    def enabled(self) -> bool:
        return self.stop > self.start

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wraps one whole training step (``step`` = its 0-based index)."""
        if not self.enabled or not (self.start <= step < self.stop):
            yield
            return
        if self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        with torch.profiler.record_function(STEP_REGION):
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._steps += 1
        if step + 1 == self.stop:
            self.finish()

    def region(self, name: str):
        return torch.profiler.record_function(name) if self._prof is not None else nullcontext()

    def finish(self) -> Optional[Dict]:
        """Stops a running profile (also when training ends inside the window) and writes files."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.summary = summarize(prof, self._steps)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        (self.dir / f"summary_rank{self.rank}.json").write_text(json.dumps(self.summary, indent=1))
        shares = ", ".join(f"{c} {100 * v:.1f}%" for c, v in self.summary["host_share"].items())
        log.info("profile of %d steps (%.1f ms/step): %s; trace %s", self._steps, self.summary["step_ms"], shares, trace)
        return self.summary
