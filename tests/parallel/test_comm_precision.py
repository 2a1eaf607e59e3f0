"""Quantized embedding communication (``parallel.sparse.comm_precision``, TorchRec's qcomm
codecs) on 2 gloo ranks with row-wise tables (every lookup crosses ranks both ways).

fp16 and bf16 train the tiny job for 40 steps to within ``NE_BOUND`` of fp32 and do change
the result (the codec really runs); fp8 is refused on CPU with a message naming the key.
Measured (seed 0, 100 steps): test NE fp32 0.9680, fp16 0.9673, bf16 0.9674.
"""

from __future__ import annotations

import pytest

from jobs import final_metrics, run_torchrun

NE_BOUND = 0.005
JOB = [
    "trainer.max_steps=40",
    "trainer.eval_every_n_steps=40",
    "parallel.sparse.sharding_types=[row_wise]",
    "checkpoint.every_n_steps=0",
    "logging.progress_bar=false",
]


@pytest.mark.slow
def test_fp16_and_bf16_embedding_comms_train_close_to_fp32(tmp_path):
    ne = {}
    for precision in ("fp32", "fp16", "bf16"):
        run = tmp_path / precision
        run_torchrun(2, [f"run_dir={run}", f"parallel.sparse.comm_precision={precision}", *JOB])
        ne[precision] = final_metrics(run)["test/ne"]
    for precision in ("fp16", "bf16"):
        assert ne[precision] != ne["fp32"], f"{precision}: identical to fp32, the codec did not run"
        assert abs(ne[precision] - ne["fp32"]) <= NE_BOUND, ne


@pytest.mark.slow
def test_fp8_is_refused_on_cpu(tmp_path):
    proc = run_torchrun(2, [f"run_dir={tmp_path}", "parallel.sparse.comm_precision=fp8", *JOB], check=False)
    assert proc.returncode != 0
    assert "config key 'parallel.sparse.comm_precision' = 'fp8' is invalid on cpu: fp8 embedding communication needs CUDA" in proc.stdout + proc.stderr
