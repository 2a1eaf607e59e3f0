"""The trainer's step against a bare TorchRec loop over the same model (issue #12 item 6).

    .venv/bin/python benchmarks/bare_loop_bench.py [--config movielens] [--steps 300] [--rounds 3] [--out runs/bare_loop_bench]

Three modes, each a fresh process (``one --mode M``) built by kunlun's ``Trainer`` (same
tables, sharding plan, fused row-wise AdaGrad, dense optimizer, loader and batches):

* ``kunlun``: the trainer's step loop (validation and checkpoints off; batches built ahead in
  a thread, ``trainer.prefetch_batches=2``, as ``train()`` does on a GPU); examples/s over the training
  steps' wall time (``train_seconds``: data, forward, backward, optimizer, the per-step checks
  and logging); ``kunlun_sync``: the same with ``trainer.prefetch_batches=0`` (batches built
  inside the step);
* ``bare``: the same objects driven by a minimal loop: ``next(loader)`` → ``model(batch)``
  → ``loss.backward()`` → ``optimizer.step()`` → ``zero_grad()``;
* ``prebuilt``: the bare loop over batches built (read, collated) before the clock starts.

The first 20 steps of every mode are warm-up and not timed. Modes run alternately, round
after round, in one invocation (the machine is shared and noisy: compare within a round);
the report gives each round's ratios kunlun/bare and kunlun/prebuilt and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 20
MODES = ("kunlun", "kunlun_sync", "bare", "prebuilt")
QUIET = [
    "trainer.eval_every_n_steps=0",
    "trainer.early_stopping.patience=0",
    "checkpoint.every_n_steps=0",
    "checkpoint.resume=never",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


def one(args) -> None:
    """One mode in this process; prints a JSON line with examples/s."""
    import torch

    from kunlun.trainer.config import load_config
    from kunlun.trainer.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bare-loop-")
    extra = ["trainer.prefetch_batches=0"] if args.mode == "kunlun_sync" else ["trainer.prefetch_batches=2"]
    cfg = load_config(args.config, [f"run_dir={run_dir}", f"trainer.max_steps={WARMUP + args.steps}", *QUIET, *extra])
    trainer = Trainer(cfg)
    gb = cfg.data.batch_size
    try:
        if args.mode in ("kunlun", "kunlun_sync"):
            # warm-up steps are timed by train() too: subtract a separate warm-up run's time
            t_warm = _kunlun_seconds(trainer, WARMUP)
            trainer.cfg.trainer.max_steps = WARMUP + args.steps
            seconds = _kunlun_seconds(trainer, WARMUP + args.steps) - t_warm
        else:
            model, opt = trainer.model, trainer.optimizer
            _, loader = trainer._loader("train")
            it = iter(loader)
            device = trainer.info.device
            batches = [next(it) for _ in range(WARMUP + args.steps)] if args.mode == "prebuilt" else None

            def step(i: int) -> None:
                batch = batches[i] if batches is not None else next(it)
                loss, _ = model(batch.to(device))
                loss.backward()
                opt.step()
                opt.zero_grad()

            for i in range(WARMUP):
                step(i)
            t0 = time.perf_counter()
            for i in range(WARMUP, WARMUP + args.steps):
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    finally:
        trainer.close()
    print(json.dumps({"mode": args.mode, "examples_per_sec": args.steps * gb / seconds, "seconds": seconds}), flush=True)


def _kunlun_seconds(trainer, max_steps: int) -> float:
    """Train up to ``max_steps`` (continuing) and return the total training-step wall time."""
    trainer.cfg.trainer.max_steps = max_steps
    t = trainer.cfg.trainer
    try:  # the loop itself (as train() runs it): no final test, no final save
        trainer._train_loop(trainer.cfg.data.batch_size, t, trainer.cfg.checkpoint, trainer.cfg.logging, -1)
    finally:
        trainer._stop_pipeline()
    return trainer.train_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "one"])
    p.add_argument("--mode", default="kunlun", choices=list(MODES))
    p.add_argument("--config", default="movielens")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/bare_loop_bench")
    args = p.parse_args()
    if args.command == "one":
        one(args)
        return
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    rounds = []
    for r in range(args.rounds):
        row = {}
        for mode in MODES:
            env["MASTER_PORT"] = str(29600 + 3 * r + len(row))
            cmd = [sys.executable, __file__, "one", "--mode", mode, "--config", args.config, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["examples_per_sec"]
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{m} {v:.0f} ex/s" for m, v in row.items()), flush=True)
    (out / "results.json").write_text(json.dumps(rounds, indent=1) + "\n")
    vs_bare = [r["kunlun"] / r["bare"] for r in rounds]
    vs_pre = [r["kunlun"] / r["prebuilt"] for r in rounds]
    print(f"\n{args.config}, {args.steps} timed steps after {WARMUP} warm-up, one process, {args.rounds} rounds\n")
    sync = [r["kunlun_sync"] / r["bare"] for r in rounds]
    print("| round | kunlun ex/s | kunlun, no prefetch | bare loop | bare, pre-built batches | kunlun / bare | no prefetch / bare | kunlun / pre-built |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(
            f"| {i} | {r['kunlun']:.0f} | {r['kunlun_sync']:.0f} | {r['bare']:.0f} | {r['prebuilt']:.0f} | {vs_bare[i]:.3f} | {sync[i]:.3f} | {vs_pre[i]:.3f} |"
        )
    print(f"| median | | | | | {statistics.median(vs_bare):.3f} | {statistics.median(sync):.3f} | {statistics.median(vs_pre):.3f} |")


if __name__ == "__main__":
    main()
