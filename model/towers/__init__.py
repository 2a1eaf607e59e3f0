"""Dense towers behind one interface (:class:`DenseTower`); ``TOWERS`` maps ``model.tower`` names
(each name is also the ``ModelConfig`` field holding that tower's config)."""

from kunlun.model.ops.select import set_gdpa_impl
from kunlun.model.towers.base import DenseTower, EventSequence, TowerInputs  # noqa: F401
from kunlun.model.towers.dcnv2 import DCNv2Tower
from kunlun.model.towers.dlrm import DLRMTower
from kunlun.model.towers.hstu import HSTUTower
from kunlun.model.towers.interformer import InterFormerTower
from kunlun.model.towers.kunlun import KunlunTower
from kunlun.model.towers.multitask import MultiTaskTower, domain_count
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
    """The dense part for ``num_labels`` task outputs: ``model.tower`` itself (shared bottom,
    one output per task), or, with ``model.multitask.mixer`` mmoe/ple or a domain feature,
    the tower ending in a ``tower_out``-wide representation under a :class:`MultiTaskTower`."""
    if model_cfg.tower not in TOWERS:
        raise ValueError(f"model.tower = {model_cfg.tower!r}: expected one of {sorted(TOWERS)}")
    tower_cfg = getattr(model_cfg, model_cfg.tower)
    mt = model_cfg.multitask
    if mt.mixer == "shared" and not mt.domain_feature:
        tower = TOWERS[model_cfg.tower](schema, model_cfg.embedding_dim, num_labels, tower_cfg)
    else:
        body = TOWERS[model_cfg.tower](schema, model_cfg.embedding_dim, mt.tower_out, tower_cfg)
        tower = MultiTaskTower(body, num_labels, mt, num_domains=domain_count(schema, mt.domain_feature))
    set_gdpa_impl(tower, model_cfg.gdpa_impl)  # the kernel choice, once for every GDPA / jagged softmax module
    return tower
