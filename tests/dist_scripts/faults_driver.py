"""Run under torchrun: ``kunlun.launch.main`` with one fault injected on ONE rank, then record
what every rank did. Used by ``tests/trainer/test_faults_multirank.py``::

    torchrun ... tests/dist_scripts/faults_driver.py OUT_DIR FAULT RANK STEP -- --config tiny key=value ...

FAULT (injected on rank ``RANK`` only, the other ranks run unpatched):

* ``sigterm``: the rank sends itself a real SIGTERM at the start of step ``STEP``.
* ``nan``: the rank's half of global batch ``STEP`` has NaN dense features (needs
  ``data.shuffle=false``, so that global batch ``b`` is train positions ``[b*B, (b+1)*B)``).
* ``enospc_dcp``: while DCP writes the rank's shard of the checkpoint of step ``STEP``, the
  disk is full (a few bytes are written, then ``OSError(ENOSPC)``).
* ``enospc_rng``: the same in kunlun's own write of the rank's RNG file of that checkpoint.
* ``none``: nothing.

Writes ``OUT_DIR/rank<r>.json``: the exit status ``main()`` returned, its stderr, the step,
examples consumed and skipped steps when the trainer closed, where it resumed from, and a
sha256 of the rank's dense (data-parallel) weights, so a test can check that the ranks agree.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict


class _Tee(io.TextIOBase):
    """stderr that is also kept, to put the rank's own messages in its outcome file."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.kept.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def _inject(fault: str, step: int, rank: int) -> None:
    import numpy as np
    import torch

    import kunlun.trainer.checkpoint as ckpt
    from kunlun.data.sources.synthetic import SyntheticSource
    from kunlun.trainer.trainer import Trainer

    if fault == "sigterm":
        orig_forward = Trainer._train_forward

        def forward(self, batch):
            if self.step == step:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only
            return orig_forward(self, batch)

        Trainer._train_forward = forward
    elif fault == "nan":
        orig_read = SyntheticSource.read

        def read(self, split, indices):
            block = orig_read(self, split, indices)
            if split == "train":
                block.dense[(np.asarray(indices) // 64) == step] = np.nan
            return block

        SyntheticSource.read = read
    elif fault in ("enospc_dcp", "enospc_rng"):
        target = f".tmp-step_{step:08d}"

        def disk_full(stream) -> None:
            stream.write(b"\0" * 16)  # part of the file reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")

        if fault == "enospc_dcp":
            import torch.distributed.checkpoint.filesystem as dcp_fs

            orig_write_item = dcp_fs._write_item

            def write_item(transforms, stream, *args, **kwargs):
                if target in str(getattr(stream, "name", "")):
                    disk_full(stream)
                return orig_write_item(transforms, stream, *args, **kwargs)

            dcp_fs._write_item = write_item
        else:
            orig_save = torch.save

            def save(obj, f, *args, **kwargs):
                if target in str(f) and str(f).endswith(f"rank{rank}.pt"):
                    with open(f, "wb") as stream:
                        disk_full(stream)
                return orig_save(obj, f, *args, **kwargs)

            ckpt.torch.save = save  # the torch module kunlun's checkpoint code calls
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")


def _dense_digest(trainer) -> str:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    h = hashlib.sha256()
    for name, p in sorted(in_backward_optimizer_filter(trainer.model.named_parameters())):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    out_dir, fault, fault_rank, fault_step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if sys.argv[5] != "--":
        raise SystemExit(__doc__)
    rank = int(os.environ["RANK"])
    from kunlun.launch.main import main as kunlun_main
    from kunlun.trainer.trainer import Trainer

    if rank == fault_rank:
        _inject(fault, fault_step, rank)
    seen: Dict[str, Any] = {}
    orig_close = Trainer.close

    def close(self, synchronize: bool = True) -> None:
        seen.update(
            step=self.step,
            examples_consumed=self.examples_consumed,
            skipped_steps=self.skipped_steps,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            dense_sha256=_dense_digest(self),
        )
        return orig_close(self, synchronize)

    Trainer.close = close
    tee = _Tee(sys.stderr)
    sys.stderr = tee
    try:
        code = kunlun_main(sys.argv[6:])
    finally:
        sys.stderr = tee.stream
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = {"rank": rank, "exit": code, "stderr": tee.kept.getvalue(), **seen}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(outcome, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
