"""Per-rank entry point: what ``torchrun`` (and so ``torchx run``) starts on every rank.

    python -m kunlun.launch.main [--config PRESET_OR_YAML] [key=value ...]

Without torchrun it runs as a single process. Exit status: 0 done; 2 bad config, data or
checkpoint (the message says which file/key/value); 3 non-finite loss or gradients
(diagnostic in run_dir/diagnostics/); 75 preempted by SIGTERM after saving a checkpoint
(rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from kunlun.data.errors import DataError
from kunlun.trainer.checkpoint import CheckpointError
from kunlun.trainer.config import ConfigError, load_config


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(prog="kunlun-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="preset name in configs/ (e.g. tiny, movielens) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_steps=100 run_dir=runs/x")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # world-size checks: the trainer, once it has the group
        # Deprecation chatter from TorchRec/torch internals, not actionable by users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        # heavy imports only after the config is valid
        from kunlun.trainer.trainer import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteError, Preempted, Trainer

        trainer = Trainer(cfg)
        agreed = False  # did every rank reach the same outcome? Only then leave the group cleanly.
        try:
            trainer.train()
            agreed = True
        except Preempted as e:
            agreed = True
            print(f"kunlun: preempted: {e}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        except NonFiniteError as e:
            agreed = True
            print(f"kunlun: error: {e}", file=sys.stderr)
            return NONFINITE_EXIT_CODE
        except (ConfigError, DataError, CheckpointError):
            agreed = True
            raise
        finally:
            trainer.close(synchronize=agreed)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"kunlun: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
