"""Joining the process group, seeding, and the trainer's small collectives.

Only ``parallel/`` and ``trainer/`` touch ``torch.distributed``; this module is where a job
becomes a member of its group (``init_distributed``), whatever launched it: torchrun or
TorchX (``RANK``/``WORLD_SIZE`` set, with a per-attempt store namespace when torchrun
restarts the workers), or plain ``python`` (a one-process group).
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from kunlun.common import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors for collectives live: NCCL needs them on the GPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group torchrun set up, or make a 1-process one (plain ``python``).

    ``device``: ``trainer.device`` (auto | cpu | cuda); ``backend``: ``parallel.backend``
    (auto = NCCL with CUDA, else gloo)."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'trainer.device' = 'cuda' is invalid: no CUDA device is visible; use 'cpu' or 'auto'")
    backend = backend if backend != "auto" else ("nccl" if want_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart is not None:
                # torchrun's agent keeps one store across restarts and hands it to the workers
                # without a per-attempt prefix, so a restarted group can read its peers' *old*
                # gloo addresses ("connectFullMesh failed ... Connection refused"). Namespace
                # every attempt's keys.
                base = dist.TCPStore(
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    world,
                    is_master=False,
                    timeout=timedelta(minutes=10),
                )
                store = dist.PrefixStore(f"kunlun/attempt{restart}", base)
                dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
            else:
                dist.init_process_group(backend=backend)
        else:
            store = dist.FileStore(tempfile.mktemp(prefix="kunlun-store-"), 1)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch generators of this process."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def all_mean(value: float, device: torch.device) -> float:
    """The mean of a Python number over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_max_flags(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise MAX of a small flag vector over all ranks (in place; returned)."""
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def broadcast_error(error, src: int = 0):
    """Rank ``src``'s error message (or None) on every rank."""
    box = [error]
    dist.broadcast_object_list(box, src=src)
    return box[0]
