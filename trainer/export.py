"""Write a self-contained serving folder from a checkpoint (``kunlun export``).

One process, no process group: DCP checkpoints hold global (unsharded) tensors whatever the
world size, 1D or 2D layout they were saved from, so the tables and the dense tower are read
straight into plain tensors (``dcp.load(..., no_dist=True)``). Then:

* the tables are stored per schema table in the chosen dtype (:mod:`kunlun.serving.format`);
* the tower is exported with ``torch.export`` (:class:`kunlun.model.export.FlatTower`) and
  checked against the eager tower on up to ``sample`` test examples;
* the data section (id mapping, columns, histories; vocabularies copied), the resolved
  config and the checkpoint's metrics are written beside it, then the manifest;
* the folder is written under a temporary name, loaded back with :func:`kunlun.serving.load`
  (manifest verified) and its scores compared with the in-memory ones; only then renamed
  into place. A failure leaves any earlier export at ``out`` untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from kunlun.serving import format as fmt
from kunlun.trainer.checkpoint import CheckpointError, ReadOnlyCheckpointer, SafeFileSystemReader, global_shapes
from kunlun.trainer.config import ConfigError, to_yaml

log = logging.getLogger("kunlun")

EXPORT_TOLERANCE = 1e-5  # exported vs eager tower, max |Δ probability| in fp32 tables
LOW_PRECISION_LIMIT = 0.01  # fp16/int8 tables vs the checkpoint (MovieLens int8: 5e-4, BENCHMARKS.md)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and it is an earlier export."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out}: the folder exists and is not empty; pass --overwrite to replace an earlier export")
    if not (out / fmt.MANIFEST).is_file():
        raise ConfigError(f"--out {out}: --overwrite refused: the folder is not a kunlun export (no {fmt.MANIFEST})")


def _table_keys(state_keys: List[str], schema) -> Dict[str, str]:
    """schema table → its weight's key in the model state dict (``ebc`` bag table or ``ec`` table)."""
    out = {}
    for t in schema.tables:
        for key in (f"ebc.embedding_bags.ctx_{t.name}.weight", f"ec.embeddings.seq_{t.name}.weight"):
            if key in state_keys:
                out[t.name] = key
                break
        else:
            raise CheckpointError(f"table {t.name!r}: no weight in the model (looked for ctx_/seq_{t.name})")
    return out


def read_weights(ckpt: Path, schema, cfg) -> tuple:
    """``(tables: name → [N, D] float32, tower, meta, tasks)`` from ``ckpt``; a checkpoint of another model
    (schema, tower or sizes) is refused naming each differing parameter."""
    from kunlun.model.rec_model import RecModel

    checkpointer = ReadOnlyCheckpointer(cfg.run_dir, cfg.checkpoint, 0, 1)
    checkpointer.verify(ckpt)
    meta = checkpointer.read_meta(ckpt)
    skeleton = RecModel(schema, cfg.model)  # tables on the meta device: shapes only
    expected = global_shapes(skeleton.state_dict())
    saved = meta.get("shapes", {})
    diffs = [f"{k}: checkpoint {saved.get(k)} vs model {v}" for k, v in sorted(expected.items()) if k in saved and saved[k] != v]
    missing = [f"{k}: not in the checkpoint" for k in sorted(set(expected) - set(saved))]
    if diffs or missing:
        lines = "\n  ".join((diffs + missing)[:20])
        raise CheckpointError(f"{ckpt} was saved from a different model than the run's config describes; differing parameters:\n  {lines}")
    keys = _table_keys(list(expected), schema)
    tower = skeleton.tower
    from kunlun.model.ops.select import set_gdpa_impl

    # The exported program must be plain aten ops (portable, runs on CPU): the PyTorch
    # reference of GDPA, whatever kernel the run trained with (same function, tested equal).
    set_gdpa_impl(tower, "reference")
    tower_state = {f"tower.{k}": torch.empty_like(v) for k, v in tower.state_dict().items()}
    from kunlun.trainer.checkpoint import read_dcp_metadata

    stored = read_dcp_metadata(ckpt / "dcp" / ".metadata").state_dict_metadata  # tables may be fp16 (model.embedding_dtype)
    tables = {key: torch.empty(saved[key], dtype=stored[f"model.{key}"].properties.dtype) for key in keys.values()}
    state = {"model": {**tables, **tower_state}}
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt / "dcp")), no_dist=True)
    tower.load_state_dict({k[len("tower.") :]: v for k, v in state["model"].items() if k.startswith("tower.")}, strict=True)
    return {name: state["model"][key].float() for name, key in keys.items()}, tower.eval(), meta, skeleton.tasks


def _scores(outputs: torch.Tensor, tasks) -> torch.Tensor:
    """Task outputs ``[B, T]`` → probabilities of binary tasks, predictions of regression ones."""
    binary = torch.tensor([t.type == "binary" for t in tasks])
    return torch.where(binary, torch.sigmoid(outputs), outputs)


def _sample_block(source, n: int):
    for split in ("test", "eval"):
        try:
            total = source.num_examples(split)
        except KeyError:
            continue
        if total >= 2:
            return source.read(split, np.arange(min(n, total))), split
    raise ConfigError("export: the job's test and validation splits are empty: need at least 2 examples to trace and check the tower")


def _trace_block(block, schema, n: int = 8):
    """A few examples to trace the tower on (``torch.export`` stores them in the program):
    the ones with the longest histories, so that no size is 0 or 1 (those would be
    specialised instead of staying symbolic)."""
    from kunlun.data.block import take_block

    total = sum((np.asarray(block.events[e.name].lengths) for e in schema.event_types), np.zeros(len(block), dtype=np.int64))
    small = take_block(block, np.sort(np.argsort(-total, kind="stable")[: max(2, n)]))
    if all(int(np.asarray(small.events[e.name].lengths).sum()) >= 2 for e in schema.event_types):
        return small
    return block


def _write_data_section(cfg, tmp: Path, source) -> Dict:
    """``data.yaml`` (and ``vocab/``); returns the per-table id mapping for ``schema.json``."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg.data), resolve=True)
    mapping: Dict[str, Dict] = {}
    if cfg.data.source in ("parquet", "csv"):
        for name, t in source.plan.tables.items():
            mapping[name] = {"id_mapping": t.id_mapping, "num_embeddings": int(source.table_sizes[name])}
        vocab_tables = [n for n, t in source.plan.tables.items() if t.id_mapping == "vocab"]
        if vocab_tables:
            from kunlun.data.ids import vocab_path

            (tmp / fmt.VOCAB_DIR).mkdir()
            for name in vocab_tables:
                src = vocab_path(Path(cfg.data.files.vocab_dir), name)
                shutil.copy2(src, tmp / fmt.VOCAB_DIR / src.name)
            index = Path(cfg.data.files.vocab_dir).expanduser() / "vocab.json"
            if index.is_file():
                shutil.copy2(index, tmp / fmt.VOCAB_DIR / "vocab.json")
        data["files"]["vocab_dir"] = fmt.VOCAB_DIR  # the loader points it at DIR/vocab
        # The split settings stay as trained (the schema check wants them); a server never reads those files.
    (tmp / fmt.DATA).write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    return mapping


def export_checkpoint(cfg, ckpt: Path, out: Path, embedding_dtype: str = "fp32", overwrite: bool = False, sample: int = 512, aoti: bool = False) -> Dict:
    """Write the export folder ``out`` for checkpoint ``ckpt`` of the run ``cfg`` describes
    (``aoti``: also compile the tower with AOTInductor); returns a summary."""
    from kunlun.data.sources import build_source
    from kunlun.model.embeddings import mean_pooled_tables
    from kunlun.model.export import FlatTower, export_tower
    from kunlun.serving.model import load, lookup, schema_to_json

    if embedding_dtype not in fmt.EMBEDDING_DTYPES:
        raise ConfigError(f"--embedding-dtype {embedding_dtype!r}: expected one of {list(fmt.EMBEDDING_DTYPES)}")
    out = Path(out).expanduser().resolve()
    check_output(out, overwrite)
    t0 = time.time()
    if cfg.data.source in ("parquet", "csv"):
        from kunlun.data.sources.files import FileSource

        source = FileSource(cfg.data, validate=False, splits=("test", "eval"))
    else:
        source = build_source(cfg.data, cfg.seed)
    schema = source.schema
    tables, tower, meta, tasks = read_weights(ckpt, schema, cfg)
    block, sample_split = _sample_block(source, sample)
    mean_pooled = sorted(mean_pooled_tables(schema))
    dim = cfg.model.embedding_dim

    fp32 = {n: fmt.Table(n, {n: w}, "fp32") for n, w in tables.items()}
    domain_feature = cfg.model.multitask.domain_feature
    inputs = lookup(block, schema, fp32, set(mean_pooled), dim, domain_feature)
    with torch.no_grad():
        eager = _scores(FlatTower(tower, schema).eval()(*inputs).float(), tasks)
    program = export_tower(tower, schema, lookup(_trace_block(block, schema), schema, fp32, set(mean_pooled), dim, domain_feature))
    with torch.no_grad():
        exported = _scores(program.module()(*inputs).float(), tasks)
    export_diff = float((exported - eager).abs().max())
    if export_diff > EXPORT_TOLERANCE:
        raise RuntimeError(f"export: the exported tower differs from the eager one by {export_diff:.3g} (> {EXPORT_TOLERANCE}) on {len(block)} examples")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch.save(fmt.encode_tables(tables, embedding_dtype), tmp / fmt.TABLES)
        if aoti:  # minutes of C++ compilation: opt-in (it reads the program's trace inputs)
            t_aoti = time.time()
            from torch._inductor import aoti_compile_and_package

            aoti_compile_and_package(program, package_path=str(tmp / fmt.TOWER_AOTI))
            log.info("AOTInductor package compiled in %.0fs", time.time() - t_aoti)
        # torch.export keeps the trace inputs in the program: looked-up embeddings of real
        # examples. A serving artifact should carry no training data: drop them.
        program.example_inputs = None
        torch.export.save(program, str(tmp / fmt.TOWER))
        mapping = _write_data_section(cfg, tmp, source)
        schema_info = {
            "schema": schema_to_json(schema),
            "embedding_dim": dim,
            "embedding_dtype": embedding_dtype,
            "mean_pooled_tables": mean_pooled,
            "source": cfg.data.source,
            "tower": cfg.model.tower,
            "tasks": [{"name": t.name, "label": t.label, "type": t.type} for t in tasks],
            "domain_feature": domain_feature,
            "id_mapping": mapping,
        }
        (tmp / fmt.SCHEMA).write_text(json.dumps(schema_info, indent=2) + "\n")
        (tmp / fmt.CONFIG).write_text(to_yaml(cfg))
        metrics = _checkpoint_metrics(cfg, ckpt, meta)
        (tmp / fmt.METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        fmt.write_manifest(tmp, {"checkpoint": str(ckpt), "step": int(meta["step"]), "embedding_dtype": embedding_dtype, "torch": torch.__version__})
        # Load what was written, as a server would, and score the sample again.
        reload_diff = 0.0
        for backend in ("export", "aoti") if aoti else ("export",):
            served = load(tmp, backend=backend).score(block)
            reload_diff = max(reload_diff, float((served - eager).abs().max()))
        limit = EXPORT_TOLERANCE if embedding_dtype == "fp32" else LOW_PRECISION_LIMIT
        if reload_diff > limit:
            what = f"{reload_diff:.3g} away from the checkpoint (> {limit} for {embedding_dtype} tables)"
            raise RuntimeError(f"export: the written folder scores the sample {what}")
        fmt.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = {
        "out": str(out),
        "checkpoint": str(ckpt),
        "step": int(meta["step"]),
        "embedding_dtype": embedding_dtype,
        "bytes": size,
        "tables_bytes": (out / fmt.TABLES).stat().st_size,
        "sample": {"split": sample_split, "examples": len(block), "max_abs_diff_exported": export_diff, "max_abs_diff_served": reload_diff},
        "seconds": round(time.time() - t0, 2),
    }
    log.info(
        "exported %s (step %d) to %s: %s tables, %.1f MB; on %d %s examples the served scores are within %.2g of the checkpoint's (%.1fs)",
        ckpt,
        summary["step"],
        out,
        embedding_dtype,
        size / 1e6,
        len(block),
        sample_split,
        reload_diff,
        summary["seconds"],
    )
    return summary


def _checkpoint_metrics(cfg, ckpt: Path, meta: Dict) -> Dict:
    """The checkpoint's step, its validation history entry and the run's final metrics when
    they belong to this checkpoint's step."""
    run_dir = Path(cfg.run_dir)
    out: Dict = {"step": int(meta["step"]), "checkpoint": ckpt.name}
    best: Optional[Dict] = None
    best_json = run_dir / "checkpoints" / "best.json"
    if best_json.is_file():
        try:
            best = json.loads(best_json.read_text())
        except ValueError:
            best = None
    if best and best.get("checkpoint") == ckpt.name:
        out["selected_as_best"] = best
    final_path = run_dir / "final_metrics.json"
    if final_path.is_file():
        try:
            final = json.loads(final_path.read_text())
        except ValueError:
            final = {}
        if final.get("test/step") == out["step"]:
            out["test"] = {k: v for k, v in final.items() if k.startswith("test/")}
    history = (meta.get("early_stopping") or {}).get("history")
    if history:
        out["validation_history"] = history
    return out
