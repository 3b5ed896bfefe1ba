"""How a MoE-LoRA model uses its experts, measured the way evaluation routes: which experts a task's router chooses
for its images and prompts, how much of that falls on experts later tasks can still change, and how many expert
slots are left to train."""

from __future__ import annotations

from typing import Optional

import torch

from ...classification import text_embeddings
from ...data.splits import seeded_rows
from ...tuners.moe_lora.model import find_moe, tower_of


@torch.no_grad()
def evaluation_selections(model, context, route: int, task, max_images: Optional[int] = None
                          ) -> dict[str, torch.Tensor]:
    """Per layer, how often each expert is chosen when `route` classifies `task`'s training images (a seeded
    sample of `max_images`, or all) and encodes its prompts, as at evaluation: no noise, no augmentation. An
    evaluation-only task (no training split, max_steps=0) is measured on its prompts alone."""
    dataset = task.train_dataset
    if dataset is not None and max_images is not None and len(dataset) > max_images:
        dataset = dataset.select(seeded_rows(len(dataset), max_images, context.seed))
    selections: dict = {}
    model.eval()
    moe = find_moe(model)
    with moe.routing(route, selections=selections):
        images = context.loader(dataset) if dataset is not None else []
        for batch in context.progress(images, f"routing of {task.name}"):
            model.get_image_features(pixel_values=batch["pixel_values"].to(context.device))
        text_embeddings(model, context.tokenizer, task.classnames, task.templates, context.device)
    return moe.selection_histogram(selections)


def routing_report(model, context, route: int, task, images: int) -> dict:
    """Shares of `task`'s evaluation-time selections on experts that are still trainable (later tasks can move
    them) and on experts it did not freeze itself, per tower and per layer."""
    moe = find_moe(model)
    used = evaluation_selections(model, context, route, task, images)
    frozen_by = {name: layer.moe_lora_frozen_by[moe._adapter()].cpu()
                 for name, layer in moe.moe_layers().items()}
    report = {"layers": {}}
    for tower in ("vision", "text"):
        total = trainable = foreign = 0
        for name, counts in used.items():
            if tower_of(name) != tower:
                continue
            layer_total = int(counts.sum())
            layer_trainable = int(counts[frozen_by[name] < 0].sum())
            layer_foreign = int(counts[frozen_by[name] != route].sum())
            report["layers"][name] = {"trainable": layer_trainable / layer_total,
                                      "not_own": layer_foreign / layer_total}
            total, trainable, foreign = total + layer_total, trainable + layer_trainable, foreign + layer_foreign
        if total:
            report[tower] = {"trainable": trainable / total, "not_own": foreign / total}
    return report


def trainable_share(moe) -> dict[str, float]:
    """Per tower, the share of expert slots (layers x experts) no task has frozen: what later tasks can still
    train, the price of a freeze policy."""
    flags: dict[str, list] = {}
    for name, layer in moe.moe_layers().items():
        flags.setdefault(tower_of(name), []).append(layer.moe_lora_frozen_by[moe._adapter()] < 0)
    return {tower: float(torch.cat(values).float().mean()) for tower, values in flags.items()}


def slots_by_tower(moe) -> dict[str, dict[str, int]]:
    """Per tower, the expert slots (layers x experts) and those frozen by no task."""
    slots: dict[str, dict[str, int]] = {}
    for name, layer_slots in moe.expert_slots().items():
        tower = slots.setdefault(tower_of(name), {"total": 0, "trainable": 0})
        tower["total"] += layer_slots["total"]
        tower["trainable"] += layer_slots["trainable"]
    return slots
