"""TorchX components for kunlun jobs.

    torchx run -s local_cwd ./launch/components.py:train -j 1x2 --config movielens trainer.max_steps=100
    torchx run -s slurm      ./launch/components.py:train -j 4x8 --gpu 8 --config movielens
    torchx run -s kubernetes -cfg queue=default ./launch/components.py:train -j 2x8 --gpu 8 --image <img>

The ``train`` component wraps ``torchx.components.dist.ddp`` (torchrun with a c10d rendezvous on
rank 0's host, one role replica per node) and runs ``python -m kunlun.launch.main`` on
every rank with the preset and the ``key=value`` overrides. ``eval`` does the same for
``python -m kunlun.launch.eval_cli`` (``kunlun eval``: score a run's checkpoint)::

    torchx run -s local_cwd ./launch/components.py:eval -j 1x2 --run_dir runs/x --checkpoint best

``predict`` runs ``python -m kunlun.launch.predict_cli`` (``kunlun predict``: Parquet scores of
every example of a split, or of ``--input`` files)::

    torchx run -s local_cwd ./launch/components.py:predict -j 1x2 --run_dir runs/x --output runs/x/scores

(No ``from __future__ import annotations`` here: TorchX reads the real annotation types.)
"""

from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist

DEFAULT_IMAGE = "ghcr.io/pytorch/torchx:0.7.0"


def _torchrun_app(module: str, args: List[str], resources: Dict) -> specs.AppDef:
    """``dist.ddp`` running ``python -m module args`` on every rank (c10d rendezvous);
    ``resources``: the components' shared keyword arguments (image ... mounts)."""
    env = dict(resources.pop("env") or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    mounts = resources.pop("mounts")
    return dist.ddp(*args, m=module, env=env, rdzv_backend="c10d", mounts=mounts.split(",") if mounts else None, **resources)


def train(
    *overrides: str,
    config: str = "movielens",
    j: str = "1x2",
    max_restarts: int = 0,
    max_retries: int = 0,
    image: str = DEFAULT_IMAGE,
    name: str = "kunlun",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[str] = None,
) -> specs.AppDef:
    """Train a kunlun model with torchrun on nnodes x nproc_per_node processes.

    Args:
        overrides: config overrides as key=value (e.g. trainer.max_steps=100 run_dir=runs/x)
        config: config preset name in configs/ (tiny, movielens, ...) or a YAML path
        j: {nnodes}x{nproc_per_node}, e.g. 1x2; on GPU hosts nproc_per_node <= GPUs per host
        max_restarts: torchrun restarts of the whole worker group after a rank fails
        max_retries: scheduler-level retries of the whole job (slurm requeue, k8s restart)
        image: container image (kubernetes, docker); ignored by local_cwd and slurm
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named resource (overrides cpu, gpu, memMB)
        env: extra environment variables, e.g. KUNLUN_CACHE=/data/cache
        rdzv_port: port of the c10d rendezvous on the first node
        mounts: volume mounts (scheduler syntax), comma separated type=bind,src=...,dst=...
    """
    app = _torchrun_app(
        "kunlun.launch.main",
        ["--config", config, *overrides],
        dict(image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts),
    )
    if max_restarts:
        # dist.ddp has no torchrun --max_restarts knob; add it to the torchrun command line.
        role = app.roles[0]
        cmd = role.args[-1]
        assert cmd.startswith("torchrun "), cmd
        role.args[-1] = cmd.replace("torchrun ", f"torchrun --max_restarts {int(max_restarts)} ", 1)
    return app


def eval(
    *overrides: str,
    run_dir: str,
    checkpoint: str = "latest",
    split: str = "test",
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "kunlun-eval",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[str] = None,
) -> specs.AppDef:
    """Evaluate a checkpoint of a run (``kunlun eval``) with torchrun on nnodes x nproc_per_node
    processes; the checkpoint is resharded to that world size.

    Args:
        overrides: config overrides on top of the run's config.yaml, as key=value
            (e.g. parallel.sparse.strategy=1d data.files.test=/new/test.parquet)
        run_dir: the run folder (holds config.yaml and checkpoints/)
        checkpoint: latest | best | a checkpoint folder | a folder name or step in run_dir/checkpoints
        split: test | eval (the validation split; valid is accepted too)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2; on GPU hosts nproc_per_node <= GPUs per host
        image: container image (kubernetes, docker); ignored by local_cwd and slurm
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named resource (overrides cpu, gpu, memMB)
        env: extra environment variables, e.g. KUNLUN_CACHE=/data/cache
        rdzv_port: port of the c10d rendezvous on the first node
        mounts: volume mounts (scheduler syntax), comma separated type=bind,src=...,dst=...
    """
    return _torchrun_app(
        "kunlun.launch.eval_cli",
        ["--run-dir", run_dir, "--checkpoint", checkpoint, "--split", split, *overrides],
        dict(image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port, mounts=mounts),
    )


def predict(
    *overrides: str,
    run_dir: str,
    output: str,
    checkpoint: str = "latest",
    split: Optional[str] = None,
    input: Optional[str] = None,
    columns: Optional[str] = None,
    rows_per_part: int = 1_000_000,
    overwrite: bool = False,
    resume: bool = False,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "kunlun-predict",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[str] = None,
) -> specs.AppDef:
    """Score every example of a split, or of given files, with a checkpoint of a run (``kunlun
    predict``) into Parquet parts, with torchrun on nnodes x nproc_per_node processes; the
    checkpoint is resharded to that world size.

    Args:
        overrides: config overrides on top of the run's config.yaml, as key=value
            (e.g. parallel.sparse.strategy=1d data.files.test=/new/test.parquet)
        run_dir: the run folder (holds config.yaml and checkpoints/)
        output: folder for the parts, _PREDICT.json and _SUCCESS.json (shared by all nodes)
        checkpoint: latest | best | a checkpoint folder | a folder name or step in run_dir/checkpoints
        split: test (the default) | eval (the validation split); not with input
        input: Parquet/CSV files in the run's data schema to score instead of a split (file, directory or glob)
        columns: comma-separated raw columns of the input rows copied into the parts (file sources)
        rows_per_part: rows per Parquet part (rounded up to whole batches)
        overwrite: replace the parts of an earlier kunlun predict in output
        resume: finish an interrupted kunlun predict of the same request in output
        j: {nnodes}x{nproc_per_node}, e.g. 1x2; on GPU hosts nproc_per_node <= GPUs per host
        image: container image (kubernetes, docker); ignored by local_cwd and slurm
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a named resource (overrides cpu, gpu, memMB)
        env: extra environment variables, e.g. KUNLUN_CACHE=/data/cache
        rdzv_port: port of the c10d rendezvous on the first node
        mounts: volume mounts (scheduler syntax), comma separated type=bind,src=...,dst=...
    """
    args = ["--run-dir", run_dir, "--output", output, "--checkpoint", checkpoint, "--rows-per-part", str(int(rows_per_part)), "--no-progress"]
    args += ["--split", split] if split else []
    args += ["--input", input] if input else []
    args += ["--columns", columns] if columns else []
    args += ["--overwrite"] if overwrite else []
    args += ["--resume"] if resume else []
    return _torchrun_app(
        "kunlun.launch.predict_cli",
        [*args, *overrides],
        dict(image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port, mounts=mounts),
    )
