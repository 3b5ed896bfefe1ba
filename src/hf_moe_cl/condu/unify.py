"""ConDU's delta algebra (Gao et al.): unify task deltas into one delta plus task triggers (a sign mask per tensor
and one rescaler per task), decouple one task's delta back, and run a model as pretrained + delta.

The paper and the official code (zhangzicong518/ConDU, `src/delta_models.py::unify_delta_models`) differ in two
details, so both are rules here:
- "official" (the published numbers): the elected sign of an element is that of the mean of the task deltas, a
  mean of exactly 0 counting as negative; rescaler_i = sum_n mean|delta_i,n| / sum_n mean|mask_i,n * unified_n|,
  a sum over tensors n of per-tensor means;
- "paper": the elected sign is that of the sum (0 where it is 0, so no task keeps that element); rescaler_i =
  sum |delta_i| / sum |mask_i * unified| over all elements.
Either way task i's mask keeps the elements whose delta has the elected sign, and the unified delta is the largest
magnitude among those, with the elected sign.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

Delta = dict[str, torch.Tensor]
UNIFY_RULES = ("official", "paper")


def check_rule(rule: str) -> None:
    if rule not in UNIFY_RULES:
        raise ValueError(f"Unknown ConDU unify rule {rule!r}; use 'official' (the official code) or 'paper'.")


def _magnitude(tensors, rule: str) -> float:
    """Sum over tensors of the mean |value| (official) or of every |value| (paper)."""
    return sum(float(t.abs().mean() if rule == "official" else t.abs().sum()) for t in tensors)


def unify(deltas: list[Delta], rule: str = "official") -> tuple[Delta, list[Delta], list[float]]:
    """(unified delta, per-task boolean masks, per-task rescalers) of the task deltas under `rule`."""
    check_rule(rule)
    if not deltas:
        raise ValueError("Nothing to unify: give at least one task delta.")
    names = list(deltas[0])
    for delta in deltas[1:]:
        if list(delta) != names or any(delta[n].shape != deltas[0][n].shape for n in names):
            raise ValueError("Task deltas must cover the same tensors with the same shapes.")
    unified, masks = {}, [dict() for _ in deltas]
    for name in names:
        stacked = torch.stack([d[name].float() for d in deltas])
        sign = torch.where(stacked.mean(0) > 0, 1.0, -1.0) if rule == "official" else torch.sign(stacked.sum(0))
        agree = (stacked * sign) > 0
        unified[name] = sign * (stacked.abs() * agree).amax(0)
        for task, mask in enumerate(masks):
            mask[name] = agree[task]
    rescalers = []
    for delta, mask in zip(deltas, masks):
        kept = _magnitude((unified[n] * mask[n] for n in names), rule)
        rescalers.append(_magnitude((delta[n].float() for n in names), rule) / kept if kept > 0 else 0.0)
    return unified, masks, rescalers


def decouple(unified: Delta, mask: Delta, rescaler: float) -> Delta:
    """One task's delta rebuilt from the unified delta and its triggers: rescaler * mask * unified."""
    return {name: rescaler * mask[name] * value for name, value in unified.items()}


@contextmanager
def applied_delta(model, delta: Optional[Delta]):
    """Run `model` as pretrained + delta (tensors named as its parameters); the pretrained tensors are restored
    exactly afterwards."""
    saved = {}
    try:
        with torch.no_grad():
            for name, value in (delta or {}).items():
                param = model.get_parameter(name)
                saved[name] = param.detach().clone()
                param.add_(value.to(param.device, param.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model.get_parameter(name).copy_(value)
