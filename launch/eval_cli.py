"""``kunlun eval``: score a saved checkpoint of a run on its validation or test split.

    kunlun eval --run-dir R [--checkpoint latest|best|PATH] [--split eval|valid|test] [key=value ...]
    torchrun --nproc_per_node N -m kunlun.launch.eval_cli --run-dir R ...      (every rank)
    torchx run -s local_cwd ./launch/components.py:eval -j 1x2 --run_dir R [--checkpoint ..] [--split ..] [key=value ...]

The run's resolved config (``R/config.yaml``, written by the trainer) rebuilds the model;
``key=value`` overrides apply on top of it (moved data paths, ``parallel.sparse.strategy=1d``
to score a 2D checkpoint on fewer processes, ...). The checkpoint is loaded at whatever
world size this command runs with (DCP reshards it) and scored exactly like the trainer's
``evaluate()``, so the metrics carry the same names: ``auc``, ``ne``, ``logloss`` and, with
several tasks, ``<task>/<metric>``.

Written: the console; TensorBoard (``R/tensorboard``, tags ``eval_ckpt/<split>/<metric>`` at
the checkpoint's step); ``R/eval/<checkpoint>-<split>.json`` (step, split, checkpoint,
world size, metrics). Nothing in ``R/checkpoints`` is created, changed or deleted, and
``config.yaml`` / ``final_metrics.json`` stay as training left them.

``--checkpoint``: ``latest`` (default: the newest complete checkpoint; it must verify, an
older one is not tried in its place), ``best`` (the one ``checkpoints/best.json`` names:
with ``checkpoint.keep_best`` the step the final test ran on), a checkpoint folder, a
folder name in ``R/checkpoints`` (``step_00000040``) or a step number (``40``).

Exit status: 0 done; 2 bad run folder, checkpoint, config or data (the message says which).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional

from kunlun.data.errors import DataError
from kunlun.trainer.checkpoint import CheckpointError
from kunlun.trainer.config import ConfigError, load_config

log = logging.getLogger("kunlun")

SPLITS = {"eval": "eval", "valid": "eval", "validation": "eval", "test": "test"}
# Keys this command sets itself: from --run-dir and --checkpoint.
RESERVED_KEYS = ("run_dir", "checkpoint.resume")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunlun eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", "--run_dir", dest="run_dir", required=True, help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="latest (default) | best | a checkpoint folder | a name or step in RUN_DIR/checkpoints")
    p.add_argument("--split", default="test", help="test (default) | eval (the validation split; 'valid' is accepted too)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides on top of RUN_DIR/config.yaml, e.g. data.files.test=/new/path")
    return p.parse_args(argv)


def resolve_checkpoint(run_dir: Path, spec: str) -> Path:
    """``--checkpoint`` → a committed checkpoint folder, or :class:`CheckpointError` naming
    what was asked for and what exists. (Its files are verified when it is loaded.)"""
    # The trainer's own listing rules, through a checkpointer that writes nothing (and,
    # built before the process group exists, needs none).
    from kunlun.trainer.checkpoint import ReadOnlyCheckpointer

    checkpointer = ReadOnlyCheckpointer(run_dir, None, 0, 1)
    root = checkpointer.root
    complete = checkpointer.complete()
    available = f"complete checkpoints in {root}: {[p.name for p in complete] or 'none'}"
    if spec == "latest":
        if not complete:
            raise CheckpointError(f"--checkpoint latest: {root} holds no complete checkpoint (a step_* folder with meta.json)")
        return complete[-1]
    if spec == "best":
        best_json = root / "best.json"
        if not best_json.is_file():
            raise CheckpointError(
                f"--checkpoint best: {best_json} does not exist (the run did not record a best step: checkpoint.keep_best=false, "
                f"or no validation yet); use latest or a checkpoint folder; {available}"
            )
        path = checkpointer.best()
        if path is None:
            raise CheckpointError(f"--checkpoint best: {best_json} names a checkpoint that is missing, incomplete or unreadable; {available}")
        return path
    candidates = [root / spec] + ([root / f"step_{int(spec):08d}"] if spec.isdigit() else []) + [Path(spec).expanduser()]
    for cand in candidates:
        if cand.is_dir():
            if not (cand / "meta.json").is_file():
                raise CheckpointError(f"--checkpoint {spec!r}: {cand} is not a complete checkpoint (no meta.json); {available}")
            return cand.resolve()
    raise CheckpointError(f"--checkpoint {spec!r}: expected latest, best, a checkpoint folder, or a folder name or step in {root}; {available}")


def checkpoint_job(args: argparse.Namespace):
    """``--run-dir`` / ``--split`` / ``--checkpoint`` / overrides (shared by ``kunlun eval`` and
    ``kunlun predict``) → ``(split, config)``: the run's ``config.yaml`` with the overrides,
    ``run_dir`` and ``checkpoint.resume`` set to the chosen checkpoint. Errors name the
    argument (ConfigError / CheckpointError)."""
    run_dir = Path(args.run_dir).expanduser().resolve()
    config_yaml = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"--run-dir {args.run_dir!r}: no such folder ({run_dir})")
    if not config_yaml.is_file():
        raise ConfigError(f"--run-dir {args.run_dir!r}: {config_yaml} does not exist (not a kunlun run folder: the trainer writes it at start)")
    split = SPLITS.get(args.split)
    if split is None:
        raise ConfigError(f"--split {args.split!r} is invalid: expected one of {sorted(SPLITS)}")
    for item in args.overrides:
        if item.split("=", 1)[0] in RESERVED_KEYS:
            raise ConfigError(f"command line: override {item!r} is not allowed here: use --run-dir / --checkpoint")
    ckpt = resolve_checkpoint(run_dir, args.checkpoint)
    return split, load_config(str(config_yaml), [*args.overrides, f"run_dir={run_dir}", f"checkpoint.resume={ckpt}"])


def run_on_checkpoint(prog: str, prepare: Callable[[], tuple], work: Callable) -> int:
    """Build ``Trainer(config, evaluate_only=True[, source=source])`` from ``prepare() ->
    (split, config)`` or ``(split, config, source)``, run
    ``work(trainer, split)`` on every rank and close the trainer; bad input → ``prog: error:
    ...`` on stderr and exit status 2."""
    try:
        split, cfg, *source = prepare()
        warnings.filterwarnings("ignore", category=FutureWarning)
        from kunlun.trainer.trainer import Trainer

        trainer = Trainer(cfg, evaluate_only=True, source=source[0] if source else None)
        agreed = False  # did every rank reach the same outcome? Only then leave the group cleanly.
        try:
            work(trainer, split)
            agreed = True
        except (ConfigError, DataError, CheckpointError):
            agreed = True
            raise
        finally:
            trainer.close(synchronize=agreed)
    except (ConfigError, DataError, CheckpointError) as e:
        hint = ""
        if getattr(e, "key", None) == "parallel.sparse.sharding_group_size":
            hint = "; to score a 2D checkpoint on this many processes add parallel.sparse.strategy=1d (DCP reshards it)"
        print(f"{prog}: error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_on_checkpoint("kunlun eval", lambda: checkpoint_job(args), lambda trainer, split: evaluate_checkpoint(trainer, split, args.overrides))


def evaluate_checkpoint(trainer, split: str, overrides: List[str]) -> dict:
    """Score the loaded checkpoint on ``split`` (a collective: every rank) and report it:
    console, TensorBoard at the checkpoint's step, ``eval/<checkpoint>-<split>.json`` (rank 0)."""
    from kunlun.trainer.checkpoint import write_json_atomic

    ckpt, step = trainer.resumed_from, trainer.step
    t0 = time.time()
    metrics = trainer.evaluate(split)
    trainer.monitor.scalars({f"eval_ckpt/{split}/{k}": v for k, v in metrics.items() if k != "examples"}, step)
    trainer.monitor.flush()
    report = {
        "step": step,
        "split": split,
        "checkpoint": str(ckpt),
        "world_size": trainer.info.world_size,
        "overrides": list(overrides),
        "metrics": metrics,
    }
    out = trainer.run_dir / "eval" / f"{ckpt.name}-{split}.json"
    if trainer.info.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
    per_label = "".join(f"\n  {k}: {v:.6f}" for k, v in sorted(metrics.items()) if "/" in k)
    plain = " | ".join(f"{k} {metrics[k]:.6f}" for k in ("auc", "ne", "logloss", "mse", "mae") if k in metrics)
    log.info(
        "%s @ step %d (%s, %s): %s (%d examples, %.1fs)%s\n  written: %s and TensorBoard tags eval_ckpt/%s/* in %s",
        split,
        step,
        ckpt,
        f"{trainer.info.world_size} process" + ("es" if trainer.info.world_size > 1 else ""),
        plain,
        metrics["examples"],
        time.time() - t0,
        per_label,
        out,
        split,
        trainer.run_dir / "tensorboard",
    )
    return report


if __name__ == "__main__":
    sys.exit(main())
