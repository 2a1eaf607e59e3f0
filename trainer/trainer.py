"""``Trainer``: builds data, model, sharding, optimizers; trains, evaluates, checkpoints.

Its state — model, optimizers, ``step``, ``examples_consumed`` (the data position) — is
exactly what a checkpoint holds, so resuming continues bit-for-bit where it stopped.

A step is one ``progress()`` of the runner ``trainer.pipeline`` chooses (``trainer/pipeline.py``:
a plain loop or one of TorchRec's train pipelines); whichever it is, it calls
:meth:`Trainer._train_forward` (forward + the step's one collective) and the step optimizer
(:meth:`Trainer._optimizer_step`: dense-gradient check, update, 2D replica sync). The data
position saved is the position of the batch actually trained (``Batch.position``), so the
batches a pipeline read ahead are read again after a resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from kunlun.data.batch import Batch
from kunlun.data.loader import BackgroundIterator, ShardedBatches, make_loader
from kunlun.data.sources import build_source
from kunlun.model.rec_model import RecModel
from kunlun.parallel.distributed import all_max_flags, all_mean, broadcast_error, init_distributed, seed_everything
from kunlun.parallel.planner import describe_plan
from kunlun.parallel.sparse import shard_model
from kunlun.trainer.checkpoint import Checkpointer, CheckpointError, ReadOnlyCheckpointer, global_shapes, write_json_atomic
from kunlun.trainer.config import ConfigError, JobConfig, flatten, to_yaml, validate
from kunlun.trainer.early_stopping import BestTracker
from kunlun.trainer.faults import (  # noqa: F401 - the names launch/main.py and tests import from here
    NONFINITE_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    NonFiniteError,
    Preempted,
    SigtermFlag,
    nonfinite_dense_grads,
)
from kunlun.trainer.metrics import EvalAccumulator, summary
from kunlun.trainer.monitor import Monitor, setup_logging
from kunlun.trainer.optim import build_lr_scheduler, build_optimizer, current_lrs
from kunlun.trainer.perf import TRAIN_FLOPS_FACTOR, average_sequence_lengths, format_flops, peak_tflops, resolve_precision
from kunlun.trainer.pipeline import StepOptimizer, build_pipeline, check_pipeline, resolve_pipeline
from kunlun.trainer.profiling import StepProfiler

log = logging.getLogger("kunlun")


class TrainProgress(Stateful):
    """The trainer's counters as DCP state (``Trainer._state()["progress"]``): ``step`` and
    ``examples_consumed`` (the data position the loader restarts from), int64 tensors that
    DCP stores once. ``meta.json`` repeats them for choosing a checkpoint without reading
    DCP; a resume checks that both agree."""

    def __init__(self, trainer: "Trainer") -> None:
        self._trainer = trainer

    def state_dict(self) -> Dict[str, torch.Tensor]:
        t = self._trainer
        return {"step": torch.tensor(t.step, dtype=torch.int64), "examples_consumed": torch.tensor(t.examples_consumed, dtype=torch.int64)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self._trainer.step = int(state["step"])
        self._trainer.examples_consumed = int(state["examples_consumed"])


@dataclass
class _StepRecord:
    """What the step's forward saw, for the loop after ``progress()`` returns."""

    batch: Batch
    loss: torch.Tensor  # detached
    output: object
    lrs: Dict[str, float]
    loss_nonfinite: bool
    sigterm: bool
    bad_grads: List[str] = field(default_factory=list)


def _prepare_run_dir(run_dir: Path, rank: int) -> None:
    error = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error = f"config key 'run_dir' = {str(run_dir)!r} is invalid: cannot create or write it ({e.strerror or e})"
    error = broadcast_error(error)
    if error:
        raise ConfigError(error)


class Trainer:
    def __init__(self, cfg: JobConfig, evaluate_only: bool = False, source=None):
        """``evaluate_only``: build the model and load ``checkpoint.resume`` (model weights
        only) for :meth:`evaluate` (``kunlun eval``), leaving the run's files as they are:
        no config.yaml rewrite, nothing changed in ``checkpoints/``, no TensorBoard purge.
        ``source`` (evaluate_only): score this source instead of the one ``cfg.data``
        describes (``kunlun predict --input``: other files in the run's schema); its
        ``test`` split stands in for the train split in the FLOPs estimate."""
        if source is not None and not evaluate_only:
            raise ValueError("Trainer(source=...) is for evaluate_only: training reads cfg.data's source")
        self.cfg = cfg
        self.evaluate_only = evaluate_only
        self.info = init_distributed(cfg.trainer.device, cfg.parallel.backend)
        rank, world = self.info.rank, self.info.world_size
        validate(cfg, world_size=world)
        self.run_dir = Path(cfg.run_dir).expanduser().resolve()
        _prepare_run_dir(self.run_dir, rank)
        setup_logging(self.run_dir, rank, cfg.logging.level)
        if rank == 0 and not evaluate_only:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.info("run_dir %s | world %d (%s on %s)", self.run_dir, world, self.info.backend, self.info.device.type)

        seed_everything(cfg.seed)
        self.source = build_source(cfg.data, cfg.seed) if source is None else source
        self.schema = self.source.schema
        log.info("schema:\n%s", self.schema.describe())
        if self.source.bad_rows:
            log.warning("data: skipped %d bad rows (data.bad_row_policy=skip)", self.source.bad_rows)

        model = RecModel(self.schema, cfg.model)  # dense tower on CPU, tables on meta
        self.precision = resolve_precision(cfg.trainer.precision, self.info.device)
        model.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.tasks = model.tasks
        model.tower.to(self.info.device)
        n_dense = sum(p.numel() for p in model.tower.parameters())
        n_sparse = sum(t.num_embeddings * t.embedding_dim for t in model.ebc.embedding_bag_configs()) + sum(
            t.num_embeddings * t.embedding_dim for t in model.ec.embedding_configs()
        )
        sharded = shard_model(model, cfg.parallel, cfg.optim, self.info.device)
        self.sharded = sharded
        self.model = sharded.dmp
        self.plan = sharded.plan
        log.info("process groups:\n  %s\n  dense: %s", sharded.layout.describe(), cfg.parallel.dense.strategy)
        log.info(
            "sharding plan (%s):\n%s",
            f"{world} ranks" if not sharded.is_2d else f"per sharding group of {sharded.layout.sharding_group_size}",
            describe_plan(self.plan),
        )
        log.info("parameters: dense %s, embedding %s", f"{n_dense:,}", f"{n_sparse:,}")
        self.num_params = {"dense": n_dense, "embedding": n_sparse}
        self.avg_seq_len = average_sequence_lengths(self.source, seed=cfg.seed, split="train" if source is None else "test")
        self.flops_per_example = model.tower.flops_per_example(self.avg_seq_len)
        self.peak = peak_tflops(self.info.device, torch.bfloat16 if self.precision == "bf16" else torch.float32)
        log.info(
            "tower %s: %s/example forward, %s training (x%.0f) at mean history lengths %s; %s peak %.3g TFLOP/s per rank (%s)",
            cfg.model.tower,
            format_flops(self.flops_per_example),
            format_flops(TRAIN_FLOPS_FACTOR * self.flops_per_example),
            TRAIN_FLOPS_FACTOR,
            {k: round(v, 1) for k, v in self.avg_seq_len.items()},
            self.precision,
            self.peak["peak"],
            "datasheet" if self.info.device.type == "cuda" and self.peak["peak"] != self.peak["probe"] else "matmul probe",
        )
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # Walked every step by the finiteness check: listed once (DMP's named_parameters()
        # walks every sharded module). Gradients of fused embedding tables are never set.
        self._named_params = list(self.model.named_parameters())

        self.step = 0
        self.examples_consumed = 0
        self.progress = TrainProgress(self)
        self.skipped_steps = 0
        self.train_seconds = 0.0  # wall time inside training steps of this process (no eval/saves)
        self.examples_this_attempt = 0
        self._sigterm = SigtermFlag()
        self.pipeline_kind = resolve_pipeline(cfg.trainer.pipeline, self.info.device)
        why = check_pipeline(self.pipeline_kind, self.info.device, sharded.is_2d, cfg.parallel.sparse.sync)
        if why and not evaluate_only:
            raise ConfigError(f"config key 'trainer.pipeline' = {cfg.trainer.pipeline!r} is invalid: {why}", key="trainer.pipeline")
        self.pipeline = None  # built by train(); dropped (detached) before every evaluation
        self._stream = None  # the train batches the pipeline reads from
        self._rec: Optional[_StepRecord] = None
        self.checkpointer = (ReadOnlyCheckpointer if evaluate_only else Checkpointer)(self.run_dir, cfg.checkpoint, rank, world, comm_device=self.comm_device)
        es = cfg.trainer.early_stopping
        self.best = BestTracker(self._tracked_metric(), es.mode, es.patience, es.min_delta)
        self._last_eval: Optional[tuple] = None  # (step, metrics) of the latest validation
        self.resumed_from: Optional[Path] = None
        self._maybe_resume()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.base_lrs(), cfg.optim, cfg.trainer.max_steps, self.step)
        profile = cfg.logging.profile
        self.profiler = StepProfiler(self.run_dir, rank, profile.start_step, profile.num_steps, self.info.device)
        # An evaluation starts the writer without purge_step: purging would hide the run's
        # events after the evaluated step.
        self.monitor = Monitor(self.run_dir, rank, cfg.logging, cfg.trainer.max_steps, 0 if evaluate_only else self.step)
        if evaluate_only:
            return
        self.monitor.text("config", to_yaml(cfg))
        self.monitor.text("sharding_plan", describe_plan(self.plan))
        self.monitor.text("flops", f"forward FLOPs/example: {self.flops_per_example:.6g}\nmean history lengths: {self.avg_seq_len}")
        if self.source.bad_rows:
            self.monitor.scalars({"data/bad_rows_skipped": float(self.source.bad_rows)}, self.step)

    # ---------------------------------------------------------------- building
    def _tracked_metric(self) -> str:
        """``trainer.early_stopping.metric`` checked against the tasks: ``eval/<metric>`` (the
        mean over tasks, or the one task's), ``eval/<task>/<metric>`` (with one binary task the
        evaluator reports plain names: ``eval/<metric>``); ``eval/<metric>/<task>`` is read as
        ``eval/<task>/<metric>``."""
        from kunlun.trainer.early_stopping import METRIC_MODES

        metric = self.cfg.trainer.early_stopping.metric
        parts = metric.split("/")
        names = [t.name for t in self.tasks]
        single = len(self.tasks) == 1 and self.tasks[0].type == "binary"
        types = {t.type for t in self.tasks}
        allowed = {"binary": ("auc", "ne", "logloss"), "regression": ("mse", "mae")}

        def bad(why: str) -> ConfigError:
            return ConfigError(f"config key 'trainer.early_stopping.metric' = {metric!r} is invalid: {why}", key="trainer.early_stopping.metric")

        if len(parts) == 3:
            task, name = (parts[1], parts[2]) if parts[2] in METRIC_MODES else (parts[2], parts[1])
            if task not in names:
                raise bad(f"task {task!r} is not one of the tasks {names} (model.tasks, by default one per label of the data)")
            kind = next(t.type for t in self.tasks if t.name == task)
            if name not in allowed[kind]:
                raise bad(f"a {kind} task reports {list(allowed[kind])}")
            return f"eval/{name}" if single else f"eval/{task}/{name}"
        plain = allowed["binary"] if "binary" in types else allowed["regression"]
        if parts[1] not in plain:
            raise bad(f"the mean over tasks reports {list(plain)} here")
        return metric

    def base_lrs(self) -> Dict[str, float]:
        """Learning rates before the schedule: the sparse one times the 2D momentum scale."""
        return {"sparse": self.cfg.optim.sparse_lr * self.sharded.sparse_lr_scale, "dense": self.cfg.optim.dense_lr}

    # -------------------------------------------------------------- checkpoint
    def _state(self) -> Dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "progress": self.progress}

    def _meta(self) -> Dict:
        return {
            "examples_consumed": self.examples_consumed,
            "global_batch_size": self.cfg.data.batch_size,
            "shapes": global_shapes(self.model.state_dict()),
            "data_source": self.cfg.data.source,
            "sparse_strategy": self.sharded.layout.strategy,
            "sharding_group_size": self.sharded.layout.sharding_group_size,
            "seed": self.cfg.seed,
            "early_stopping": self.best.state_dict(),
        }

    def _agree_replicas(self) -> None:
        """2D with a sync period > 1: between syncs the replicas differ. A checkpoint (DCP keeps
        one copy of replicated shards) and an evaluation (each sharding group scores its part
        of the split with its own replica) must see one model, so sync first; a touched sync
        right after a sync sends only the counts. (With sync disabled, 0, a checkpoint keeps
        replica group 0's tables.)"""
        if self.sharded.is_2d and self.sharded.sync_every_n_steps > 1:
            self.sharded.sync()

    def save_checkpoint(self) -> Path:
        self._agree_replicas()
        return self.checkpointer.save(self.step, self._state(), self._meta())

    def _maybe_resume(self) -> None:
        path = self.checkpointer.choose(self.cfg.checkpoint.resume)
        if path is None:
            log.info("starting from scratch (checkpoint.resume=%s)", self.cfg.checkpoint.resume)
            return
        if self.evaluate_only:  # the weights only: no optimizer state, no data position
            state = {"model": self.model.state_dict()}
            meta = self.checkpointer.load(path, state, global_shapes(state["model"]))
            self.model.load_state_dict(state["model"])
            self.step = int(meta["step"])
            self.resumed_from = path
            log.info("loaded the weights of %s: step %d (saved at %d ranks, now %d)", path, self.step, meta.get("world_size", -1), self.info.world_size)
            return
        # Optimizer state is lazy (Adam creates it at the first step); materialise it so
        # DCP has tensors to load into (otherwise DCP finds no optimizer keys and silently
        # loads nothing into them). The dummy step's effects are
        # overwritten by the load.
        self.optimizer.init_state(set(self.model.sparse_grad_parameter_names()))
        state = self._state()
        if not self.checkpointer.has_state(path, "progress"):  # saved before the counters were DCP state
            del state["progress"]
        meta = self.checkpointer.load(path, state, global_shapes(state["model"]))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        if "progress" not in state:
            self.step, self.examples_consumed = int(meta["step"]), int(meta["examples_consumed"])
        elif (self.step, self.examples_consumed) != (int(meta["step"]), int(meta["examples_consumed"])):
            raise CheckpointError(
                f"{path}: the DCP state says step {self.step}, {self.examples_consumed} examples consumed; meta.json says "
                f"step {meta['step']}, {meta['examples_consumed']}: refusing a checkpoint that disagrees with itself"
            )
        self.resumed_from = path
        if "early_stopping" in meta:
            self.best.load_state_dict(meta["early_stopping"])
            if self.cfg.checkpoint.keep_best and self.best.best_step is not None:
                self.checkpointer.best_step = self.best.best_step
            log.info("validation history: %s", self.best.describe())
        log.info(
            "resumed from %s: step %d, %d examples consumed (saved at %d ranks, now %d)",
            path,
            self.step,
            self.examples_consumed,
            meta.get("world_size", -1),
            self.info.world_size,
        )

    # -------------------------------------------------------------------- loop
    def _loader(self, split: str, examples_consumed: int = 0, max_batches: Optional[int] = None):
        d = self.cfg.data
        ds = ShardedBatches(
            self.source,
            split,
            d.batch_size if split == "train" else d.eval_batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            seed=self.cfg.seed,
            shuffle=d.shuffle,
            examples_consumed=examples_consumed,
            max_batches=max_batches,
            id_policy=d.id_policy,
        )
        return ds, make_loader(ds, d.num_workers)

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors for collectives live: NCCL needs them on the GPU."""
        return self.info.comm_device

    def evaluate(self, split: str = "eval") -> Dict[str, float]:
        """Metrics over the whole split (or ``trainer.eval_max_batches`` batches for ``eval``)."""
        max_batches = self.cfg.trainer.eval_max_batches if split == "eval" and self.cfg.trainer.eval_max_batches else None
        self._stop_pipeline()  # a plain loop on the model as built (see _stop_pipeline)
        self._agree_replicas()
        _, loader = self._loader(split, max_batches=max_batches)
        acc = EvalAccumulator(self.tasks)
        self.model.eval()
        with torch.no_grad():
            for batch in loader:
                _, out = self.model(batch.to(self.info.device))
                acc.update(out.logits, out.labels, out.weights, out.domain)
        self.model.train()
        return acc.compute()

    def prefetch_depth(self) -> int:
        """Train batches built ahead (``trainer.prefetch_batches``; -1: 2 on GPU, 0 on CPU)."""
        n = self.cfg.trainer.prefetch_batches
        return n if n >= 0 else (2 if self.info.device.type == "cuda" else 0)

    # ------------------------------------------------------------------ step
    def _start_pipeline(self) -> None:
        """Open the train stream at the trained position and build the step runner on it."""
        _, loader = self._loader("train", examples_consumed=self.examples_consumed)
        depth = self.prefetch_depth()
        self._stream = BackgroundIterator(loader, depth) if depth else iter(loader)
        dense = dict(self.optimizer.optimizers)["dense"]
        step_optimizer = StepOptimizer(self.optimizer.zero_grad, self._optimizer_step, dense.param_groups)
        self.pipeline = build_pipeline(self.pipeline_kind, self.model, step_optimizer, self.info.device, self._train_forward)

    def _stop_pipeline(self) -> None:
        """Detach the runner from the model and drop it with the batches it read ahead.

        Evaluation is a plain loop on the detached model (not TorchRec's eval pipeline): the
        pipelines replace the sharded modules' forward with one that consumes the input
        distribution they started for the *next train batch*, so scoring another split
        through the same model needs the original forwards back. The next train step starts
        a fresh runner at the trained position: the read-ahead batches are read again (a
        refill of up to three batches per evaluation)."""
        if self.pipeline is not None:
            self.pipeline.detach()
            self.pipeline = None
        if isinstance(self._stream, BackgroundIterator):
            self._stream.close()
        self._stream = None

    def _train_forward(self, batch: Batch):
        """The step's forward, called by the runner with the batch it trains: runs the model
        (at the rates the schedule set after the previous step) and agrees with every rank in
        one collective on (non-finite loss, SIGTERM requested); the result is one host read. A non-finite loss returns a detached leaf zero
        instead: the runner's backward is then a no-op, so the fused embedding update inside
        it never sees the bad gradients."""
        lrs = current_lrs(self.optimizer)  # step self.step's rates (the scheduler set them)
        loss, out = self.model(batch)
        flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32), torch.tensor(float(self._sigterm.requested), device=loss.device)])
        loss_nonfinite, sigterm = (bool(x) for x in all_max_flags(flags.to(self.comm_device)).tolist())
        self._rec = _StepRecord(batch, loss.detach(), out, lrs, loss_nonfinite, sigterm)
        if loss_nonfinite:
            return torch.zeros((), device=loss.device, requires_grad=True), out
        return loss, out

    def _optimizer_step(self) -> None:
        """After backward: skip the update when the loss or a dense gradient is non-finite
        (DDP/FSDP averaged the gradients, so every rank gives the same answer); else step and
        run the 2D replica sync on the global step's schedule; then advance the LR schedule."""
        rec = self._rec
        if not rec.loss_nonfinite:
            rec.bad_grads = nonfinite_dense_grads(self._named_params)
        if rec.loss_nonfinite or rec.bad_grads:
            self.optimizer.zero_grad()
        else:
            with self.profiler.region("kunlun/optimizer"):
                self.optimizer.step()
                self.sharded.maybe_sync(self.step + 1)
        with warnings.catch_warnings():
            # A run whose first step is skipped advances the schedule before any
            # optimizer.step(); torch warns about that order, which is intended here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lr_scheduler.step()  # a skipped step still advances the schedule

    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        t_cfg, c_cfg, l_cfg = cfg.trainer, cfg.checkpoint, cfg.logging
        global_batch = cfg.data.batch_size
        self.model.train()
        last_saved = self.step if self.resumed_from is not None else -1
        n_train = self.source.num_examples("train")
        log.info(
            "training steps %d → %d, global batch %d; one epoch = %s train examples = %.1f steps (%d steps = %.2f epochs); pipeline %s",
            self.step,
            t_cfg.max_steps,
            global_batch,
            f"{n_train:,}",
            n_train / global_batch,
            t_cfg.max_steps,
            t_cfg.max_steps * global_batch / n_train,
            self.pipeline_kind,
        )
        self._sigterm.install()
        try:
            self._train_loop(global_batch, t_cfg, c_cfg, l_cfg, last_saved)
        finally:
            self._stop_pipeline()
            self.profiler.finish()  # a window cut short by the end of training or a fault
            self._sigterm.restore()
        return self._finish()

    def _train_loop(self, global_batch, t_cfg, c_cfg, l_cfg, last_saved) -> None:
        window_loss, window_steps, window_start = torch.zeros((), dtype=torch.float64), 0, time.time()
        consecutive_skips = 0
        while self.step < t_cfg.max_steps and not self.best.stopped:
            t_step = time.perf_counter()
            if self.pipeline is None:
                self._start_pipeline()
            with self.profiler.step(self.step):
                self.pipeline.progress(self._stream)
                rec = self._rec
                if rec.loss_nonfinite or rec.bad_grads:
                    consecutive_skips += 1
                    self.skipped_steps += 1
                    what = self._nonfinite_report(rec.batch, rec.loss, rec.output.logits, [] if rec.loss_nonfinite else rec.bad_grads)
                    if t_cfg.nonfinite_policy == "stop" or consecutive_skips > t_cfg.max_consecutive_skips:
                        path = self._write_diagnostic(what)
                        raise NonFiniteError(
                            f"non-finite values at step {self.step} (global batch {self.examples_consumed // global_batch}): "
                            f"{what['nonfinite']}; diagnostic: {path} (trainer.nonfinite_policy={t_cfg.nonfinite_policy}, "
                            f"{consecutive_skips} consecutive)"
                        )
                    log.warning("skipping step %d: non-finite %s (%d in a row)", self.step, what["nonfinite"], consecutive_skips)
                    self.monitor.scalars({"train/skipped_steps": float(self.skipped_steps)}, self.step)
                else:
                    consecutive_skips = 0
                    window_loss = window_loss + rec.loss.to("cpu", torch.float64, non_blocking=True)
                    window_steps += 1
                self.step += 1
                if rec.batch.position < 0:
                    raise RuntimeError("a train batch without its stream position (Batch.position): cannot checkpoint the data position")
                self.examples_consumed = rec.batch.position
                lrs = rec.lrs
            self.train_seconds += time.perf_counter() - t_step
            self.examples_this_attempt += global_batch
            if rec.sigterm:
                path = self.checkpointer.root / f"step_{self.step:08d}" if last_saved == self.step else self.save_checkpoint()
                self.monitor.flush()
                raise Preempted(f"SIGTERM: saved {path} at step {self.step}; rerun the same command to resume")

            if (self.step % l_cfg.log_every_n_steps == 0 or self.step == t_cfg.max_steps) and window_steps:
                mean_loss = all_mean(float(window_loss) / window_steps, self.comm_device)
                elapsed = max(time.time() - window_start, 1e-9)
                examples_per_sec = window_steps * global_batch / elapsed
                model_tflops = TRAIN_FLOPS_FACTOR * self.flops_per_example * examples_per_sec / 1e12
                scalars = {
                    "train/loss": mean_loss,
                    "train/examples_per_sec": examples_per_sec,
                    "perf/model_tflops": model_tflops,
                    "perf/mfu": model_tflops / (self.peak["peak"] * self.info.world_size),
                    "perf/mfu_vs_probe": model_tflops / (self.peak["probe"] * self.info.world_size),
                    "train/lr": lrs["dense"],
                    "train/sparse_lr": lrs["sparse"],
                    "train/epoch": self.examples_consumed / self.source.num_examples("train"),
                }
                self.monitor.scalars(scalars, self.step)
                self.monitor.progress(self.step, {"loss": mean_loss, "ex/s": scalars["train/examples_per_sec"]})
                if self.monitor.bar is None:
                    log.info(
                        "step %d | epoch %s | loss %.5f | %.0f examples/s | lr %.3g",
                        self.step,
                        self._epoch_text(),
                        mean_loss,
                        scalars["train/examples_per_sec"],
                        lrs["dense"],
                    )
                window_loss, window_steps, window_start = torch.zeros((), dtype=torch.float64), 0, time.time()

            # The last step is always validated (before its checkpoint, so that the saved
            # validation history includes it).
            final_step = self.step >= t_cfg.max_steps
            improved = False
            if final_step or (t_cfg.eval_every_n_steps and self.step % t_cfg.eval_every_n_steps == 0):
                improved = self._validate()
                window_start = time.time()
            keep_as_best = improved and c_cfg.keep_best
            periodic_save = c_cfg.every_n_steps and self.step % c_cfg.every_n_steps == 0
            if (periodic_save or final_step or keep_as_best or self.best.stopped) and last_saved != self.step:
                if keep_as_best:
                    self.checkpointer.best_step = self.step  # retention after this save spares it
                self.save_checkpoint()
                last_saved = self.step
                window_start = time.time()
            if keep_as_best:
                self.checkpointer.mark_best(self.step, {"metric": self.best.metric, "value": self.best.best_value})
            if self.best.stopped:
                log.info(
                    "early stopping at step %d (epoch %s): %s",
                    self.step,
                    self._epoch_text(),
                    self.best.describe(),
                )

        if last_saved != self.step:
            self.save_checkpoint()

    def _epoch_text(self) -> str:
        """``2 (1.37)``: the epoch a step is in (1-based), and epochs completed so far."""
        epochs = self.examples_consumed / self.source.num_examples("train")
        return f"{math.floor(epochs) + 1 if epochs % 1 else int(epochs)} ({epochs:.2f})"

    def _validate(self) -> bool:
        """Evaluate the validation split, log it, update the best-step tracker; True when
        this step is the new best."""
        metrics = self._log_eval("eval")
        self._last_eval = (self.step, metrics)
        improved = self.best.update(self.step, metrics)
        if self.best.best_value is not None:
            self.monitor.scalars({f"best/{self.best.metric}": self.best.best_value}, self.step)
        if improved:
            log.info("new best %s %.5f at step %d", self.best.metric, self.best.best_value, self.step)
        return improved

    def _load_best_weights(self) -> Optional[int]:
        """Load the model weights of the best checkpoint (``checkpoint.keep_best``) for the
        final test; the step loaded, or None to test the last step's weights."""
        best_step = self.best.best_step
        if not self.cfg.checkpoint.keep_best or best_step is None or best_step == self.step:
            return None
        path = self.checkpointer.path_of(best_step)
        try:
            self.checkpointer.choose(str(path))  # verifies the manifest (rank 0), same answer everywhere
            state = {"model": self.model.state_dict()}
            self.checkpointer.load(path, state, global_shapes(state["model"]))
        except CheckpointError as e:
            log.error("cannot load the best checkpoint (%s); testing the weights of the last step %d instead", e, self.step)
            return None
        self.model.load_state_dict(state["model"])
        return best_step

    def _finish(self) -> Dict[str, float]:
        """Final validation and test, hparams, summary. With ``checkpoint.keep_best`` the test
        runs on the best validation step's weights (its validation metrics are reported as
        ``eval/*``; the last step's as ``last_eval/*``)."""
        cfg = self.cfg
        if self._last_eval is not None and self._last_eval[0] == self.step:
            last_eval = self._last_eval[1]
        else:  # resumed at the end (a finished or early-stopped run): weights as saved
            last_eval = self._log_eval("eval")
            if self.best.update(self.step, last_eval) and cfg.checkpoint.keep_best:  # a checkpoint of this step exists
                self.checkpointer.mark_best(self.step, {"metric": self.best.metric, "value": self.best.best_value})
        eval_metrics, tested_step = last_eval, self.step
        best_step = self._load_best_weights()
        if best_step is not None:
            eval_metrics, tested_step = self.best.best_metrics, best_step
        label = f"test @ best step {tested_step}" if cfg.checkpoint.keep_best and self.best.best_step == tested_step else None
        test_metrics = self._log_eval("test", label=label, step=tested_step)
        final = {f"eval/{k}": v for k, v in eval_metrics.items()}
        final.update({f"test/{k}": v for k, v in test_metrics.items()})
        if tested_step != self.step:
            final.update({f"last_eval/{k}": v for k, v in last_eval.items()})
        final["test/step"] = float(tested_step)
        if self.best.best_step is not None:
            final["best/step"] = float(self.best.best_step)
            final[f"best/{self.best.metric}"] = float(self.best.best_value)
        final["train/stopped_early"] = float(self.best.stopped)
        final["train/epochs"] = self.examples_consumed / self.source.num_examples("train")
        final["train/step"] = float(self.step)
        final["train/examples_consumed"] = float(self.examples_consumed)
        # Compute actually spent (analytic, like perf/model_tflops): the x-axis of scaling laws.
        final["perf/forward_flops_per_example"] = float(self.flops_per_example)
        final["perf/train_flops"] = TRAIN_FLOPS_FACTOR * self.flops_per_example * self.examples_consumed
        final["model/dense_params"] = float(self.num_params["dense"])
        if self.train_seconds > 0:
            final["perf/examples_per_sec"] = self.examples_this_attempt / self.train_seconds
        final["model/embedding_params"] = float(self.num_params["embedding"])
        touched = self.sharded.touched
        if touched is not None and touched.stats.syncs:  # rank 0's shards (parallel.sparse.sync=touched)
            st = touched.stats
            final["parallel/sync_rows_fraction"] = st.rows_synced / (st.syncs * max(st.rows_total, 1))
            final["parallel/sync_bytes_per_sync"] = (st.bytes_ids + st.bytes_values) / st.syncs
        if self.profiler.summary is not None:
            for cat, share in self.profiler.summary["host_share"].items():
                final[f"profile/{cat}_share"] = share
            self.monitor.text("profile", json.dumps(self.profiler.summary, indent=1))
        self.monitor.hparams(flatten(cfg), {f"hparam/{k}": v for k, v in final.items() if not k.endswith("examples")})
        if self.info.rank == 0:
            write_json_atomic(self.run_dir / "final_metrics.json", final)
            log.info(
                "done (%s step %d of %d%s): test %s\n  TensorBoard: tensorboard --logdir %s\n  checkpoints: %s",
                "best" if label else "last",
                tested_step,
                self.step,
                ", stopped early" if self.best.stopped else "",
                summary(test_metrics, self.tasks),
                self.run_dir / "tensorboard",
                self.checkpointer.root,
            )
        return final

    # -------------------------------------------------------------- faults
    def _nonfinite_report(self, batch, loss, logits, grads) -> Dict:
        local = {
            "rank": self.info.rank,
            "loss": not bool(torch.isfinite(loss.detach()).item()),
            "logits": not bool(torch.isfinite(logits).all()),
            "dense_features": not bool(torch.isfinite(batch.dense).all()),
            "labels": bool(torch.isinf(batch.labels).any()),  # NaN is a missing label, not a fault
            "dense_grads": grads,
        }
        per_rank = [None] * self.info.world_size
        dist.all_gather_object(per_rank, local)
        names = sorted({k for r in per_rank for k, v in r.items() if k != "rank" and v})
        return {
            "step": self.step,
            "global_batch_index": self.examples_consumed // self.cfg.data.batch_size,
            "examples_consumed": self.examples_consumed,
            "nonfinite": names,
            "per_rank": per_rank,
        }

    def _write_diagnostic(self, report: Dict) -> Path:
        path = self.run_dir / "diagnostics" / f"nonfinite-step{self.step:08d}.json"
        if self.info.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, report)
        return path

    def _log_eval(self, split: str, label: Optional[str] = None, step: Optional[int] = None) -> Dict[str, float]:
        """Evaluate ``split``, log it to TensorBoard (at ``step``, default the current one:
        the step whose weights are evaluated) and the console (as ``label``, default
        ``<split> @ step N``)."""
        t0 = time.time()
        metrics = self.evaluate(split)
        self.monitor.scalars({f"{split}/{k}": v for k, v in metrics.items() if k != "examples"}, self.step if step is None else step)
        self.monitor.flush()
        log.info("%s: %s (%d examples, %.1fs)", label or f"{split} @ step {self.step}", summary(metrics, self.tasks), metrics["examples"], time.time() - t0)
        return metrics

    def close(self, synchronize: bool = True) -> None:
        """Flush outputs and leave the process group. ``synchronize=False`` after an
        unexpected error: a peer may be dead, so no barrier (it would hang) — just exit."""
        self._sigterm.restore()
        self.monitor.close()
        if dist.is_initialized() and synchronize:
            dist.barrier()
            dist.destroy_process_group()
