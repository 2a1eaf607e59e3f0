"""Run under torchrun: ``resume_dump_and_train.py DUMP_DIR CONFIG [overrides]``.

Builds a Trainer (which resumes from the run's latest checkpoint), writes the state it
loaded exactly as a checkpoint holds it (``trainer._state()``, DCP, to ``DUMP_DIR/dcp``),
the position it loaded (``DUMP_DIR/loaded.json``: step, examples consumed, world size) and
its eval/test metrics on the loaded weights (``DUMP_DIR/metrics.json``), then trains on to
``trainer.max_steps`` as a normal job does. Runs as one plain process too (world size 1)."""

import json
import sys
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from kunlun.trainer.config import load_config
from kunlun.trainer.trainer import Trainer


def main() -> None:
    dump = Path(sys.argv[1])
    cfg = load_config(sys.argv[2], sys.argv[3:])
    trainer = Trainer(cfg)
    try:
        assert trainer.resumed_from is not None, "expected to resume from a checkpoint"
        dcp.save(trainer._state(), storage_writer=FileSystemWriter(str(dump / "dcp")))
        metrics = {f"{split}/{k}": v for split in ("eval", "test") for k, v in trainer.evaluate(split).items()}
        if dist.get_rank() == 0:
            (dump / "metrics.json").write_text(json.dumps(metrics))
            loaded = {"step": trainer.step, "examples_consumed": trainer.examples_consumed, "world_size": dist.get_world_size()}
            (dump / "loaded.json").write_text(json.dumps(loaded))
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
