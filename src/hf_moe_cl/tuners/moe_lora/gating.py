"""Routing decisions: which task router a sample uses (`TaskRoute`) and which experts it picks (noisy top-k gating,
Shazeer et al., 2017, the router of MoE-Adapters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TaskRoute:
    """Which task router each sample uses: one task for the whole batch, or one per sample (-1: no adapter).

    `selections`, when given, collects every layer's chosen experts of the call (layer -> list of (batch, top_k)
    tensors), e.g. to see which experts a task's evaluation-time routing uses.
    """

    task: Optional[int] = None
    task_ids: Optional[torch.Tensor] = None
    active: Optional[torch.Tensor] = None  # indices of the samples whose task id is >= 0
    selections: Optional[dict] = field(default=None, compare=False)

    @classmethod
    def per_sample(cls, task_ids: torch.Tensor, selections: Optional[dict] = None) -> "TaskRoute":
        task_ids = task_ids.long().flatten()
        return cls(task_ids=task_ids, active=torch.nonzero(task_ids >= 0).flatten(), selections=selections)

    @property
    def routes_nothing(self) -> bool:
        if self.task_ids is None:
            return self.task is None
        return self.active.numel() == 0


NO_ROUTE = TaskRoute()


@dataclass
class Routing:
    """One routing decision per sample: the chosen experts and their mixing weights."""

    experts: torch.Tensor  # (batch, top_k) long
    weights: torch.Tensor  # (batch, top_k), softmax over the chosen logits
    balance_loss: Optional[torch.Tensor] = None


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def _project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (batch, dim) through one shared (dim, experts) matrix or one matrix per sample (batch, dim, experts)."""
    if weight.dim() == 2:
        return x @ weight
    return torch.bmm(x.unsqueeze(1), weight).squeeze(1)


def noisy_top_k(
    router_input: torch.Tensor,
    gate: torch.Tensor,
    noise: torch.Tensor,
    top_k: int,
    noisy: bool,
    noise_epsilon: float,
    with_balance_loss: bool = False,
) -> Routing:
    """Route each row of `router_input` (batch, dim) with gate/noise matrices shared (dim, experts) or per sample.

    Noise (learned, softplus standard deviation) is added only when `noisy`; the balance loss is the importance
    term plus the smooth load estimate of the sparsely-gated MoE paper, differentiable in both.
    """
    clean = _project(router_input, gate)
    num_experts = clean.shape[-1]
    if noisy:
        noise_std = F.softplus(_project(router_input, noise)) + noise_epsilon
        logits = clean + torch.randn_like(clean) * noise_std
    else:
        logits = clean
    top_values, top_indices = logits.topk(min(top_k + 1, num_experts), dim=-1)
    weights = torch.softmax(top_values[:, :top_k], dim=-1)
    experts = top_indices[:, :top_k]
    balance = None
    if with_balance_loss:
        dense = torch.zeros_like(logits).scatter(1, experts, weights)
        importance = dense.sum(0)
        if noisy and top_k < num_experts:
            normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
            threshold_if_in = top_values[:, top_k : top_k + 1]
            threshold_if_out = top_values[:, top_k - 1 : top_k]
            is_in = logits > threshold_if_in
            prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
            prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
            load = torch.where(is_in, prob_if_in, prob_if_out).sum(0)
        else:
            load = (dense > 0).sum(0).to(dense.dtype)
        balance = _cv_squared(importance) + _cv_squared(load)
    return Routing(experts=experts, weights=weights, balance_loss=balance)
