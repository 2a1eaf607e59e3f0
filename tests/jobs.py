"""Test helpers (importable as `jobs`, see setup.cfg pythonpath): run kunlun jobs as real processes (torchrun / torchx), read results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def job_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores: no oversubscription
    env["PYTHONUNBUFFERED"] = "1"
    return env


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script folder, not a package) as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free right now on localhost (for a multi-node rendezvous run on one
    machine; single-node torchrun/torchx jobs pick their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, overrides: List[str], config: str = "tiny", timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m kunlun.launch.main --config C overrides``."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "kunlun.launch.main", "--config", config, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def run_torchx(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``torchx <args>`` from the repository root (``.torchxconfig``: local_cwd), output captured."""
    return subprocess.run([str(BIN / "torchx"), *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def run_single(overrides: List[str], config: str = "tiny", timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kunlun.launch.main", "--config", config, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)


def final_metrics(run_dir: Path) -> Dict[str, float]:
    return json.loads((run_dir / "final_metrics.json").read_text())


def load_checkpoint_tensors(ckpt: Path) -> Dict[str, object]:
    """Whole (unsharded) state of a DCP checkpoint, flattened ``key → tensor/value``."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / (ckpt.name + ".unsharded.pt")
    dcp_to_torch_save(str(ckpt / "dcp"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    flat: Dict[str, object] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = obj

    walk("", state)
    return flat


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "meta.json").exists())
    return ckpts[-1] if ckpts else None
