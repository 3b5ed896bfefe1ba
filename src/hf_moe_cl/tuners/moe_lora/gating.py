"""Routing decisions: which task router a sample uses (`TaskRoute`) and which experts it picks (noisy top-k gating,
Shazeer et al., 2017, the router of MoE-Adapters)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class TaskRoute(NamedTuple):
    """Which task router each sample uses: one task for the whole batch, or one per sample (-1: no adapter).

    A plain tuple of a task, a tensor and a dict, so a compiled model traces it without a graph break. Samples
    whose id is -1 are computed with the others and get no expert output (their counts are not kept), so a mixed
    batch has static shapes. `selections`, when given, collects every layer's chosen experts of the call (layer
    -> list of (batch, top_k) tensors), e.g. to see which experts a task's evaluation-time routing uses.
    """

    task: Optional[int] = None
    task_ids: Optional[torch.Tensor] = None
    selections: Optional[dict] = None

    @classmethod
    def per_sample(cls, task_ids: torch.Tensor, selections: Optional[dict] = None) -> "TaskRoute":
        return cls(task_ids=task_ids.long().flatten(), selections=selections)

    @property
    def routes_nothing(self) -> bool:
        return self.task is None and self.task_ids is None


NO_ROUTE = TaskRoute()


class ExpertChoice(NamedTuple):
    """One routing decision per sample: the chosen experts and their mixing weights."""

    experts: torch.Tensor  # (batch, top_k) long
    weights: torch.Tensor  # (batch, top_k), softmax over the chosen logits
    balance_loss: Optional[torch.Tensor] = None


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


EXPERT_CHUNK = 32  # the experts a bank grew by are projected this many at a time


def _project(x: torch.Tensor, weight: torch.Tensor, first: Optional[int] = None) -> torch.Tensor:
    """x (batch, dim) through one shared (dim, experts) matrix or one matrix per sample (batch, dim, experts).

    A bank that grew beyond its `first` experts is projected in two products of fixed shapes: the first experts as
    before it grew, then every added expert in one batched product over pieces of `EXPERT_CHUNK` (at least two, the
    last padded with zero columns). A product's rounding depends on its shape, so each expert's logit stays bit for
    bit what it was before later experts were added, in two products whatever the bank's size.
    """
    experts = weight.shape[-1]
    shared = weight.dim() == 2
    if first is None or experts <= first:
        return x @ weight if shared else torch.bmm(x.unsqueeze(1), weight).squeeze(1)
    chunks = max(2, -(-(experts - first) // EXPERT_CHUNK))
    added = F.pad(weight[..., first:], (0, chunks * EXPERT_CHUNK - (experts - first)))
    if shared:  # (chunks, batch, dim) @ (chunks, dim, EXPERT_CHUNK)
        grown = torch.bmm(x.expand(chunks, *x.shape), added.view(-1, chunks, EXPERT_CHUNK).transpose(0, 1))
        grown = grown.transpose(0, 1).reshape(x.shape[0], -1)
        return torch.cat([x @ weight[:, :first], grown[:, :experts - first]], dim=-1)
    # per sample: (batch * chunks, 1, dim) @ (batch * chunks, dim, EXPERT_CHUNK)
    batch, dim = x.shape
    pieces = added.view(batch, dim, chunks, EXPERT_CHUNK).transpose(1, 2).reshape(batch * chunks, dim, EXPERT_CHUNK)
    grown = torch.bmm(x.repeat_interleave(chunks, 0).unsqueeze(1), pieces).view(batch, -1)
    return torch.cat([torch.bmm(x.unsqueeze(1), weight[..., :first]).squeeze(1), grown[:, :experts - first]], dim=-1)


def noisy_top_k(router_input: torch.Tensor, gate: torch.Tensor, noise: torch.Tensor, top_k: int, noisy: bool,
                noise_epsilon: float, with_balance_loss: bool = False, keep: Optional[torch.Tensor] = None,
                hidden: Optional[torch.Tensor] = None, first_experts: Optional[int] = None) -> ExpertChoice:
    """Route each row of `router_input` (batch, dim) with gate/noise matrices shared (dim, experts) or per sample.

    Noise (learned, softplus standard deviation) is added only when `noisy`; the balance loss is the importance
    term plus the smooth load estimate of the sparsely-gated MoE paper, differentiable in both, over the rows of
    `keep` (a bool mask; None: every row). `hidden` (bool, (experts,) or (batch, experts)) marks experts a row may
    not select: their logits are -inf. `first_experts` (the size of a bank before it grew) projects per-sample
    routers so that adding experts leaves the earlier experts' logits bit for bit as they were (see `_project`); a
    batch of one task is given only the experts its router may select, in one product (`MoELoraLayer`).
    """
    clean = _project(router_input, gate, first_experts)
    if hidden is not None:
        clean = clean.masked_fill(hidden, float("-inf"))
    num_experts = clean.shape[-1]
    logits = clean
    if noisy:
        noise_std = F.softplus(_project(router_input, noise, first_experts)) + noise_epsilon
        logits = clean + torch.randn_like(clean) * noise_std
    top_values, top_indices = logits.topk(min(top_k + 1, num_experts), dim=-1)
    weights = torch.softmax(top_values[:, :top_k], dim=-1)
    experts = top_indices[:, :top_k]
    balance = None
    if with_balance_loss:
        dense = torch.zeros_like(logits).scatter(1, experts, weights)
        if keep is not None:
            dense = dense * keep.unsqueeze(-1).to(dense.dtype)
        importance = dense.sum(0)
        if noisy and top_k < num_experts:
            normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
            threshold_if_in = top_values[:, top_k : top_k + 1]
            threshold_if_out = top_values[:, top_k - 1 : top_k]
            is_in = logits > threshold_if_in
            prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
            prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
            load = torch.where(is_in, prob_if_in, prob_if_out)
            load = (load if keep is None else load * keep.unsqueeze(-1).to(load.dtype)).sum(0)
        else:
            load = (dense > 0).sum(0).to(dense.dtype)
        balance = _cv_squared(importance) + _cv_squared(load)
    return ExpertChoice(experts=experts, weights=weights, balance_loss=balance)
