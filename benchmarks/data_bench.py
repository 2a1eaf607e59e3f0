"""Input pipeline throughput: examples/s of ``ShardedBatches`` per source and worker count.

    .venv/bin/python benchmarks/data_bench.py [--batches 50] [--batch-size 1024]

Reports ratios against the synthetic single-process reader measured in the same run
(absolute numbers on a shared CPU machine are noisy; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time

from kunlun.data.loader import ShardedBatches, make_loader
from kunlun.data.sources import build_source
from kunlun.trainer.config import load_config


def bench(source_name: str, workers: int, batches: int, batch_size: int) -> float:
    cfg = load_config("movielens" if source_name == "movielens" else "tiny", [f"data.batch_size={batch_size}"])
    source = build_source(cfg.data, cfg.seed)
    ds = ShardedBatches(source, "train", batch_size, shuffle=True, max_batches=batches)
    loader = make_loader(ds, workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 1
    for _ in it:
        n += 1
    dt = time.perf_counter() - t0
    return (n - 1) * batch_size / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()
    rows = []
    for source in ("synthetic", "movielens"):
        for workers in (0, 2):
            rows.append((source, workers, bench(source, workers, args.batches, args.batch_size)))
    base = rows[0][2]
    print(f"{'source':<10} {'workers':>7} {'examples/s':>12} {'vs synthetic/0':>15}")
    for source, workers, eps in rows:
        print(f"{source:<10} {workers:>7} {eps:>12,.0f} {eps / base:>15.2f}")


if __name__ == "__main__":
    main()
