"""``RecModel``: embeddings + dense tower + loss — the module that ``parallel/`` shards."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from kunlun.data.batch import Batch
from kunlun.data.schema import FeatureSchema
from kunlun.model.embeddings import build_embeddings, ec_context_features, mean_pooled_tables
from kunlun.model.modules.jagged import jagged_pool
from kunlun.model.tasks import multitask_loss, resolve_tasks
from kunlun.model.towers import build_tower
from kunlun.model.towers.base import EventSequence, TowerInputs


class ModelOutput(NamedTuple):
    """What :meth:`RecModel.forward` returns beside the loss (for metrics and scoring).

    Attributes:
        loss: scalar, detached.
        logits: ``[B, T]`` detached task outputs (logits of binary tasks, predictions of
            regression tasks), in ``RecModel.tasks`` order.
        labels: ``[B, T]`` the tasks' labels (NaN = missing).
        weights: ``[B]`` example weights (0 = padding).
        domain: ``[B]`` int64 domain ids, or None without ``model.multitask.domain_feature``.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    domain: Optional[torch.Tensor] = None


class RecModel(nn.Module):
    """Looks up ``batch.context`` (pooled) and ``batch.sequences`` (jagged), runs the tower.

    Context features whose table also feeds sequences are looked up in the
    ``EmbeddingCollection`` with the sequences and pooled here (see ``model/embeddings.py``).

    ``forward(batch)`` returns ``(loss, ModelOutput)``: the TorchRec convention of a scalar
    loss plus outputs for metrics. The loss is :func:`kunlun.model.tasks.multitask_loss` over
    ``self.tasks`` (``model.tasks``; by default one binary task per label: the
    example-weighted mean binary cross-entropy over the labels; padding has weight 0).
    """

    def __init__(self, schema: FeatureSchema, model_cfg, embedding_device: torch.device = torch.device("meta")):
        super().__init__()
        self.schema = schema
        self.tasks = resolve_tasks(schema, model_cfg)
        self._task_labels = [t.label_index for t in self.tasks]
        self._labels_in_order = self._task_labels == list(range(len(schema.labels)))
        self.domain_feature = model_cfg.multitask.domain_feature
        self.ebc, self.ec = build_embeddings(schema, model_cfg.embedding_dim, embedding_device, model_cfg.embedding_dtype)
        self.tower = build_tower(schema, model_cfg, num_labels=len(self.tasks))
        if model_cfg.compile:
            # In place (Module.compile): parameter names, FSDP wrapping and export see the
            # plain tower. dynamic=True: jagged totals vary every batch.
            self.tower.compile(dynamic=True, backend=model_cfg.compile_backend)
        # Dense compute dtype under autocast (None = fp32): set by the trainer from
        # trainer.precision. Lookups stay outside it (TBE kernels choose their own precision).
        self.autocast_dtype: Optional[torch.dtype] = None
        # Context features of shared tables go through the EC (model/embeddings.py); the rest
        # through the EBC. Index lists select them from batch.context (keys = schema.context_keys).
        keys = schema.context_keys
        ec_ctx = ec_context_features(schema)
        ec_names = {f.name for f in ec_ctx}
        self._ebc_keys = [k for k in keys if k not in ec_names]
        self._ebc_index = [keys.index(k) for k in self._ebc_keys]
        self._ec_ctx_keys = [f.name for f in ec_ctx]
        self._ec_ctx_index = [keys.index(k) for k in self._ec_ctx_keys]
        mean_tables = set(mean_pooled_tables(schema))
        self._ec_ctx_mean = {f.name: f.table in mean_tables for f in ec_ctx}
        self._use_ec = bool(schema.event_types)
        self.dense_step = _DenseStep(self)

    def _lookup(self, batch: Batch) -> Tuple[Dict[str, torch.Tensor], Dict[str, JaggedTensor]]:
        """The sharded lookups: pooled EBC context features, and the EC's jagged outputs
        (sequences + shared-table context features).

        Each sharded module is called on a ``batch`` attribute itself (unless shared tables
        need a permuted/concatenated KJT), which is what TorchRec's train pipelines look for
        when they move a lookup's input distribution ahead of the step (``trainer.pipeline``).
        """
        pooled: Dict[str, torch.Tensor] = {}
        if self._ebc_keys:
            kjt = batch.context if not self._ec_ctx_keys else batch.context.permute(self._ebc_index)
            pooled = self.ebc(kjt).to_dict()
        seqs: Dict[str, JaggedTensor] = {}
        if self._use_ec:
            ec_input = batch.sequences
            if self._ec_ctx_keys:
                ec_input = KeyedJaggedTensor.concat([batch.sequences, batch.context.permute(self._ec_ctx_index)])
            seqs = self.ec(ec_input)
        return pooled, seqs

    def tower_inputs(self, batch: Batch) -> TowerInputs:
        return self._tower_inputs(batch, *self._lookup(batch))

    def _tower_inputs(self, batch: Batch, pooled: Dict[str, torch.Tensor], seqs: Dict[str, JaggedTensor]) -> TowerInputs:
        context: Dict[str, torch.Tensor] = {}
        for k in self.schema.context_keys:  # the tower sees schema order
            if k in pooled:
                context[k] = pooled[k]
            else:
                jt = seqs[k]
                context[k] = jagged_pool(jt.values(), jt.lengths(), mean=self._ec_ctx_mean[k])
        events: Dict[str, EventSequence] = {}
        if self.schema.event_types:
            # One split of the timestamps KJT (not a dict per step of every key).
            ts_values = batch.timestamps.values()
            ts_offsets = batch.timestamps.offset_per_key()
        for i, e in enumerate(self.schema.event_types):
            item, action = seqs[e.item_key], seqs[e.action_key]
            events[e.name] = EventSequence(
                item=item.values(),
                action=action.values(),
                timestamps=ts_values[ts_offsets[i] : ts_offsets[i + 1]],
                lengths=item.lengths().long(),
                offsets=item.offsets().long(),
            )
        domain = self.domain_ids(batch) if self.domain_feature else None
        return TowerInputs(dense=batch.dense, context=context, events=events, request_time=batch.request_time, domain=domain)

    def domain_ids(self, batch: Batch) -> torch.Tensor:
        """``[B]`` int64: the domain feature's id of every example (0 when it has none)."""
        jt = batch.context[self.domain_feature]
        lengths = jt.lengths().long()
        seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths, output_size=jt.values().shape[0])
        return torch.zeros(lengths.shape[0], dtype=torch.long, device=lengths.device).index_put_((seg,), jt.values().long())

    def task_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels [B, num_labels]`` → ``[B, T]`` in task order."""
        return labels if self._labels_in_order else labels[:, self._task_labels]

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, ModelOutput]:
        """``(loss, ModelOutput)``. The sharded lookups are called here; everything after them
        runs in ``self.dense_step`` — a parameter-free module, so TorchRec's pipeline tracer
        (``torch.fx``) treats it as one opaque call instead of tracing the tower's Python."""
        # Named ranges so a profile splits the step into lookup vs dense compute (no-ops
        # unless a profiler is recording).
        with torch.profiler.record_function("kunlun/embedding_lookup"):
            pooled, seqs = self._lookup(batch)
        return self.dense_step(batch, pooled, seqs)

    def _dense_forward(self, batch: Batch, pooled: Dict[str, torch.Tensor], seqs: Dict[str, JaggedTensor]) -> Tuple[torch.Tensor, ModelOutput]:
        with torch.profiler.record_function("kunlun/dense_tower"):
            inputs = self._tower_inputs(batch, pooled, seqs)
            dtype = self.autocast_dtype
            with torch.autocast(batch.dense.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = self.tower(inputs)  # [B, T]
            logits = logits.float()  # loss and metrics in fp32 whatever the tower computed in
        labels = self.task_labels(batch.labels)
        loss = multitask_loss(logits, labels, batch.weights, self.tasks)
        return loss, ModelOutput(loss.detach(), logits.detach(), labels, batch.weights, inputs.domain)


class _DenseStep(nn.Module):
    """Lookup outputs → tower → loss, for :class:`RecModel`. Holds no parameters (the tower
    stays ``RecModel.tower``: checkpoint names, FSDP wrapping and export are unchanged); it
    exists to be a leaf module for ``torch.fx`` (TorchRec's pipeline tracer stops at modules
    that hold no sharded table)."""

    def __init__(self, owner: RecModel):
        super().__init__()
        # A plain attribute, not a submodule: modules()/state_dict() do not see the owner twice;
        # deepcopy maps it to the copied owner.
        object.__setattr__(self, "_owner", owner)

    def forward(self, batch: Batch, pooled: Dict[str, torch.Tensor], seqs: Dict[str, JaggedTensor]) -> Tuple[torch.Tensor, ModelOutput]:
        return self._owner._dense_forward(batch, pooled, seqs)
