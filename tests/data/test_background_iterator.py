"""``BackgroundIterator`` (batches built ahead of the training step in a thread): same items
in the same order, the source's error raised where it happens, a clean stop; and a training
run with prefetching ends exactly like one without (same batches, same order, same weights)."""

from __future__ import annotations

import threading
import time

import pytest

from jobs import final_metrics, run_single
from kunlun.data.errors import DataError
from kunlun.data.loader import BackgroundIterator


def test_items_in_order_then_the_end():
    assert list(BackgroundIterator(range(100), depth=3)) == list(range(100))
    assert list(BackgroundIterator([], depth=2)) == []


def test_the_sources_error_is_raised_by_the_next_that_reaches_it():
    def source():
        yield from range(5)
        raise DataError("data/x.parquet: row 17: column 'price' = 'abc': expected a number (float32)")

    it = BackgroundIterator(source(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(DataError, match="row 17: column 'price'"):
        next(it)


def test_reads_ahead_at_most_depth_and_close_stops_the_thread():
    taken = []

    def source():
        for i in range(1000):
            taken.append(i)
            yield i

    it = BackgroundIterator(source(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(taken) <= 4  # the one consumed, two queued, one waiting to be put
    it.close()
    assert not any(t.name == "kunlun-batches" and t.is_alive() for t in threading.enumerate())


@pytest.mark.slow
def test_training_with_prefetch_equals_training_without(tmp_path):
    job = ["trainer.max_steps=40", "trainer.eval_every_n_steps=20", "checkpoint.every_n_steps=0", "logging.progress_bar=false"]
    for depth in (0, 2):
        proc = run_single([f"run_dir={tmp_path / str(depth)}", f"trainer.prefetch_batches={depth}", *job])
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_metrics(tmp_path / "0"), final_metrics(tmp_path / "2")
    for k in ("eval/auc", "eval/ne", "test/auc", "test/ne", "test/logloss", "train/examples_consumed"):
        assert a[k] == b[k], k
