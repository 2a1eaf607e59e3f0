"""What a run shows: TensorBoard scalars/text/hparams, a tqdm bar, console and file logs.

Only rank 0 writes TensorBoard and the bar; every rank logs to ``run_dir/logs/rank<r>.log``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Dict, Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("kunlun")


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def setup_logging(run_dir: Path, rank: int, level: str = "INFO") -> None:
    """``kunlun`` messages at ``level`` to the console (rank 0) and ``run_dir/logs/rank<r>.log``
    (every rank, appended on resume).

    Other libraries' warnings (and Python ``warnings``) go to the file only: TorchRec's
    planner and torch.fx warn on every healthy run ("...otherwise, the job will fail"),
    which a user can do nothing about. Their errors still reach the console (stderr)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    ours = logging.getLogger("kunlun")
    for lg in (root, ours):
        for h in list(lg.handlers):
            if getattr(h, "_kunlun", False):
                lg.removeHandler(h)
    root.setLevel(logging.WARNING)  # TorchRec/FBGEMM are chatty at INFO
    # A library's logging.basicConfig() put a console handler on the root logger; torch has
    # its own (torch._logging, not propagating). Replace both by our file + errors-only console.
    torch_logger = logging.getLogger("torch")
    for h in list(root.handlers):
        if _is_console(h):
            root.removeHandler(h)
    for h in list(torch_logger.handlers):
        if getattr(h, "_kunlun", False):
            torch_logger.removeHandler(h)
        elif _is_console(h):
            h.setLevel(logging.ERROR)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    errors.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    errors._kunlun = True  # type: ignore[attr-defined]
    root.addHandler(errors)
    logging.captureWarnings(True)  # warnings.warn → logger "py.warnings" → the file
    ours.setLevel(level)
    # Modules log as kunlun.<package>.<module>; keep them under the "kunlun" logger.
    fh = logging.FileHandler(logs / f"rank{rank}.log")
    fh.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
    fh._kunlun = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    if not torch_logger.propagate:
        torch_logger.addHandler(fh)
    # Our records go to our handlers only: a library may have called logging.basicConfig,
    # whose root console handler would print every line twice.
    ours.propagate = False
    ours.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("[kunlun] %(message)s"))
        sh._kunlun = True  # type: ignore[attr-defined]
        ours.addHandler(sh)


class Monitor:
    """TensorBoard writer and progress bar of rank 0; no-ops on other ranks."""

    def __init__(self, run_dir: Path, rank: int, logging_cfg, max_steps: int, start_step: int):
        self.rank = rank
        self.writer: Optional[SummaryWriter] = None
        self.bar: Optional[tqdm] = None
        if rank != 0:
            return
        if logging_cfg.tensorboard:
            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step if start_step > 0 else None)
        if logging_cfg.progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown: indent by 4 spaces so YAML keeps its layout.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, hparams: Dict, metrics: Dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def progress(self, step: int, postfix: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
