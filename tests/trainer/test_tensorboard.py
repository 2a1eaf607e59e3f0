"""What a run shows: every documented TensorBoard tag, read back with TensorBoard's own
reader, and the ``skip`` policies (bad data rows, non-finite steps) counted on the console
and in TensorBoard.

One real job (a subprocess through ``kunlun.launch.main``) on a small Parquet data set with
three malformed training rows (``data.bad_row_policy=skip``) and one training batch whose
dense features are made NaN after reading (``trainer.nonfinite_policy=skip``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import REPO, final_metrics, job_env

# The scalar tags the README's "TensorBoard" section documents, for a run with periodic
# validation, skipped bad rows and a skipped step. The test asserts the logged set equals
# this one: a tag that disappears or appears undocumented fails it.
DOCUMENTED_SCALARS = {
    "train/loss",
    "train/examples_per_sec",
    "train/lr",
    "train/sparse_lr",
    "train/epoch",
    "train/skipped_steps",
    "data/bad_rows_skipped",
    "perf/model_tflops",
    "perf/mfu",
    "perf/mfu_vs_probe",
    "eval/auc",
    "eval/ne",
    "eval/logloss",
    "best/eval/ne",
    "test/auc",
    "test/ne",
    "test/logloss",
}
DOCUMENTED_TEXTS = {"config", "sharding_plan", "flops"}

ROWS, BATCH, STEPS, POISONED_BATCH = 640, 32, 16, 5
BAD_ROWS = {7: ("label", None), 100: ("price", float("inf")), 333: ("label", 3)}

JOB = """\
data:
  source: parquet
  batch_size: {batch}
  shuffle: false
  bad_row_policy: skip
  files:
    train: {root}/train.parquet
    eval: {root}/eval.parquet
    test: {root}/test.parquet
    schema:
      tables: [{{name: item, num_embeddings: 64}}, {{name: cat, num_embeddings: 4, id_mapping: identity}}]
      events: [{{name: click, max_len: 4}}]
      columns:
        - {{name: label, role: label, dtype: int64}}
        - {{name: item_id, role: categorical, dtype: string, table: item}}
        - {{name: cat, role: categorical, dtype: int64, table: cat}}
        - {{name: price, role: dense, dtype: float32}}
        - {{name: clicks, role: sequence, dtype: list<string>, event: click, table: item}}
"""

# Runs the real CLI entry point with FileSource.read wrapped so that the training rows of
# one global batch come back with NaN dense features (shuffle is off, so positions are
# batch-aligned). The console is the job's real stdout/stderr.
DRIVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kunlun.data.sources.files import FileSource
    from kunlun.launch.main import main

    read = FileSource.read

    def poisoned(self, split, indices):
        block = read(self, split, indices)
        if split == "train":
            block.dense[np.asarray(indices) // {batch} == {poisoned}] = np.nan
        return block

    FileSource.read = poisoned
    sys.exit(main(sys.argv[1:]))
    """
)


def _table(rng: np.random.Generator, n: int, bad: dict) -> pa.Table:
    cat = rng.integers(0, 4, n)
    label = (rng.random(n) < np.where(cat < 2, 0.8, 0.2)).astype(np.int64)  # learnable from `cat`
    cols = {
        "label": label.tolist(),
        "item_id": [f"i{v}" for v in rng.integers(0, 50, n)],
        "cat": cat.tolist(),
        "price": rng.normal(size=n).tolist(),
        "clicks": [[f"i{v}" for v in rng.integers(0, 50, rng.integers(0, 4))] for _ in range(n)],
    }
    for row, (col, value) in bad.items():
        cols[col][row] = value
    types = {"label": pa.int64(), "item_id": pa.string(), "cat": pa.int64(), "price": pa.float64(), "clicks": pa.list_(pa.string())}
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    rng = np.random.default_rng(0)
    pq.write_table(_table(rng, ROWS, BAD_ROWS), root / "train.parquet")
    for split in ("eval", "test"):
        pq.write_table(_table(rng, 256, {}), root / f"{split}.parquet")
    (root / "job.yaml").write_text(JOB.format(root=root, batch=BATCH))
    run_dir = root / "run"
    args = [
        "--config",
        str(root / "job.yaml"),
        f"run_dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every_n_steps=8",
        "trainer.nonfinite_policy=skip",
        "logging.log_every_n_steps=4",
        "logging.progress_bar=false",
        "checkpoint.every_n_steps=0",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER.format(batch=BATCH, poisoned=POISONED_BATCH), *args],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return run_dir, proc.stdout + proc.stderr, acc


def test_every_documented_scalar_and_text_is_logged_at_its_steps(run):
    run_dir, _, acc = run
    tags = acc.Tags()
    logged = {t for t in tags["scalars"] if not t.startswith("hparam/")}  # hparams: next test
    assert logged == DOCUMENTED_SCALARS, (logged - DOCUMENTED_SCALARS, DOCUMENTED_SCALARS - logged)
    for tag in ("train/loss", "train/lr", "train/sparse_lr", "train/epoch", "perf/mfu"):
        assert [e.step for e in acc.Scalars(tag)] == [4, 8, 12, 16], tag
    assert [e.step for e in acc.Scalars("eval/auc")] == [8, 16]
    # epoch = examples consumed / training examples (the bad rows keep their positions)
    assert [e.value for e in acc.Scalars("train/epoch")] == pytest.approx([s * BATCH / ROWS for s in (4, 8, 12, 16)])
    assert all(e.value > 0 for e in acc.Scalars("train/sparse_lr"))
    m = final_metrics(run_dir)
    assert acc.Scalars("test/auc")[-1].value == pytest.approx(m["test/auc"], abs=1e-6)
    assert m["test/auc"] > 0.7  # label is P(1) = 0.8 for cat < 2 else 0.2: the oracle AUC is 0.8
    texts = {t.split("/")[0] for t in tags["tensors"] if t.endswith("/text_summary")}
    assert DOCUMENTED_TEXTS <= texts, texts
    plan = acc.Tensors("sharding_plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "item" in plan and "cat" in plan
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "bad_row_policy: skip" in config


def test_hparams_carry_the_config_and_final_metrics(run):
    run_dir, _, acc = run
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert set(content) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["data.bad_row_policy"].string_value == "skip"
    assert start.hparams["trainer.max_steps"].number_value == STEPS
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"hparam/test/auc", "hparam/test/ne", "hparam/eval/auc"} <= metric_tags, metric_tags
    # ... and each metric's value is the final one
    assert acc.Scalars("hparam/test/auc")[-1].value == pytest.approx(final_metrics(run_dir)["test/auc"], abs=1e-6)


def test_skip_policies_are_counted_on_the_console_and_in_tensorboard(run):
    run_dir, console, acc = run
    assert f"data: skipped {len(BAD_ROWS)} bad rows (data.bad_row_policy=skip)" in console
    assert [e.value for e in acc.Scalars("data/bad_rows_skipped")] == [len(BAD_ROWS)]
    # a skipped step is numbered by the steps completed before it, like the diagnostics
    assert f"skipping step {POISONED_BATCH}: non-finite ['dense_features', 'logits', 'loss'] (1 in a row)" in console
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [(POISONED_BATCH, 1.0)]
    assert final_metrics(run_dir)["train/examples_consumed"] == STEPS * BATCH  # the NaN batch is consumed, not retried
