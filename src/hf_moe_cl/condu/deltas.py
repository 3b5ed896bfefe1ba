"""ConDU (Gao et al.): continual decoupling-unifying of per-task delta models.

Each task's delta (fine-tuned minus pretrained, per tensor) is folded into one unified delta plus per-task task
triggers: a sign mask per tensor and one rescaler per task. Only the unified delta and the triggers are kept, so
memory does not grow by a full delta per task; masks are stored bit-packed (1 bit per element).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Optional

import torch

from ..files import check_safetensors_file

CONDU_CONFIG = "condu_config.json"
CONDU_WEIGHTS = "condu.safetensors"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)

Delta = dict[str, torch.Tensor]


@contextmanager
def applied_delta(model, delta: Optional[Delta]):
    """Run `model` as pretrained + delta; the pretrained tensors are restored exactly afterwards."""
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


def model_fingerprint(model) -> dict:
    """What a trigger file must match: the architecture and the shapes of the weights it changes."""
    config = model.config
    return {"model_type": config.model_type, "vision_width": config.vision_config.hidden_size,
            "text_width": config.text_config.hidden_size, "vision_layers": config.vision_config.num_hidden_layers,
            "text_layers": config.text_config.num_hidden_layers, "projection_dim": config.projection_dim}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 elements per byte (most significant bit first)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) > 0
    return bits.flatten()[:numel].view(shape)


def unify(deltas: list[Delta]) -> tuple[Delta, list[Delta], list[float]]:
    """Unify task deltas: (unified delta, per-task boolean masks, per-task rescalers).

    Per element, the sign of the summed deltas is elected; a task's mask keeps the elements whose delta has that
    sign; the unified delta is the largest magnitude among the agreeing deltas, with the elected sign. A task's
    rescaler is sum |delta_i| / sum |mask_i * unified| over all its tensors.
    """
    if not deltas:
        raise ValueError("Nothing to unify: give at least one task delta.")
    names = list(deltas[0])
    for delta in deltas[1:]:
        if list(delta) != names or any(delta[n].shape != deltas[0][n].shape for n in names):
            raise ValueError("Task deltas must cover the same tensors with the same shapes.")
    unified, masks = {}, [dict() for _ in deltas]
    for name in names:
        stacked = torch.stack([d[name].float() for d in deltas])
        sign = torch.sign(stacked.sum(0))
        agree = (stacked * sign) > 0
        unified[name] = sign * (stacked.abs() * agree).amax(0)
        for task, mask in enumerate(masks):
            mask[name] = agree[task]
    rescalers = []
    for delta, mask in zip(deltas, masks):
        magnitude = sum(float(delta[n].float().abs().sum()) for n in names)
        kept = sum(float((unified[n] * mask[n]).abs().sum()) for n in names)
        rescalers.append(magnitude / kept if kept > 0 else 0.0)
    return unified, masks, rescalers


def decouple(unified: Delta, mask: Delta, rescaler: float) -> Delta:
    """Rebuild one task's delta from the unified delta and its triggers: rescaler * mask * unified."""
    return {name: rescaler * mask[name] * value for name, value in unified.items()}


class DeltaStore:
    """The unified delta, each task's packed masks and rescaler, and per-task class prototypes."""

    def __init__(self, shapes: Optional[dict[str, torch.Size]] = None):
        self.shapes = dict(shapes or {})
        self.unified: Delta = {}
        self.packed_masks: list[Delta] = []
        self.rescalers: list[float] = []
        self.prototypes: list[dict[str, torch.Tensor]] = []  # per task: {"image": (C, D), "text": (C, D)}
        self.task_names: list[str] = []

    @property
    def num_tasks(self) -> int:
        return len(self.rescalers)

    def mask(self, task: int) -> Delta:
        return {n: unpack_mask(p, self.shapes[n]) for n, p in self.packed_masks[task].items()}

    def task_delta(self, task: int) -> Delta:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the store holds {self.num_tasks} tasks.")
        return decouple(self.unified, self.mask(task), self.rescalers[task])

    def add_task(self, delta: Delta, prototypes: Optional[dict[str, torch.Tensor]] = None,
                 name: Optional[str] = None) -> int:
        """Rebuild every earlier delta from its triggers, add the new one and unify all again."""
        delta = {n: v.detach().float().cpu() for n, v in delta.items()}
        if not self.shapes:
            self.shapes = {n: v.shape for n, v in delta.items()}
        elif {n: v.shape for n, v in delta.items()} != self.shapes:
            raise ValueError("The new task's delta covers other tensors or shapes than the stored ones.")
        deltas = [self.task_delta(t) for t in range(self.num_tasks)] + [delta]
        self.unified, masks, self.rescalers = unify(deltas)
        self.packed_masks = [{n: pack_mask(m) for n, m in mask.items()} for mask in masks]
        self.prototypes.append(prototypes or {})
        self.task_names.append(name or f"task{self.num_tasks - 1}")
        return self.num_tasks - 1

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of what is stored against a full float32 delta per task."""
        unified = sum(v.numel() * 4 for v in self.unified.values())
        masks = sum(p.numel() for task in self.packed_masks for p in task.values())
        full = sum(v.numel() * 4 for v in self.unified.values()) * self.num_tasks
        return {"unified": unified, "masks": masks, "stored": unified + masks, "full_deltas": full}

    # ----- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str, model_fingerprint: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {f"unified.{n}": v.contiguous() for n, v in self.unified.items()}
        for task, packed in enumerate(self.packed_masks):
            tensors.update({f"mask.{task}.{n}": p for n, p in packed.items()})
        for task, prototypes in enumerate(self.prototypes):
            tensors.update({f"prototype.{task}.{kind}": p.contiguous().cpu() for kind, p in prototypes.items()})
        save_file(tensors, os.path.join(folder, CONDU_WEIGHTS), metadata={"format": "pt"})
        config = {"num_tasks": self.num_tasks, "task_names": self.task_names, "rescalers": self.rescalers,
                  "model": model_fingerprint, "shapes": {n: list(s) for n, s in self.shapes.items()}}
        with open(os.path.join(folder, CONDU_CONFIG), "w") as handle:
            json.dump(config, handle, indent=1)

    @classmethod
    def from_pretrained(cls, folder: str, model_fingerprint: dict) -> "DeltaStore":
        """Load triggers saved for the same base model (same fingerprint), else a clear error."""
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(folder, CONDU_CONFIG), os.path.join(folder, CONDU_WEIGHTS)
        if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{folder} has no ConDU task triggers ({CONDU_CONFIG} + {CONDU_WEIGHTS}).")
        check_safetensors_file(weights_path)
        with open(config_path) as handle:
            config = json.load(handle)
        if config["model"] != model_fingerprint:
            raise ValueError(
                f"The ConDU task triggers in {folder} were made for another model ({config['model']}), not this one "
                f"({model_fingerprint}); load them on the base model they were trained from."
            )
        store = cls({n: torch.Size(s) for n, s in config["shapes"].items()})
        tensors = load_file(weights_path)
        store.unified = {n: tensors[f"unified.{n}"] for n in store.shapes}
        store.rescalers = list(config["rescalers"])
        store.task_names = list(config["task_names"])
        store.packed_masks = [{n: tensors[f"mask.{t}.{n}"] for n in store.shapes} for t in range(config["num_tasks"])]
        store.prototypes = [
            {kind: tensors[f"prototype.{t}.{kind}"] for kind in ("image", "text") if f"prototype.{t}.{kind}" in tensors}
            for t in range(config["num_tasks"])
        ]
        return store
