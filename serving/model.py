"""``ServingModel``: an export folder loaded for scoring (torch only; no trainer, no TorchRec).

``score(rows)`` → ``[N, num_labels]`` float32 probabilities:

1. rows → :class:`ExampleBlock`: raw rows of a file-source job go through the training-time
   decoding (:mod:`kunlun.serving.rows`); an ``ExampleBlock`` (what every source's
   ``read(split, indices)`` returns, also the built-in synthetic and MovieLens sources) is
   taken as is;
2. embedding lookups in plain torch, the same pooling as training (``schema.json``: sum for
   single-id features, mean for a table with a multi-valued feature; an empty bag is zeros);
3. the exported dense tower (``tower.pt2``, or its AOTInductor build ``tower.aoti.pt2``),
   then a sigmoid for binary tasks (regression tasks: the prediction as is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from kunlun.data.block import ExampleBlock
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec
from kunlun.serving import format as fmt
from kunlun.serving.format import ExportError


def schema_from_json(d: Dict) -> FeatureSchema:
    return FeatureSchema(
        tables=[TableSpec(t["name"], int(t["num_embeddings"])) for t in d["tables"]],
        dense_features=list(d["dense_features"]),
        context_features=[ContextFeature(f["name"], f["table"], int(f["max_ids"])) for f in d["context_features"]],
        event_types=[EventType(e["name"], e["item_table"], e["action_table"], int(e["max_len"])) for e in d["event_types"]],
        labels=list(d["labels"]),
        label_types=list(d.get("label_types", [])),
    )


def schema_to_json(schema: FeatureSchema) -> Dict:
    return {
        "tables": [{"name": t.name, "num_embeddings": t.num_embeddings} for t in schema.tables],
        "dense_features": list(schema.dense_features),
        "context_features": [{"name": f.name, "table": f.table, "max_ids": f.max_ids} for f in schema.context_features],
        "event_types": [{"name": e.name, "item_table": e.item_table, "action_table": e.action_table, "max_len": e.max_len} for e in schema.event_types],
        "labels": list(schema.labels),
        "label_types": list(schema.label_types),
    }


def _ids(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def lookup(block: ExampleBlock, schema: FeatureSchema, tables: Dict[str, "fmt.Table"], mean_pooled, dim: int, domain_feature: str = "") -> Tuple:
    """Embedding lookups of ``block`` (N examples) → the flat tower inputs ``(dense [N, F],
    context [N, C, D], request_time [N], domain [N], (item [T_e, D], action [T_e, D],
    timestamps [T_e], lengths [N]) per event type)``. Context features are pooled as in
    training: sum, or mean for the tables in ``mean_pooled``; an empty bag gives zeros.
    ``domain``: the id of ``domain_feature`` per example (0 when absent or not configured)."""
    n = len(block)
    dense = torch.as_tensor(np.asarray(block.dense, dtype=np.float32)).reshape(n, schema.num_dense)
    ctx = []
    for f in schema.context_features:
        col = block.context[f.name]
        lengths = _ids(col.lengths)
        rows = tables[f.table].rows(_ids(col.values))
        seg = torch.repeat_interleave(torch.arange(n), lengths, output_size=rows.shape[0])
        pooled = torch.zeros(n, dim).index_add_(0, seg, rows)
        if f.table in mean_pooled:
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).float()
        ctx.append(pooled)
    context = torch.stack(ctx, dim=1) if ctx else torch.zeros(n, 0, 0)
    events: List[torch.Tensor] = []
    for e in schema.event_types:
        ev = block.events[e.name]
        events += [tables[e.item_table].rows(_ids(ev.items)), tables[e.action_table].rows(_ids(ev.actions)), _ids(ev.timestamps), _ids(ev.lengths)]
    domain = torch.zeros(n, dtype=torch.long)
    if domain_feature:
        col = block.context[domain_feature]
        has = _ids(col.lengths) > 0
        domain[has] = _ids(col.values)
    return dense, context, _ids(block.request_time), domain, tuple(events)


class ServingModel:
    """A loaded export; see the module docstring. Build it with :func:`kunlun.serving.load`."""

    def __init__(self, root: Path, verify: bool = True, backend: str = "auto"):
        self.root = Path(root)
        self.manifest = fmt.read_manifest(self.root, verify=verify)
        try:
            info = json.loads((self.root / fmt.SCHEMA).read_text())
            self.schema = schema_from_json(info["schema"])
            self.embedding_dim = int(info["embedding_dim"])
            self.embedding_dtype = str(info["embedding_dtype"])
            self.mean_pooled = set(info["mean_pooled_tables"])
            self.source = str(info["source"])
            self.tasks = [(str(t["name"]), str(t["type"])) for t in info["tasks"]]
            self.domain_feature = str(info.get("domain_feature", ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{self.root / fmt.SCHEMA}: unreadable or incomplete ({type(e).__name__}: {e})") from e
        if self.embedding_dtype not in fmt.EMBEDDING_DTYPES:
            raise ExportError(f"{self.root / fmt.SCHEMA}: embedding_dtype {self.embedding_dtype!r}: expected one of {list(fmt.EMBEDDING_DTYPES)}")
        self.metrics = json.loads((self.root / fmt.METRICS).read_text())
        self.tables = fmt.load_tables(self.root / fmt.TABLES, self.embedding_dtype, [t.name for t in self.schema.tables])
        for t in self.schema.tables:
            tab = self.tables[t.name]
            if (tab.num_rows, tab.dim) != (t.num_embeddings, self.embedding_dim):
                have, want = f"{tab.num_rows}x{tab.dim}", f"{t.num_embeddings}x{self.embedding_dim}"
                raise ExportError(f"{self.root / fmt.TABLES}: table {t.name!r} is {have}, schema.json says {want}")
        if backend not in fmt.BACKENDS:
            raise ExportError(f"backend {backend!r}: expected one of {list(fmt.BACKENDS)}")
        aoti = self.root / fmt.TOWER_AOTI
        if backend == "aoti" and not aoti.is_file():
            raise ExportError(f"{aoti}: missing: backend='aoti' needs an export made with --aoti")
        self.backend = "aoti" if backend == "aoti" or (backend == "auto" and aoti.is_file()) else "export"
        path = aoti if self.backend == "aoti" else self.root / fmt.TOWER
        try:
            if self.backend == "aoti":
                from torch._inductor import aoti_load_package

                self.tower = aoti_load_package(str(path))
            else:
                self.tower = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - damaged, or from another torch / platform
            raise ExportError(f"{path}: cannot be loaded with torch {torch.__version__} on this platform ({type(e).__name__}: {e})") from e
        self._rows = None  # the raw-row decoder, built on first use (file sources only)

    @property
    def task_names(self) -> List[str]:
        """The output columns of :meth:`score`, in order."""
        return [name for name, _ in self.tasks]

    # ------------------------------------------------------------------ rows
    def decode(self, rows) -> ExampleBlock:
        """Raw rows (``pyarrow.Table`` / list of dicts; file-source exports) → ``ExampleBlock``."""
        if isinstance(rows, ExampleBlock):
            return rows
        if self.source not in ("parquet", "csv"):
            raise ExportError(
                f"{self.root}: exported from a {self.source!r} job, which has no raw row format: pass an ExampleBlock "
                f"(what the source's read(split, indices) returns), or export a parquet/csv job to score raw rows"
            )
        if self._rows is None:
            from omegaconf import OmegaConf

            from kunlun.data.config import DataConfig
            from kunlun.serving.rows import RowDecoder

            try:
                data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(self.root / fmt.DATA)))
            except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the key
                raise ExportError(f"{self.root / fmt.DATA}: not a valid data section ({e})") from e
            self._rows = RowDecoder(data_cfg, self.root / fmt.VOCAB_DIR, self.schema.table_sizes)
        return self._rows.decode(rows)

    # --------------------------------------------------------------- lookups
    def tower_inputs(self, block: ExampleBlock) -> Tuple:
        """``block`` → the flat inputs of the exported tower (``kunlun.model.export.FlatTower``)."""
        return lookup(block, self.schema, self.tables, self.mean_pooled, self.embedding_dim, self.domain_feature)

    @torch.no_grad()
    def logits(self, rows) -> torch.Tensor:
        """``[N, num_tasks]`` float32 raw outputs of ``rows`` (logits of binary tasks)."""
        block = self.decode(rows)
        n = len(block)
        if n == 0:
            return torch.zeros(0, len(self.tasks))
        return self.tower(*self.tower_inputs(block)).float()

    def score(self, rows, batch_size: Optional[int] = None) -> torch.Tensor:
        """``[N, num_tasks]`` float32 for ``rows`` (a ``pyarrow.Table`` or a list of dicts in the
        job's raw schema, file sources; or an ``ExampleBlock``): the probability of each binary
        task, the prediction of each regression task (columns: :attr:`task_names`).
        ``batch_size`` splits large inputs (the result is the same)."""
        block = self.decode(rows)
        if batch_size is None or len(block) <= batch_size:
            raw = self.logits(block)
        else:
            from kunlun.data.block import take_block

            raw = torch.cat([self.logits(take_block(block, np.arange(i, min(i + batch_size, len(block))))) for i in range(0, len(block), batch_size)])
        binary = torch.tensor([kind == "binary" for _, kind in self.tasks])
        return torch.where(binary, torch.sigmoid(raw), raw)


def load(path, verify: bool = True, backend: str = "auto") -> ServingModel:
    """Load a ``kunlun export`` folder; ``verify`` (default) checks every file against the
    manifest. ``backend``: ``export`` runs ``tower.pt2`` (the exported program), ``aoti`` the
    AOTInductor package ``tower.aoti.pt2``; ``auto`` (default) the package when present."""
    return ServingModel(Path(path).expanduser(), verify=verify, backend=backend)
