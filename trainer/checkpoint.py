"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, verified, resharding.

Layout under ``run_dir/checkpoints/``::

    step_00000200/
        dcp/            DCP shards + .metadata: model (sharded tables, dense), optimizers
        rng/rank<r>.pt  each rank's RNG state (tensors only; loaded with weights_only=True)
        manifest.json   every file with size and sha256
        meta.json       step, data position, world size, parameter shapes, early-stopping
                        state; written last
    best.json           the best validation step (``checkpoint.keep_best``): step, folder,
                        metric and value; that folder is exempt from retention

A checkpoint is written to ``.tmp-step_…`` and renamed to ``step_…`` by rank 0 only after
every rank finished and the manifest and ``meta.json`` are fsynced, so a directory named
``step_…`` is always complete: a process that dies mid-save leaves only a ``.tmp-`` folder,
which is never loaded and is removed at the next start. Retention deletes older
checkpoints only after the new one is committed.

Non-tensor state (step, data position) lives in ``meta.json``, not in DCP: DCP treats
non-tensor leaves as rank-local and fails to load them at another world size ("Missing
key in checkpoint state_dict"),
and JSON is not executable. DCP reshards tables and optimizer state on load, so a
checkpoint saved at 2 ranks loads at 1 or 4.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException

from kunlun.common import sha256_file

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, corrupted or from another model."""


# ------------------------------------------------------------ DCP metadata, safely
# DCP's FileSystemReader reads ``dcp/.metadata`` with plain ``pickle.load``: a crafted file
# (with a manifest rewritten to match, since whoever writes the folder writes the manifest
# too) would run code on resume. We unpickle it admitting only what DCP's metadata is made
# of: DCP's metadata classes, the storage-info record, torch sizes/dtypes/layouts/memory
# formats, and paths.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


def _allowed_global(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == dcp_metadata.__name__:  # a class defined in DCP's metadata module
        obj = getattr(dcp_metadata, name, None)
        return isinstance(obj, type) and obj.__module__ == module
    if module == "torch":  # torch.float32, torch.strided, torch.contiguous_format
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return False


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP checkpoint metadata")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path) -> "dcp_metadata.Metadata":
    """Unpickle a DCP ``.metadata`` file admitting only metadata types; :class:`CheckpointError`
    naming the file otherwise (nothing in it is executed)."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: refusing to load the checkpoint metadata ({e})") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: not DCP checkpoint metadata (found {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_rng_file(path: Path) -> Dict[str, Any]:
    """A per-rank RNG file, tensors only (``weights_only=True``): a pickled object in it (a
    crafted file whose manifest entry was rewritten to match) is refused, never run."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # UnpicklingError, or RuntimeError for a damaged archive
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # torch's weights_only message: a paragraph about torch.load's defaults, then the cause
        detail = lines[1].removeprefix("WeightsUnpickler error: ") if lines[0].startswith("Weights only load failed") and len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: refusing to load the RNG state ({detail})") from e


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return sha256_file(path)


def global_shapes(state: Dict[str, Any], prefix: str = "") -> Dict[str, List[int]]:
    """Flattened ``key → global shape`` of a (possibly sharded) state dict."""
    out: Dict[str, List[int]] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(global_shapes(v, key + "."))
        elif isinstance(v, torch.Tensor) or type(v).__name__ == "ShardedTensor":  # global size
            out[key] = list(v.size())
    return out


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and finds checkpoints of one run. Every method is called on all ranks."""

    read_only = False  # ReadOnlyCheckpointer: never creates, cleans up or changes anything

    def __init__(self, run_dir: Path, cfg, rank: int, world_size: int, comm_device: torch.device = torch.device("cpu")):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.comm_device = comm_device  # NCCL collectives need GPU tensors
        self.best_step: Optional[int] = None  # exempt from retention (checkpoint.keep_best)
        if rank == 0 and not self.read_only:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
            # A re-save of step N moves the old step_N aside before renaming the new one in;
            # a crash between the two renames leaves only .replaced-step_N: put it back.
            for old in self.root.glob(".replaced-step_*"):
                final = self.root / old.name[len(".replaced-") :]
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    log.warning("restoring %s: a re-save of it was interrupted", final)
                    os.rename(old, final)
        _barrier()

    # ------------------------------------------------------------------ listing
    def complete(self) -> List[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    # --------------------------------------------------------------------- save
    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any]) -> Path:
        """Write ``state`` (DCP; tensors, ShardedTensor, DTensor) and ``meta`` (JSON) for ``step``.

        A failure on any rank (disk full, I/O error) removes the partial ``.tmp-`` folder on
        every rank's behalf and raises :class:`CheckpointError` on all ranks; committed
        checkpoints are never touched, so the previous one stays loadable.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        t0 = time.time()
        error: Optional[BaseException] = None
        try:
            if self.rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            error = e
        if self._all_ok(error is None):
            try:
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp / "dcp"), sync_files=True))
                rng = {"torch": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state()
                rng_path = tmp / "rng" / f"rank{self.rank}.pt"
                torch.save(rng, rng_path)
                with open(rng_path, "rb+") as f:
                    os.fsync(f.fileno())
            except (Exception, CheckpointException) as e:  # DCP re-raises a failure of any rank on every rank
                error = e  # (as CheckpointException, a BaseException: `except Exception` misses it)
        if self._all_ok(error is None):
            try:
                if self.rank == 0:
                    self._commit(tmp, final, step, meta)
            except OSError as e:
                error = e
        if not self._all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete()
            reason = self._failure_reasons(error)
            raise CheckpointError(
                f"saving checkpoint {final} failed ({reason}); the partial files were removed and "
                f"{'the previous checkpoint ' + str(previous[-1]) + ' is intact' if previous else 'no earlier checkpoint exists'}"
            )
        if self.rank == 0:
            self._retain()
            log.info("saved checkpoint %s (%.1fs)", final, time.time() - t0)
        _barrier()
        return final

    def _failure_reasons(self, error: Optional[BaseException]) -> str:
        """Every rank's save error, one line each (a collective): all ranks name the cause,
        not just the rank whose disk filled up."""
        if error is None:
            local = None
        elif isinstance(error, CheckpointException):  # DCP's: the failed ranks' errors, without its tracebacks
            local = "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in sorted(error.failures.items()))
        else:
            local = f"rank {self.rank}: {type(error).__name__}: {error}"
        gathered = [local]
        if dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, local)
        return "; ".join(dict.fromkeys(r for r in gathered if r)) or "another rank failed to write its part"

    def _all_ok(self, ok: bool) -> bool:
        """True when every rank's ``ok`` is True (a collective; every rank must call it)."""
        if not dist.is_initialized():
            return ok
        t = torch.tensor([0.0 if ok else 1.0], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() == 0.0

    def _commit(self, tmp: Path, final: Path, step: int, meta: Dict[str, Any]) -> None:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        write_json_atomic(tmp / "manifest.json", manifest)
        # meta.json is written last: a step_ folder without it is never considered complete.
        write_json_atomic(tmp / "meta.json", {**meta, "step": step, "world_size": self.world_size, "format": FORMAT_VERSION, "saved_at": time.time()})
        for d in [tmp / "dcp", tmp / "rng", tmp]:
            _fsync_dir(d)
        replaced = self.root / f".replaced-{final.name}"
        if final.exists():  # a re-save of the same step: move the old one aside, never delete first
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(replaced, ignore_errors=True)

    def path_of(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def _retain(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the best one when it is older than those."""
        best = self.path_of(self.best_step) if self.best_step is not None else None
        ckpts = self.complete()
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep)]:
            if old == best:
                continue
            log.info("deleting old checkpoint %s (checkpoint.keep=%d)", old, self.cfg.keep)
            shutil.rmtree(old, ignore_errors=True)

    def mark_best(self, step: int, info: Dict[str, Any]) -> None:
        """Record the committed checkpoint of ``step`` as the best one (``best.json``) and
        exempt it from retention from now on. Called on every rank; rank 0 writes."""
        self.best_step = step
        if self.rank == 0:
            write_json_atomic(self.root / "best.json", {**info, "step": step, "checkpoint": self.path_of(step).name})

    def best(self) -> Optional[Path]:
        """The best checkpoint recorded in ``best.json``, if it still exists complete."""
        try:
            info = json.loads((self.root / "best.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        path = self.root / str(info.get("checkpoint", ""))
        return path if path in self.complete() else None

    # --------------------------------------------------------------------- load
    def verify(self, path: Path) -> None:
        """Raise :class:`CheckpointError` if a file is missing, truncated or altered."""
        manifest_path = path / "manifest.json"
        if not (path / "meta.json").is_file() or not manifest_path.is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json/manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{manifest_path}: unreadable manifest: {e}") from e
        for rel, info in manifest.items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in the manifest but missing")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(f"{f}: {size} bytes, manifest says {info['bytes']} (truncated or overwritten)")
            if self.cfg.verify and _sha256(f) != info["sha256"]:
                raise CheckpointError(f"{f}: sha256 differs from the manifest (corrupted)")
        read_dcp_metadata(path / "dcp" / ".metadata")  # only metadata types, before anything loads it
        for rng_path in sorted((path / "rng").glob("rank*.pt")):  # tensors only, before any rank loads them
            load_rng_file(rng_path)

    def read_meta(self, path: Path) -> Dict[str, Any]:
        try:
            return json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'meta.json'}: unreadable: {e}") from e

    def choose(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from (same answer on every rank), or None to start fresh.

        ``auto``: the newest checkpoint that verifies; a bad one is reported and the previous
        one is tried. ``never``: None. A path: that checkpoint, which must verify.
        """
        if resume == "never":
            return None
        chosen: Optional[str] = None
        error: Optional[str] = None
        if self.rank == 0:
            if resume == "auto":
                for cand in reversed(self.complete()):
                    try:
                        self.verify(cand)
                        chosen = str(cand)
                        break
                    except CheckpointError as e:
                        log.error("checkpoint %s is unusable, trying an older one: %s", cand, e)
            else:
                try:
                    self.verify(Path(resume))
                    chosen = str(Path(resume))
                except CheckpointError as e:
                    error = str(e)
        box = [chosen, error]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        if box[1]:
            raise CheckpointError(box[1])
        return Path(box[0]) if box[0] else None

    def has_state(self, path: Path, key: str) -> bool:
        """Whether the DCP state of checkpoint ``path`` holds top-level key ``key``."""
        stored = read_dcp_metadata(path / "dcp" / ".metadata").state_dict_metadata
        return any(k == key or k.startswith(key + ".") for k in stored)

    def load(self, path: Path, state: Dict[str, Any], expected_shapes: Dict[str, List[int]]) -> Dict[str, Any]:
        """Load into ``state`` in place (resharding as needed); returns ``meta``."""
        meta = self.read_meta(path)
        saved = meta.get("shapes", {})
        diffs = [f"{k}: checkpoint {saved.get(k)} vs model {v}" for k, v in sorted(expected_shapes.items()) if k in saved and saved[k] != v]
        missing = sorted(set(expected_shapes) - set(saved)) if saved else []
        if diffs or missing:
            lines = diffs[:20] + [f"{k}: not in the checkpoint" for k in missing[:20]]
            raise CheckpointError(f"{path} was saved from a different model; differing parameters:\n  " + "\n  ".join(lines))
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path / "dcp")))
        rng_path = path / "rng" / f"rank{self.rank}.pt"
        if rng_path.is_file():
            rng = load_rng_file(rng_path)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return meta


class ReadOnlyCheckpointer(Checkpointer):
    """The checkpointer of an evaluation (``Trainer(cfg, evaluate_only=True)``, ``kunlun
    eval``): it finds, verifies and loads checkpoints and never changes ``checkpoints/``. A
    training job may still be writing there, so the start-up clean-up of interrupted saves
    (which deletes ``.tmp-`` folders) is skipped, and saving, retention and best-step marks
    refuse."""

    read_only = True

    def save(self, step: int, state: Dict, meta: Dict) -> Path:
        raise RuntimeError(f"read-only checkpointer: refusing to save step {step} into {self.root}")

    def _retain(self) -> None:
        raise RuntimeError(f"read-only checkpointer: refusing to delete checkpoints in {self.root}")

    def mark_best(self, step: int, info: Dict) -> None:
        raise RuntimeError(f"read-only checkpointer: refusing to write {self.root / 'best.json'}")
