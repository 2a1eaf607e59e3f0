"""Embeddings, dense towers, operators and the ``RecModel`` that ``kunlun.parallel`` shards.
Nothing here imports ``torch.distributed``.

Imports are lazy so that ``kunlun.model.ops`` (pure torch + triton) loads on machines
without TorchRec, e.g. a GPU box used only for kernel work.
"""

from typing import Any

__all__ = ["RecModel", "TOWERS", "DenseTower", "TowerInputs", "build_tower"]


def __getattr__(name: str) -> Any:
    if name == "RecModel":
        from kunlun.model.rec_model import RecModel

        return RecModel
    if name in ("TOWERS", "DenseTower", "TowerInputs", "build_tower"):
        from kunlun.model import towers

        return getattr(towers, name)
    raise AttributeError(f"module 'kunlun.model' has no attribute {name!r}")
