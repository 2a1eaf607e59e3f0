"""Rank- and worker-sharded streaming of batches, with a resumable read position.

The train split is one endless stream: epoch ``e`` is a seeded permutation of the split
(the source's ``permutation(split, e, seed)`` when it has one, else ``numpy``'s; the
identity when ``shuffle=False``), and stream position ``p`` is example
``perm_e[p % N]`` with ``e = p // N``. Global batch ``k`` covers positions
``[p0 + k*G, p0 + (k+1)*G)`` after the start position ``p0``, for the global batch size
``G``; rank ``r`` of ``W`` takes the slice ``[.. + r*G/W, .. + (r+1)*G/W)``. So every example is seen exactly once per epoch
across ranks, and the read position is one integer, ``examples_consumed``, that does not
depend on the world size: a run saved at 2 ranks resumes at 1 or 4 with no example
skipped or repeated.

Evaluation splits are read once, in order; the last global batch is padded with
weight-0 copies so that every rank runs the same number of (collective) steps.

With ``num_workers > 1`` DataLoader worker ``w`` builds global batches ``k`` with
``k % num_workers == w``; the DataLoader returns workers' batches round robin, which is
exactly the order of ``k``.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kunlun.data.batch import Batch, ExampleBlock, collate
from kunlun.data.errors import DataError
from kunlun.data.sources import ExampleSource


def check_ids(block: ExampleBlock, schema, policy: str, split: str, indices: np.ndarray) -> None:
    """Every id must be a row of its table: ``error`` names the feature, example and id;
    ``modulo`` maps it into the table (in place)."""
    sizes = schema.table_sizes
    cols = [(f.name, f.table, block.context[f.name].lengths, block.context[f.name]) for f in schema.context_features]
    for e in schema.event_types:
        ev = block.events[e.name]
        cols += [(e.item_key, e.item_table, ev.lengths, ev), (e.action_key, e.action_table, ev.lengths, ev)]
    for key, table, lengths, holder in cols:
        attr = "values" if hasattr(holder, "values") else ("items" if key.endswith(".item") else "actions")
        values = getattr(holder, attr)
        n = sizes[table]
        bad = (values < 0) | (values >= n)
        if not bad.any():
            continue
        if policy == "modulo":
            setattr(holder, attr, np.mod(values, n))
            continue
        first = int(np.flatnonzero(bad)[0])
        example = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        raise DataError(
            f"{split} example {int(indices[example])}: feature {key!r} has id {int(values[first])} outside table "
            f"{table!r} ({n} rows); fix the data or set data.id_policy=modulo"
        )


class ShardedBatches(IterableDataset):
    """This rank's batches of one split, starting at ``examples_consumed``.

    Args:
        source: where examples come from.
        split: ``train`` (endless, reshuffled per epoch) or ``eval``/``test`` (one pass, padded).
        global_batch_size: examples per step over all ranks; divisible by ``world_size``.
        rank, world_size: this process's place.
        seed: permutation seed (epoch ``e`` uses ``(seed, e)``).
        shuffle: permute the train split each epoch.
        examples_consumed: global stream position to start from.
    """

    def __init__(
        self,
        source: ExampleSource,
        split: str,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        examples_consumed: int = 0,
        max_batches: Optional[int] = None,
        id_policy: str = "error",
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
        self.source = source
        self.split = split
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle and split == "train"
        self.examples_consumed = examples_consumed
        self.max_batches = max_batches
        self.num_examples = source.num_examples(split)
        if self.num_examples <= 0:
            raise DataError(f"split {split!r} of the data source ({type(source).__name__}) has no examples")
        self.id_policy = id_policy
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    # ----------------------------------------------------------------- position
    def state_dict(self) -> dict:
        return {"examples_consumed": int(self.examples_consumed), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        self.examples_consumed = int(state["examples_consumed"])

    @property
    def epoch(self) -> int:
        return self.examples_consumed // self.num_examples

    def num_batches(self) -> Optional[int]:
        """Batches in one pass of an eval split (None for the endless train stream)."""
        if self.split == "train":
            return self.max_batches
        n = -(-self.num_examples // self.global_batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    # -------------------------------------------------------------------- reads
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            custom = getattr(self.source, "permutation", None)
            if custom is not None:  # e.g. the file source: row-group-local windows, still a permutation
                self._perm = np.asarray(custom(self.split, epoch, self.seed), dtype=np.int64)
                if len(self._perm) != self.num_examples:
                    raise ValueError(f"{type(self.source).__name__}.permutation gave {len(self._perm)} indices for {self.num_examples} examples")
            else:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_examples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def _indices(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return positions % self.num_examples
        out = np.empty_like(positions)
        epochs = positions // self.num_examples
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._permutation(int(e))[positions[m] % self.num_examples]
        return out

    def batch(self, i: int) -> Batch:
        """The ``i``-th global batch after ``examples_consumed``: this rank's slice of it."""
        start = self.examples_consumed + i * self.global_batch_size + self.rank * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        weights = None
        if self.split != "train":
            valid = positions < self.num_examples
            weights = valid.astype(np.float32)
            positions = np.where(valid, positions, 0)
        indices = self._indices(positions)
        block = self.source.read(self.split, indices)
        check_ids(block, self.source.schema, self.id_policy, self.split, indices)
        if weights is not None:  # padding has weight 0; example weights of the source stay
            block.weights = weights if block.weights is None else block.weights * weights
        batch = collate(block, self.source.schema)
        batch.position = self.examples_consumed + (i + 1) * self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stop = self.num_batches()
        i = 0
        while stop is None or i < stop:
            if i % num_workers == worker:
                yield self.batch(i)
            i += 1


def make_loader(dataset: ShardedBatches, num_workers: int) -> DataLoader:
    """DataLoader over whole batches (``batch_size=None``); order is preserved across workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        # Default collate would convert our Batch; identity keeps it.
        collate_fn=lambda b: b,
        multiprocessing_context="fork" if num_workers else None,
    )


__all__ = ["ShardedBatches", "make_loader"]


class BackgroundIterator:
    """Reads up to ``depth`` items of ``source`` ahead in a daemon thread, so building the next
    batches (reading, decoding, collating) overlaps the training step instead of running
    inside it. Items come out in order; an exception raised by ``source`` (a
    :class:`~kunlun.data.errors.DataError` naming the file and row) is raised by the
    ``next()`` that reaches it. The data position stays the consumer's: an item read ahead but
    never taken was not trained on, and a resumed job reads it again.

    Worth it because the batch builders spend most of their time in numpy, pyarrow and torch
    code that releases the GIL; ``close()`` stops the thread (also at interpreter exit)."""

    def __init__(self, source, depth: int = 2):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name="kunlun-batches", daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it) -> None:
        try:
            for item in it:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        import queue

        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
