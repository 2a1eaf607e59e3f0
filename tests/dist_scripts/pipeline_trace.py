"""Run under torchrun: ``pipeline_trace.py CONFIG [overrides]`` — a normal training job that
also appends, for every step this process trains, ``{"step", "position", "fingerprint"}`` to
``<run_dir>/trace-rank<R>.jsonl`` (appended across attempts and resumed runs).

``position`` is ``Batch.position`` of the batch handed to the step's forward (the batch the
runner actually trains, whatever it read ahead); ``fingerprint`` sums the batch's dense values
and context ids, so two runs that trained the same examples in the same order have equal
traces, and a skipped or repeated batch shows up as a gap or a duplicate."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from kunlun.trainer.config import load_config
from kunlun.trainer.trainer import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    trace = Path(cfg.run_dir) / f"trace-rank{dist.get_rank()}.jsonl"
    forward = trainer._train_forward

    def traced(batch):
        with trace.open("a") as f:
            fp = float(batch.dense.double().sum()) + float(batch.context.values().double().sum())
            f.write(json.dumps({"step": trainer.step, "position": batch.position, "fingerprint": fp}) + "\n")
        return forward(batch)

    trainer._train_forward = traced
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
