"""Embeddings, dense towers and the ``RecModel`` that ``kunlun.parallel`` shards.
Nothing here imports ``torch.distributed``."""

from kunlun.model.rec_model import RecModel  # noqa: F401
from kunlun.model.towers import TOWERS, DenseTower, TowerInputs, build_tower  # noqa: F401
