"""Multi-task modelling (issue #14): task resolution, the masked and weighted loss, regression
heads, MMoE / PLE / domain-aware heads (shapes, gradients, FLOPs against the counter), and
the single binary task behaving exactly as before tasks existed.

Data: the tiny synthetic job, with the synthetic multi-task, multi-domain signal where needed
(``data.synthetic.multitask``: tasks click, like and the regression task watch, 3 domains).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kunlun.common import ConfigError
from kunlun.data.batch import collate
from kunlun.data.sources import build_source
from kunlun.model.config import MultiTaskConfig
from kunlun.model.modules.multitask import MultiTaskHead
from kunlun.model.rec_model import RecModel
from kunlun.model.tasks import TaskSpec, multitask_loss
from kunlun.trainer.config import load_config
from kunlun.trainer.metrics import EvalAccumulator, task_metrics

MT_DATA = ["data.synthetic.multitask.tasks=[click,like,watch]", "data.synthetic.multitask.regression=[watch]", "data.synthetic.multitask.missing_rate=0.3"]
MT_TASKS = "model.tasks=[{name: click, type: binary}, {name: like, type: binary, weight: 0.5}, {name: watch, type: regression, loss: huber}]"


def tasks(*types: str, weights=None):
    return [TaskSpec(f"t{i}", f"t{i}", i, kind, 1.0 if weights is None else weights[i]) for i, kind in enumerate(types)]


# ------------------------------------------------------------------ loss
def test_missing_labels_add_nothing_and_task_weights_scale_each_task():
    torch.manual_seed(0)
    x = torch.randn(64, 3, requires_grad=True)
    y = torch.stack([(torch.rand(64) < 0.4).float(), (torch.rand(64) < 0.3).float(), torch.randn(64)], dim=1)
    w = torch.rand(64) + 0.5
    specs = tasks("binary", "binary", "regression", weights=[1.0, 0.5, 2.0])
    # by hand: each task's example-weighted mean, times its weight
    by_hand = (
        (F.binary_cross_entropy_with_logits(x[:, 0], y[:, 0], reduction="none") * w).sum() / w.sum()
        + 0.5 * (F.binary_cross_entropy_with_logits(x[:, 1], y[:, 1], reduction="none") * w).sum() / w.sum()
        + 2.0 * (((x[:, 2] - y[:, 2]) ** 2) * w).sum() / w.sum()
    )
    assert torch.allclose(multitask_loss(x, y, w, specs), by_hand, rtol=1e-6)
    # task 1 missing on every example of the batch: no loss, no gradient through its output
    y_missing = y.clone()
    y_missing[:, 1] = float("nan")
    loss = multitask_loss(x, y_missing, w, specs)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, by_hand - 0.5 * (F.binary_cross_entropy_with_logits(x[:, 1], y[:, 1], reduction="none") * w).sum() / w.sum(), rtol=1e-6)
    loss.backward()
    assert torch.all(x.grad[:, 1] == 0) and torch.all(x.grad[:, 0] != 0)
    # half the labels of task 0 missing: the mean over the present ones
    y_half = y.clone()
    y_half[::2, 0] = float("nan")
    keep = torch.arange(64) % 2 == 1
    one = multitask_loss(x[:, :1], y_half[:, :1], w, specs[:1])
    assert torch.allclose(one, (F.binary_cross_entropy_with_logits(x[keep, 0], y[keep, 0], reduction="none") * w[keep]).sum() / w[keep].sum(), rtol=1e-6)


def test_huber_regression_loss():
    x, y, w = torch.tensor([[0.0], [3.0]]), torch.tensor([[0.5], [0.0]]), torch.ones(2)
    spec = [TaskSpec("r", "r", 0, "regression", 1.0, "huber", 1.0)]
    # 0.5·0.5² = 0.125 (quadratic zone) and 1·(3 − 0.5) = 2.5 (linear zone): mean 1.3125
    assert float(multitask_loss(x, y, w, spec)) == pytest.approx(1.3125)
    assert float(multitask_loss(x, y, w, [TaskSpec("r", "r", 0, "regression", 1.0)])) == pytest.approx((0.25 + 9) / 2)


def test_metrics_skip_missing_labels_and_report_per_task_and_domain():
    torch.manual_seed(1)
    n = 400
    x = torch.randn(n, 2)
    y = torch.stack([(torch.rand(n) < 0.5).float(), torch.randn(n)], dim=1)
    dom = torch.randint(1, 3, (n,))
    specs = [TaskSpec("click", "click", 0, "binary", 1.0), TaskSpec("watch", "watch", 1, "regression", 1.0)]
    ref = EvalAccumulator(specs)
    ref.update(x[:200], y[:200], torch.ones(200), dom[:200])
    acc = EvalAccumulator(specs)
    acc.update(x[:200], y[:200], torch.ones(200), dom[:200])
    y2 = y[200:].clone()
    y2[:, 0] = float("nan")  # a batch where click is missing everywhere: no metric update for click
    acc.update(x[200:], y2, torch.ones(200), dom[200:])
    got, want = acc.compute(), ref.compute()
    for k in ("click/auc", "click/ne", "click/logloss", "click/1/auc", "click/2/ne"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["watch/mse"] != want["watch/mse"]  # watch is present in the second batch and counts
    assert got["watch/mse"] == pytest.approx(float(((x[:, 1] - y[:, 1]) ** 2).mean()), rel=1e-6)
    assert got["watch/1/mae"] == pytest.approx(float((x[dom == 1, 1] - y[dom == 1, 1]).abs().mean()), rel=1e-6)
    assert got["auc"] == got["click/auc"] and "mse" not in got  # plain names: mean over binary tasks
    assert task_metrics(x[:, 0], torch.full((n,), float("nan")), torch.ones(n), "binary")["examples"] == 0


# ------------------------------------------------------------------ config and model
@pytest.fixture(scope="module")
def mt_source():
    cfg = load_config("tiny", MT_DATA)
    return build_source(cfg.data, 0)


def test_task_config_errors_name_the_key(mt_source):
    with pytest.raises(ConfigError, match=r"model.tasks\[0\].type' = 'bogus'"):
        load_config("tiny", ["model.tasks=[{name: a, type: bogus}]"])
    with pytest.raises(ConfigError, match=r"model.tasks' = \['a', 'a'\] is invalid: expected distinct task names"):
        load_config("tiny", ["model.tasks=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match=r"model.tasks\[1\].label' = 'nope' is invalid: expected one of the data's labels \['click', 'like', 'watch'\]"):
        RecModel(mt_source.schema, load_config("tiny", [*MT_DATA, "model.tasks=[{name: click}, {name: x, label: nope}]"]).model)
    with pytest.raises(ConfigError, match=r"model.tasks\[0\].type' = 'binary' is invalid: label 'watch' is a regression label"):
        RecModel(mt_source.schema, load_config("tiny", [*MT_DATA, "model.tasks=[{name: watch}]"]).model)
    with pytest.raises(ConfigError, match=r"domain_feature' = 'user' is invalid|domain_feature' = 'nope' is invalid"):
        RecModel(mt_source.schema, load_config("tiny", [*MT_DATA, "model.multitask.domain_feature=nope"]).model)


def test_one_binary_task_is_exactly_the_model_without_tasks():
    cfg = load_config("tiny")
    src = build_source(cfg.data, 0)
    batch = collate(src.read("train", np.arange(64)), src.schema)
    outs = []
    for extra in ([], ["model.tasks=[{name: label, type: binary}]"]):
        torch.manual_seed(0)
        model = RecModel(src.schema, load_config("tiny", extra).model, embedding_device=torch.device("cpu"))
        loss, out = model(batch)
        loss.backward()
        outs.append((loss.detach(), out.logits, [p.grad.clone() for p in model.tower.parameters()]))
    (l0, x0, g0), (l1, x1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(x0, x1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    # and it is the loss of before tasks existed: the example-weighted mean BCE
    before = (F.binary_cross_entropy_with_logits(x0, batch.labels, reduction="none").mean(1) * batch.weights).sum() / batch.weights.sum()
    assert torch.equal(l0, before)


@pytest.mark.parametrize("mixer,domain", [("mmoe", False), ("ple", False), ("mmoe", True), ("ple", True), ("shared", True)])
def test_mixers_forward_backward_and_every_parameter_learns(mt_source, mixer, domain):
    overrides = [*MT_DATA, MT_TASKS, f"model.multitask.mixer={mixer}", "model.multitask.levels=2"]
    if domain:
        overrides.append("model.multitask.domain_feature=domain")
    torch.manual_seed(0)
    model = RecModel(mt_source.schema, load_config("tiny", overrides).model, embedding_device=torch.device("cpu"))
    batch = collate(mt_source.read("train", np.arange(128)), mt_source.schema)
    assert torch.isnan(batch.labels).any(), "missing_rate 0.3 must leave NaN labels"
    loss, out = model(batch)
    assert out.logits.shape == (128, 3) and torch.isfinite(loss)
    assert (out.domain is not None) == domain
    if domain:
        assert set(out.domain.tolist()) <= {1, 2, 3} and len(set(out.domain.tolist())) == 3
    loss.backward()
    head = model.tower.head
    # calibration starts at zero; its gradient must still reach it
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{mixer}: no gradient for {missing}"


@pytest.mark.parametrize("mixer,levels,domains", [("mmoe", 1, 0), ("ple", 1, 0), ("ple", 2, 4), ("mmoe", 1, 4)])
def test_head_flops_match_the_counter(mixer, levels, domains):
    cfg = MultiTaskConfig(mixer=mixer, levels=levels, num_experts=3, shared_experts=2, task_experts=2, expert_mlp=[32, 24], task_mlp=[16], domain_experts=2)
    head = MultiTaskHead(40, 3, cfg, num_domains=domains)
    b = 16
    x, dom = torch.randn(b, 40), torch.randint(0, max(domains, 1), (b,))
    with FlopCounterMode(display=False) as counter:
        head(x, dom if domains else None)
    assert counter.get_total_flops() == b * head.flops_per_example()


def test_multitask_tower_flops_include_the_head(mt_source):
    model = RecModel(mt_source.schema, load_config("tiny", [*MT_DATA, MT_TASKS, "model.multitask.mixer=mmoe"]).model)
    lens = {e.name: 5.0 for e in mt_source.schema.event_types}
    tower = model.tower
    assert tower.flops_per_example(lens) == tower.body.flops_per_example(lens) + tower.head.flops_per_example() > tower.body.flops_per_example(lens)
