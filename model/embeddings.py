"""Embedding collections built from the feature schema.

Context features → ``EmbeddingBagCollection`` (pooled to ``[B, D]`` per feature; sum for
single-id features, mean for multi-valued ones). Event sequences →
``EmbeddingCollection`` (unpooled: one ``[T, D]`` jagged tensor per sequence key).

**Shared tables.** A table may feed both context features and sequences (the target item
and every history's items read one ``item`` table). Pooled and unpooled lookups live in
different TorchRec modules, which cannot share storage, so such a table lives only in the
``EmbeddingCollection``: its context features are looked up there as jagged features too
(the EC config lists them beside the sequence keys, so the EC holds every feature that reads
its tables and DMP shards it as one module) and ``RecModel.tower_inputs`` pools them with the
same rule as the bag collection (mean for tables with a multi-valued context feature, else
sum). Towers still receive ``context: Dict[name, [B, D]]``.

Tables are created on the ``meta`` device by default: the sharder materialises only the
shards each rank owns.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from kunlun.data.schema import ContextFeature, FeatureSchema


def shared_tables(schema: FeatureSchema) -> List[str]:
    """Tables read by context features and by sequences."""
    seq = schema.sequence_tables()
    return [t for t in schema.context_tables() if t in seq]


def ec_context_features(schema: FeatureSchema) -> List[ContextFeature]:
    """Context features looked up through the ``EmbeddingCollection`` (their table is shared)."""
    shared = set(shared_tables(schema))
    return [f for f in schema.context_features if f.table in shared]


def mean_pooled_tables(schema: FeatureSchema) -> List[str]:
    """Tables whose context features are mean-pooled (some context feature on them is multi-valued)."""
    return sorted({f.table for f in schema.context_features if f.max_ids > 1})


DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "bf16": DataType.BF16}


def context_table_configs(schema: FeatureSchema, dim: int, dtype: str = "fp32") -> List[EmbeddingBagConfig]:
    sizes = schema.table_sizes
    multi = set(mean_pooled_tables(schema))
    shared = set(shared_tables(schema))
    return [
        EmbeddingBagConfig(
            name=f"ctx_{table}",
            embedding_dim=dim,
            num_embeddings=sizes[table],
            feature_names=features,
            pooling=PoolingType.MEAN if table in multi else PoolingType.SUM,
            data_type=DATA_TYPES[dtype],
        )
        for table, features in schema.context_tables().items()
        if table not in shared
    ]


def sequence_table_configs(schema: FeatureSchema, dim: int, dtype: str = "fp32") -> List[EmbeddingConfig]:
    sizes = schema.table_sizes
    ctx: Dict[str, List[str]] = {}
    for f in ec_context_features(schema):
        ctx.setdefault(f.table, []).append(f.name)
    return [
        EmbeddingConfig(
            name=f"seq_{table}", embedding_dim=dim, num_embeddings=sizes[table], feature_names=features + ctx.get(table, []), data_type=DATA_TYPES[dtype]
        )
        for table, features in schema.sequence_tables().items()
    ]


def build_embeddings(schema: FeatureSchema, dim: int, device: torch.device = torch.device("meta"), dtype: str = "fp32"):
    """``(EmbeddingBagCollection, EmbeddingCollection)`` for ``schema`` with ``dim``-wide rows
    stored as ``dtype`` (fp32 | fp16 | bf16: the sharded TBE tables' weights precision).

    Either may hold no tables (a schema without sequences, or whose every context feature
    reads a shared table); ``RecModel`` then does not call it.
    """
    ebc = EmbeddingBagCollection(tables=context_table_configs(schema, dim, dtype), device=device)
    ec = EmbeddingCollection(tables=sequence_table_configs(schema, dim, dtype), device=device)
    return ebc, ec
