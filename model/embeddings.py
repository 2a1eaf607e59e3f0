"""Embedding collections built from the feature schema.

Context features → ``EmbeddingBagCollection`` (pooled to ``[B, D]`` per feature; sum for
single-id features, mean for multi-valued ones). Event sequences →
``EmbeddingCollection`` (unpooled: one ``[T, D]`` jagged tensor per sequence key).
Tables are created on the ``meta`` device by default: the sharder materialises only the
shards each rank owns.
"""

from __future__ import annotations

from typing import List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from kunlun.data.schema import FeatureSchema


def context_table_configs(schema: FeatureSchema, dim: int) -> List[EmbeddingBagConfig]:
    sizes = schema.table_sizes
    multi = {f.table for f in schema.context_features if f.max_ids > 1}
    return [
        EmbeddingBagConfig(
            name=f"ctx_{table}",
            embedding_dim=dim,
            num_embeddings=sizes[table],
            feature_names=features,
            pooling=PoolingType.MEAN if table in multi else PoolingType.SUM,
        )
        for table, features in schema.context_tables().items()
    ]


def sequence_table_configs(schema: FeatureSchema, dim: int) -> List[EmbeddingConfig]:
    sizes = schema.table_sizes
    return [
        EmbeddingConfig(name=f"seq_{table}", embedding_dim=dim, num_embeddings=sizes[table], feature_names=features)
        for table, features in schema.sequence_tables().items()
    ]


def build_embeddings(schema: FeatureSchema, dim: int, device: torch.device = torch.device("meta")):
    """``(EmbeddingBagCollection, EmbeddingCollection)`` for ``schema`` with ``dim``-wide rows."""
    shared = set(schema.context_tables()) & set(schema.sequence_tables())
    if shared:
        # Pooled and unpooled lookups live in different TorchRec modules, which cannot share storage.
        raise ValueError(f"schema: tables {sorted(shared)} feed both context and sequence features; use separate tables")
    ebc = EmbeddingBagCollection(tables=context_table_configs(schema, dim), device=device)
    ec = EmbeddingCollection(tables=sequence_table_configs(schema, dim), device=device)
    return ebc, ec
