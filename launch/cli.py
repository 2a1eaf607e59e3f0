"""The ``kunlun`` command.

    kunlun data inspect|vocab|convert --config job.yaml ...   (kunlun.launch.data_cli)
    kunlun train [--config PRESET_OR_YAML] [key=value ...]    (kunlun.launch.main, one process)
    kunlun eval --run-dir R [--checkpoint latest|best|PATH] [--split eval|test] [key=value ...]
                                                              (kunlun.launch.eval_cli, one process)
    kunlun predict --run-dir R [--checkpoint ..] [--split eval|test | --input GLOB] --output DIR
                   [--overwrite | --resume] [--rows-per-part N] [--columns a,b,c] [--no-progress] [key=value ...]
                                                              (kunlun.launch.predict_cli, one process:
                                                              Parquet scores of every example of a split
                                                              or of files in the run's data schema)

    kunlun export --run-dir R [--checkpoint ..] --out DIR [--embedding-dtype fp32|fp16|int8] [--overwrite] [key=value ...]
                                                              (kunlun.launch.export_cli, one process: a serving
                                                              folder for kunlun.serving.load)

Multi-process training and evaluation go through ``torchx run`` (see README); multi-process
scoring through ``torchx run ./launch/components.py:predict`` or ``torchrun --nproc_per_node N -m kunlun.launch.predict_cli ...``.
"""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = __doc__


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "data":
        from kunlun.launch.data_cli import main as data_main

        return data_main(rest)
    if command == "train":
        from kunlun.launch.main import main as train_main

        return train_main(rest)
    if command == "eval":
        from kunlun.launch.eval_cli import main as eval_main

        return eval_main(rest)
    if command == "predict":
        from kunlun.launch.predict_cli import main as predict_main

        return predict_main(rest)
    if command == "export":
        from kunlun.launch.export_cli import main as export_main

        return export_main(rest)
    print(f"kunlun: unknown command {command!r}\n{USAGE.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
