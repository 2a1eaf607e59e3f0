"""How one training step runs: ``trainer.pipeline`` = none | sparse_dist | semi_sync | prefetch.

Every runner has TorchRec's ``progress(batches) -> output`` interface and trains exactly one
batch per call with the trainer's ``model_fwd`` (forward + the step's collective flags) and
the trainer's step optimizer (finiteness check of the dense gradients, optimizer step, 2D
replica sync), so the step logic is one piece of code whichever runner calls it:

* ``none`` (:class:`PlainStep`): next batch → forward → backward → step.
* ``sparse_dist``: TorchRec's ``TrainPipelineSparseDist``: batch i+1's input distribution (the
  id all-to-all) and batch i+2's host→device copy overlap batch i's forward/backward on their
  own CUDA streams. Same arithmetic as ``none``: same weights, same metrics.
* ``semi_sync``: ``TrainPipelineSemiSync``: also batch i+1's embedding lookup and output
  all-to-all overlap batch i's dense backward; batch i+1 is looked up *before* batch i's
  embedding update (one step stale), which changes the numbers.
* ``prefetch``: ``PrefetchTrainPipelineSparseDist``: also prefetches UVM-cached rows into HBM
  ahead of the step (CUDA only: it exists for caching kernels).

The pipelines read up to three batches ahead. Each batch carries the stream position it
ends at (``Batch.position``); the model_fwd records the batch it was called with, so the
trainer saves the position of the batch actually trained, and a resumed job reads the
read-ahead batches again.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.autograd.profiler import record_function
from torchrec.distributed.train_pipeline.runtime_forwards import EmbeddingPipelinedForward
from torchrec.distributed.train_pipeline.train_pipelines import (
    PrefetchTrainPipelineSparseDist,
    TrainPipelineSemiSync,
    TrainPipelineSparseDist,
)
from torchrec.distributed.train_pipeline.utils import _start_embedding_lookup
from torchrec.sparse.jagged_tensor import KeyedTensor

from kunlun.data.batch import Batch

PIPELINES = ("auto", "none", "sparse_dist", "semi_sync", "prefetch")

# trainer.pipeline=auto: TorchRec's pipeline where it has streams to overlap on. On CPU
# nothing runs concurrently (no streams): two rounds of the 2-rank e2e benchmark gave no
# consistent gain (dlrm 1.37x / 1.05x, kunlun 1.01x / 0.98x of the plain loop; BENCHMARKS.md
# "Train pipelines"), so CPU keeps the plain loop, which re-reads nothing after evaluations.
AUTO = {"cuda": "sparse_dist", "cpu": "none"}

ModelFwd = Callable[[Batch], Tuple[torch.Tensor, object]]


def resolve_pipeline(name: str, device: torch.device) -> str:
    """``trainer.pipeline`` → the runner used on ``device`` (``auto`` decided by device type)."""
    if name == "auto":
        return AUTO.get(device.type, "none")
    return name


class StepOptimizer:
    """What a pipeline calls ``zero_grad()`` / ``step()`` on: the trainer's step, which may skip
    the update (non-finite dense gradients), runs the 2D replica sync after it and advances
    the LR schedule.
    ``param_groups`` are the dense optimizer's (TorchRec's semi-sync pipeline checks that no
    pipelined embedding parameter is among them: their update is fused into backward)."""

    def __init__(self, zero_grad: Callable[[], None], step: Callable[[], None], param_groups):
        self._zero_grad, self._step, self.param_groups = zero_grad, step, param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - the trainer's choice
        self._zero_grad()

    def step(self, closure=None) -> None:  # noqa: ARG002
        self._step()


class PlainStep:
    """``trainer.pipeline=none``: one batch at a time, nothing read ahead (beyond
    ``trainer.prefetch_batches``'s thread)."""

    def __init__(self, model: torch.nn.Module, optimizer: StepOptimizer, device: torch.device, model_fwd: ModelFwd):
        self._model, self._optimizer, self._device, self._fwd = model, optimizer, device, model_fwd

    def progress(self, batches: Iterator[Batch]):
        with record_function("kunlun/data"):
            batch = next(batches).to(self._device, non_blocking=True)
        self._optimizer.zero_grad()
        loss, output = self._fwd(batch)
        with record_function("kunlun/backward"):
            loss.backward()
        self._optimizer.step()
        return output

    def detach(self) -> torch.nn.Module:
        return self._model


class _Regions:
    """The profiler's ``kunlun/data`` and ``kunlun/backward`` ranges around the pipeline's own
    batch loading and backward (``trainer/profiling.py`` groups the step by them)."""

    def enqueue_batch(self, dataloader_iter) -> bool:
        with record_function("kunlun/data"):
            return super().enqueue_batch(dataloader_iter)

    def _backward(self, losses: torch.Tensor) -> None:
        with record_function("kunlun/backward"):
            super()._backward(losses)


class SparseDistPipeline(_Regions, TrainPipelineSparseDist):
    pass


class _EmbeddingForward(EmbeddingPipelinedForward):
    """TorchRec's semi-sync module forward, made to run on CPU: without a stream it assumes
    CUDA (``torch.device("cuda")``) and records the pooled embeddings on the current stream,
    which CPU tensors reject. On CUDA it is TorchRec's unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._stream is None:
            self._device = torch.device("cpu")

    def detach_embeddings(self, embeddings, cur_stream) -> None:
        if self._device.type != "cuda" and isinstance(embeddings, KeyedTensor):
            embeddings.record_stream = lambda stream: None  # CPU: no streams to order against
        super().detach_embeddings(embeddings, cur_stream)


class SemiSyncPipeline(_Regions, TrainPipelineSemiSync):
    _pipelined_forward_type = _EmbeddingForward

    def start_embedding_lookup(self, batch, context) -> None:
        if batch is None or self._device.type == "cuda":
            return super().start_embedding_lookup(batch, context)
        # CPU: TorchRec records the looked-up KJT on the "current stream", which CPU tensors
        # reject; without streams there is nothing to record, so start the lookups directly.
        with record_function(f"## start_embedding_lookup {context.index} ##"):
            for module in self._pipelined_modules:
                _start_embedding_lookup(module, context, source_stream=None, target_stream=None, stream_context=self._stream_context)

    def embedding_backward(self, context) -> None:
        # A skipped step (non-finite loss: the trainer's forward returned a detached zero)
        # leaves every looked-up embedding without a gradient: nothing to apply.
        if all(t.grad is None for tensors in context.detached_embedding_tensors for t in tensors):
            return
        super().embedding_backward(context)


class PrefetchPipeline(_Regions, PrefetchTrainPipelineSparseDist):
    pass


def build_pipeline(name: str, model: torch.nn.Module, optimizer: StepOptimizer, device: torch.device, model_fwd: ModelFwd):
    """The runner for ``trainer.pipeline`` (already resolved by :func:`resolve_pipeline`).

    The 2D replica sync stays the trainer's (``dmp_collection_sync_interval_batches=None``):
    TorchRec's pipelines count batches from their own start, which restarts after every
    evaluation and resume, while the sync schedule must follow the global step (and the
    touched-rows sync is kunlun's own)."""
    if name == "none":
        return PlainStep(model, optimizer, device, model_fwd)
    common = dict(model=model, optimizer=optimizer, device=device, custom_model_fwd=model_fwd)
    if name == "sparse_dist":
        return SparseDistPipeline(**common, dmp_collection_sync_interval_batches=None)
    if name == "semi_sync":
        # start_batch=0: semi-synchronous from the first batch; the pipeline restarts after
        # every evaluation, and a synchronous warm-up would restart with it.
        return SemiSyncPipeline(**common, dmp_collection_sync_interval_batches=None, start_batch=0)
    if name == "prefetch":
        return PrefetchPipeline(**common)
    raise ValueError(f"trainer.pipeline={name!r}; expected one of {PIPELINES}")


def check_pipeline(name: str, device: torch.device, is_2d: bool, sync: Optional[str]) -> Optional[str]:
    """Why ``trainer.pipeline`` cannot run with this device / sparse layout, or None."""
    if name == "prefetch" and device.type != "cuda":
        return "'prefetch' needs CUDA (it prefetches UVM-cached embedding rows into GPU memory); use 'none' or 'sparse_dist' on CPU"
    if name == "semi_sync" and is_2d and sync == "touched":
        return (
            "'semi_sync' looks batch i+1 up before batch i's update, across a 2D replica sync, so the touched-rows sync "
            "would miss its rows; use parallel.sparse.sync=full with semi_sync, or another pipeline"
        )
    return None
