"""The export folder: its files, the manifest that guards them, and the table formats.

::

    DIR/manifest.json     format version, creator, every other file with its size and sha256
    DIR/tower.pt2         the dense tower, ``torch.export`` (kunlun.model.export.FlatTower)
    DIR/tower.aoti.pt2    optional: the same program compiled ahead of time by AOTInductor
                          (``--aoti``; a shared library for this platform and torch version)
    DIR/tables.pt         embedding tables: a dict of tensors (torch.save; loaded with weights_only=True)
    DIR/schema.json       feature schema, pooling of each context feature, embedding dtype, source
    DIR/data.yaml         the run's ``data`` section (id mapping, columns, histories); vocab_dir → vocab/
    DIR/vocab/...         the vocabularies of ``id_mapping=vocab`` tables (file sources)
    DIR/config.yaml       the run's resolved config, as trained
    DIR/metrics.json      the checkpoint's step and the metrics it was selected on

Tables (``tables.pt``), per schema table ``t`` with ``N`` rows of width ``D``:

* ``fp32`` / ``fp16``: ``t`` → ``[N, D]`` float32 / float16;
* ``int8``: ``t.q`` ``[N, D]`` uint8 and ``t.scale``, ``t.bias`` ``[N]`` float32, with
  ``row ≈ q * scale + bias``: row-wise asymmetric 8-bit, the layout of fbgemm's
  ``FusedNBitRowwise`` 8-bit tables (TorchRec's inference quantization). It is done here
  in plain torch so the loader needs neither TorchRec nor fbgemm.

No pickled Python objects anywhere: JSON, YAML, ``weights_only`` tensors, ``torch.export``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable

import torch

from kunlun.common import sha256_file

FORMAT = "kunlun-export/1"
MANIFEST = "manifest.json"
TOWER = "tower.pt2"
TOWER_AOTI = "tower.aoti.pt2"  # optional (kunlun export --aoti): the tower compiled by AOTInductor
BACKENDS = ("auto", "export", "aoti")
TABLES = "tables.pt"
SCHEMA = "schema.json"
DATA = "data.yaml"
CONFIG = "config.yaml"
METRICS = "metrics.json"
VOCAB_DIR = "vocab"
EMBEDDING_DTYPES = ("fp32", "fp16", "int8")


class ExportError(ValueError):
    """A damaged, incomplete or unsupported export folder, or input it cannot score."""


sha256 = sha256_file


def write_manifest(root: Path, info: Dict) -> Dict:
    """Write ``manifest.json`` listing every file under ``root`` (but itself) with size and sha256."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = dict(info, format=FORMAT, files=files)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: Path, verify: bool = True) -> Dict:
    """``manifest.json`` of ``root``; with ``verify``, every listed file must exist with its size
    and sha256 and no other file may be present. Raises :class:`ExportError` naming the file."""
    path = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"{root}: not a folder (expected a `kunlun export` folder)")
    if not path.is_file():
        raise ExportError(f"{path}: missing: {root} is not a complete `kunlun export` folder (the manifest is written last)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{path}: format {got!r}: expected {FORMAT!r} with a 'files' table")
    if verify:
        for rel, want in sorted(manifest["files"].items()):
            f = root / rel
            if not f.is_file():
                raise ExportError(f"{f}: listed in {MANIFEST} but missing: the export folder is damaged")
            if f.stat().st_size != want["bytes"]:
                raise ExportError(f"{f}: {f.stat().st_size} bytes, the manifest says {want['bytes']}: the export folder is damaged")
            if sha256(f) != want["sha256"]:
                raise ExportError(f"{f}: sha256 differs from {MANIFEST}: the file was changed or damaged")
        extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        extra = [e for e in extra if e not in manifest["files"]]
        if extra:
            raise ExportError(f"{root}: files not in {MANIFEST}: {extra[:5]}: the folder was changed after export")
    return manifest


# ------------------------------------------------------------------ tables
def quantize_rowwise_int8(weight: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``weight [N, D]`` → ``q [N, D]`` uint8, ``scale [N]``, ``bias [N]`` (row min / range / 255)."""
    w = weight.float()
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)  # a constant row: any scale, q = 0 reproduces it
    q = torch.round((w - lo[:, None]) / scale[:, None]).clamp(0, 255).to(torch.uint8)
    return {"q": q, "scale": scale, "bias": lo}


def encode_tables(tables: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """``table → [N, D] float32`` → the flat tensor dict stored in ``tables.pt`` for ``dtype``."""
    if dtype not in EMBEDDING_DTYPES:
        raise ExportError(f"embedding dtype {dtype!r}: expected one of {list(EMBEDDING_DTYPES)}")
    out: Dict[str, torch.Tensor] = {}
    for name, w in tables.items():
        w = w.detach().float().contiguous()
        if dtype == "fp32":
            out[name] = w
        elif dtype == "fp16":
            out[name] = w.half()
        else:
            for part, t in quantize_rowwise_int8(w).items():
                out[f"{name}.{part}"] = t.contiguous()
    return out


class Table:
    """One stored table; :meth:`rows` gathers rows as float32 ``[len(ids), D]``."""

    def __init__(self, name: str, stored: Dict[str, torch.Tensor], dtype: str):
        self.name, self.dtype = name, dtype
        if dtype == "int8":
            self.q, self.scale, self.bias = stored[f"{name}.q"], stored[f"{name}.scale"], stored[f"{name}.bias"]
            self.num_rows, self.dim = self.q.shape
        else:
            self.weight = stored[name]
            self.num_rows, self.dim = self.weight.shape

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dtype == "int8":
            return self.q[ids].float() * self.scale[ids, None] + self.bias[ids, None]
        return self.weight[ids].float()


def load_tables(path: Path, dtype: str, names: Iterable[str]) -> Dict[str, Table]:
    """The tables of ``names`` from ``tables.pt`` (``weights_only``: tensors only, no code)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise ExportError(f"{path}: not a readable tensor file ({type(e).__name__}: {e})") from e
    out = {}
    for name in names:
        want = [f"{name}.q", f"{name}.scale", f"{name}.bias"] if dtype == "int8" else [name]
        missing = [k for k in want if k not in stored]
        if missing:
            raise ExportError(f"{path}: table {name!r} ({dtype}) lacks {missing}; the file holds {sorted(stored)[:8]}")
        out[name] = Table(name, stored, dtype)
    return out


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final`` (replacing an earlier export there):
    the old one is renamed aside first, so a crash leaves one complete folder or the other."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        if old.exists():
            import shutil

            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        import shutil

        shutil.rmtree(old)
