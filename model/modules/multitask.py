"""Task mixing between a tower's representation and the task outputs: MMoE, PLE, and
domain-aware experts / gates / calibration (the Lattice line of work: one model for many
objectives and surfaces). Configured by ``model.multitask`` (:class:`MultiTaskConfig`).

Shapes: ``x [B, R]`` the tower's representation, ``domain [B]`` int64 domain ids in
``[0, num_domains)`` (the rows of the domain feature's table; 0 = missing), output
``[B, T]``: one value per task (a logit for binary tasks, the prediction for regression).

* MMoE (Ma et al., 2018): ``E`` expert MLPs on ``x``; task ``t`` mixes them with
  ``softmax(x W_t)`` and runs its own MLP to one output.
* PLE (Tang et al., 2020): ``levels`` extraction levels; each has ``S`` shared experts and
  ``K`` experts per task; task ``t``'s gate mixes its own and the shared experts, a shared
  gate (all experts) feeds the shared input of the next level.
* Domains: ``domain_experts`` experts of their own per domain join every gate's pool (their
  weights are gathered per example: an example pays for its domain's experts only), each
  gate gets a per-domain bias on its logits (per-domain expert selection), and each task's
  output a per-domain affine calibration ``y (1 + a[d, t]) + b[d, t]`` (zero-initialised).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kunlun.model.modules.mlp import mlp, mlp_flops


class DomainExperts(nn.Module):
    """``k`` MLP experts per domain: ``x [B, in]``, ``domain [B]`` → ``[B, k, sizes[-1]]``.

    Weights ``[num_domains * k, in, out]`` per layer, gathered by domain (a batched matmul),
    ReLU after every layer."""

    def __init__(self, num_domains: int, k: int, sizes: Sequence[int]):
        super().__init__()
        self.k, self.sizes = k, list(sizes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w = torch.empty(num_domains * k, fan_in, fan_out)
            for i in range(w.shape[0]):  # nn.Linear's init, per expert
                nn.init.kaiming_uniform_(w[i].T, a=5**0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_domains * k, fan_out)))

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        idx = (domain[:, None] * self.k + torch.arange(self.k, device=x.device)).reshape(-1)  # [B*k]
        h = x.repeat_interleave(self.k, dim=0)[:, None, :]  # [B*k, 1, in]
        for w, bias in zip(self.weights, self.biases):
            h = F.relu(torch.bmm(h, w[idx]) + bias[idx][:, None, :])
        return h.reshape(b, self.k, -1)

    def flops_per_example(self) -> int:
        return self.k * mlp_flops(self.sizes)


class Gate(nn.Module):
    """Softmax weights over ``n`` experts from ``x [B, R]`` (+ a per-domain bias): ``[B, n]``."""

    def __init__(self, in_dim: int, n: int, num_domains: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n)
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, n)) if num_domains else None

    def forward(self, x: torch.Tensor, domain: Optional[torch.Tensor]) -> torch.Tensor:
        logits = self.linear(x)
        if self.domain_bias is not None:
            logits = logits + self.domain_bias[domain]
        return torch.softmax(logits, dim=-1)

    def flops_per_example(self) -> int:
        return 2 * self.linear.in_features * self.linear.out_features


def _mix(gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``gate [B, n]``, ``experts [B, n, H]`` → ``[B, H]``."""
    return torch.bmm(gate[:, None, :], experts).squeeze(1)


class MultiTaskHead(nn.Module):
    """``x [B, R]`` (and ``domain [B]``) → ``[B, T]`` task outputs; see the module docstring.

    Args:
        in_dim: ``R``, the tower's representation width (``model.multitask.tower_out``).
        num_tasks: ``T``.
        cfg: ``MultiTaskConfig`` (mixer, expert counts and widths, domain options).
        num_domains: rows of the domain feature's table (0: no domain feature).
    """

    def __init__(self, in_dim: int, num_tasks: int, cfg, num_domains: int = 0):
        super().__init__()
        self.mixer, self.num_tasks, self.num_domains = cfg.mixer, num_tasks, num_domains
        hidden = cfg.expert_mlp[-1]
        self.hidden = hidden
        k_dom = cfg.domain_experts if num_domains else 0
        self.k_dom = k_dom
        levels = cfg.levels if cfg.mixer == "ple" else 1
        self.levels = nn.ModuleList()
        for level in range(levels):
            fan_in = in_dim if level == 0 else hidden
            last = level == levels - 1
            lvl = nn.Module()
            if cfg.mixer == "mmoe":
                lvl.shared = nn.ModuleList(mlp([fan_in, *cfg.expert_mlp]) for _ in range(cfg.num_experts))
                lvl.task = nn.ModuleList()
                n_task = 0
            else:  # ple
                lvl.shared = nn.ModuleList(mlp([fan_in, *cfg.expert_mlp]) for _ in range(cfg.shared_experts))
                lvl.task = nn.ModuleList(nn.ModuleList(mlp([fan_in, *cfg.expert_mlp]) for _ in range(cfg.task_experts)) for _ in range(num_tasks))
                n_task = cfg.task_experts
            lvl.domain = DomainExperts(num_domains, k_dom, [fan_in, *cfg.expert_mlp]) if k_dom else None
            pool = n_task + len(lvl.shared) + k_dom
            lvl.gates = nn.ModuleList(Gate(fan_in, pool, num_domains) for _ in range(num_tasks))
            # PLE's shared gate (all experts) feeds the next level's shared input.
            lvl.shared_gate = None if (last or cfg.mixer == "mmoe") else Gate(fan_in, num_tasks * n_task + len(lvl.shared) + k_dom, num_domains)
            self.levels.append(lvl)
        self.towers = nn.ModuleList(mlp([hidden, *cfg.task_mlp, 1], final_activation=False) for _ in range(num_tasks))
        self.calibration = nn.Parameter(torch.zeros(num_domains, num_tasks, 2)) if (num_domains and cfg.domain_calibration) else None
        self._sizes = {"in": in_dim, "expert": list(cfg.expert_mlp), "task": [hidden, *cfg.task_mlp, 1]}

    def forward(self, x: torch.Tensor, domain: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_domains and domain is None:
            raise ValueError("MultiTaskHead: built with domains, called without domain ids")
        task_in: List[torch.Tensor] = [x] * self.num_tasks
        shared_in = x
        for lvl in self.levels:
            shared = [e(shared_in) for e in lvl.shared]
            dom = list(lvl.domain(shared_in, domain).unbind(1)) if lvl.domain is not None else []
            own = [[e(task_in[t]) for e in lvl.task[t]] for t in range(self.num_tasks)] if len(lvl.task) else [[] for _ in range(self.num_tasks)]
            outs = []
            for t in range(self.num_tasks):
                pool = torch.stack(own[t] + shared + dom, dim=1)  # [B, n, H]
                outs.append(_mix(lvl.gates[t](task_in[t], domain), pool))
            if lvl.shared_gate is not None:
                pool = torch.stack([e for per in own for e in per] + shared + dom, dim=1)
                shared_in = _mix(lvl.shared_gate(shared_in, domain), pool)
            task_in = outs
        y = torch.cat([tower(h) for tower, h in zip(self.towers, task_in)], dim=1)  # [B, T]
        if self.calibration is not None:
            cal = self.calibration[domain]  # [B, T, 2]
            y = y * (1 + cal[..., 0]) + cal[..., 1]
        return y

    def flops_per_example(self) -> int:
        """Forward FLOPs per example (multiply-add = 2): experts, domain experts, gates and
        their mixing, task towers; calibration and softmax are not counted."""
        total = 0
        for level, lvl in enumerate(self.levels):
            fan_in = self._sizes["in"] if level == 0 else self.hidden
            expert = mlp_flops([fan_in, *self._sizes["expert"]])
            total += expert * (len(lvl.shared) + sum(len(per) for per in lvl.task))
            if lvl.domain is not None:
                total += lvl.domain.flops_per_example()
            gates = list(lvl.gates) + ([lvl.shared_gate] if lvl.shared_gate is not None else [])
            total += sum(g.flops_per_example() + 2 * g.linear.out_features * self.hidden for g in gates)
        return total + self.num_tasks * mlp_flops(self._sizes["task"])
