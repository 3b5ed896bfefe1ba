"""`DeltaStore`: what ConDU keeps between tasks instead of one delta per task.

The unified delta, each task's triggers (a sign mask per tensor, stored bit-packed, and one rescaler), each task's
class prototypes and what the task is (name, class names, prompt templates). Deltas may be measured from an
`origin` the store carries (the pretrained model's LoRA factors); the store then holds origin + unified delta,
which is what its files hold, so a store read back from disk computes exactly what the one in memory did.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .unify import Delta, check_rule, decouple, unify

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 elements per byte (most significant bit first)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) > 0
    return bits.flatten()[:math.prod(shape)].view(shape)


class DeltaStore:
    """Unified delta + task triggers under unify rule `rule`; deltas are over the tensors of `shapes`."""

    def __init__(self, rule: str = "official", shapes: Optional[dict[str, torch.Size]] = None,
                 origin: Optional[Delta] = None):
        check_rule(rule)
        self.rule = rule
        self.origin: Delta = dict(origin or {})
        self.shapes = dict(shapes or {n: v.shape for n, v in self.origin.items()})
        self.unified_tensors: Delta = {}  # origin + unified delta (the unified delta where there is no origin)
        self.packed_masks: list[Delta] = []
        self.rescalers: list[float] = []
        self.prototypes: list[dict[str, torch.Tensor]] = []  # per task: {"image_mean", "text_mean"}, (classes, dim)
        self.tasks: list[dict] = []  # per task: {"name", "classnames", "templates"}

    @property
    def num_tasks(self) -> int:
        return len(self.rescalers)

    @property
    def unified(self) -> Delta:
        return {n: v - self.origin[n] if n in self.origin else v for n, v in self.unified_tensors.items()}

    def mask(self, task: int) -> Delta:
        return {n: unpack_mask(p, self.shapes[n]) for n, p in self.packed_masks[task].items()}

    def task_delta(self, task: int) -> Delta:
        """Task `task`'s delta rebuilt from the unified delta and its triggers."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the store holds {self.num_tasks} tasks.")
        return decouple(self.unified, self.mask(task), self.rescalers[task])

    def add_task(self, delta: Delta, prototypes: Optional[dict[str, torch.Tensor]] = None,
                 info: Optional[dict] = None) -> int:
        """Rebuild every earlier delta from its triggers, add the new one and unify all again; the new task's id."""
        delta = {n: v.detach().float().cpu() for n, v in delta.items()}
        shapes = {n: v.shape for n, v in delta.items()}
        if not self.shapes:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError("The new task's delta covers other tensors or shapes than the stored ones.")
        deltas = [self.task_delta(t) for t in range(self.num_tasks)] + [delta]
        unified, masks, self.rescalers = unify(deltas, self.rule)
        self.unified_tensors = {n: self.origin[n] + v if n in self.origin else v for n, v in unified.items()}
        self.packed_masks = [{n: pack_mask(m) for n, m in mask.items()} for mask in masks]
        self.prototypes.append(dict(prototypes or {}))
        self.tasks.append(dict(info or {"name": f"task{self.num_tasks - 1}"}))
        return self.num_tasks - 1

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of what is stored (float32 unified tensors and origin, 1-bit masks, prototypes) against one float32
        delta per task."""
        elements = sum(s.numel() for s in self.shapes.values())
        sizes = {"unified": 4 * elements,
                 "origin": sum(4 * v.numel() for v in self.origin.values()),
                 "masks": sum(p.numel() for task in self.packed_masks for p in task.values()),
                 "prototypes": sum(4 * p.numel() for task in self.prototypes for p in task.values())}
        sizes["stored"] = sum(sizes.values())
        sizes["one_delta_per_task"] = 4 * elements * self.num_tasks
        return sizes
