"""Dense towers behind one interface (:class:`DenseTower`); ``TOWERS`` maps ``model.tower`` names
(each name is also the ``ModelConfig`` field holding that tower's config)."""

from kunlun.model.ops.select import set_gdpa_impl
from kunlun.model.towers.base import DenseTower, EventSequence, TowerInputs  # noqa: F401
from kunlun.model.towers.dcnv2 import DCNv2Tower
from kunlun.model.towers.dlrm import DLRMTower
from kunlun.model.towers.hstu import HSTUTower
from kunlun.model.towers.interformer import InterFormerTower
from kunlun.model.towers.kunlun import KunlunTower
from kunlun.model.towers.wukong import WukongTower

TOWERS = {
    "dlrm": DLRMTower,
    "kunlun": KunlunTower,
    "dcnv2": DCNv2Tower,
    "wukong": WukongTower,
    "hstu": HSTUTower,
    "interformer": InterFormerTower,
}


def build_tower(schema, model_cfg, num_labels: int) -> DenseTower:
    if model_cfg.tower not in TOWERS:
        raise ValueError(f"model.tower = {model_cfg.tower!r}: expected one of {sorted(TOWERS)}")
    tower_cfg = getattr(model_cfg, model_cfg.tower)
    tower = TOWERS[model_cfg.tower](schema, model_cfg.embedding_dim, num_labels, tower_cfg)
    set_gdpa_impl(tower, model_cfg.gdpa_impl)  # the kernel choice, once for every GDPA module
    return tower
