"""A preset's official training recipe as argument values, applied wherever the user did not set the argument.

The facts come from `hf_moe_cl.experiments.presets` (read from the official code); this module only says which
argument of `ContinualTrainingArguments`, `AdapterArguments`, `MoEAdaptersArguments`, `DDASArguments` or
`ConDUArguments` each fact sets. Arguments are rebuilt with the recipe's values, so their own checks run on them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Union

from ..continual import ContinualTrainingArguments
from ..continual.methods import ConDUArguments, DDASArguments, MoEAdaptersArguments
from .experiment import AdapterArguments
from .presets import ClassIncrementalPreset, MTILPreset, get_preset

logger = logging.getLogger("hf_moe_cl")

# The reference distribution of DDAS in the paper: Tiny ImageNet's training images (a parquet copy on the Hub).
TINY_IMAGENET = "zh-plus/tiny-imagenet"
# The official DDAS chooser training (MoE-Adapters4CL mtil/src/models/AutoEncoder.py, few_shot_AutoEncoder.py and
# scripts/train/train_{full,few}_shot_router11_experts22_1000iters.sh): Adam weight decay 1e-4 (lines 160 / 192),
# batch 64 (args.py --batch-size default; few-shot DataLoader(batch_size=64) line 189), --iterations 1000 for the
# reference (line 27 / 26) and 300 per task (line 43 / 44), each run as iterations + 1.
OFFICIAL_DDAS = {"weight_decay": 1e-4, "batch_size": 64, "reference_steps": 1000, "task_steps": 300}


def preset_recipe(preset: Union[str, MTILPreset, ClassIncrementalPreset]) -> dict[type, dict[str, Any]]:
    """Argument values by argument dataclass: what the official code runs for this preset."""
    preset = get_preset(preset)
    if isinstance(preset, ClassIncrementalPreset):
        return {
            ContinualTrainingArguments: dict(
                max_steps=-1, num_train_epochs=preset.epochs_per_step, per_device_train_batch_size=preset.batch_size,
                learning_rate=preset.learning_rate, label_smoothing_factor=preset.label_smoothing,
                warmup_steps=preset.warmup_steps, weight_decay=preset.weight_decay, evaluate_all_tasks=False,
                task_agnostic_eval=False, official_cil_eval=True),
            AdapterArguments: dict(num_experts=preset.num_experts, top_k=preset.top_k,
                                   noisy_gating_eval=preset.noisy_gating_eval),
            MoEAdaptersArguments: dict(shared_router=True, freeze_experts_per_task=0),
            DDASArguments: dict(ddas=False),
        }
    ddas, selector = dict(ddas=preset.ddas), {}
    if preset.ddas:  # the paper's selector: AlexNet features, a fixed threshold, the official training
        selector = dict(ddas_feature_extractor="alexnet", ddas_include_untrained=True)
        ddas.update(ddas_threshold=preset.ddas_threshold, ddas_training="official",
                    ddas_learning_rate=preset.ddas_learning_rate, ddas_weight_decay=OFFICIAL_DDAS["weight_decay"],
                    ddas_batch_size=OFFICIAL_DDAS["batch_size"], ddas_reference_steps=OFFICIAL_DDAS["reference_steps"],
                    ddas_task_steps=OFFICIAL_DDAS["task_steps"],
                    # shots 0 is full-shot, as the official `args.few_shot > 0` (main.py line 66) and `mtil_task`
                    ddas_reference_shots=preset.shots or None, ddas_augment_once=bool(preset.shots))
    elif preset.from_assets:  # CLIP features: the library's loop, the task autoencoders given the reference's budget
        ddas.update(ddas_training="sampled", ddas_task_steps=DDASArguments.ddas_reference_steps)
    return {
        AdapterArguments: selector,
        ContinualTrainingArguments: dict(
            max_steps=preset.steps_per_task, per_device_train_batch_size=preset.batch_size,
            label_smoothing_factor=preset.label_smoothing, warmup_steps=preset.warmup_steps,
            per_device_eval_batch_size=preset.eval_batch_size),
        DDASArguments: ddas,
        ConDUArguments: dict(condu_first_cell="pretrained"),  # ConDU evaluation.py lines 101 and 128
    }


def per_device_batch(global_batch: int, processes: int) -> int:
    """The official global batch split over `processes` (the official code keeps it across GPUs with DataParallel;
    `accelerate launch` multiplies the per-device batch by the number of processes)."""
    if global_batch % processes:
        raise ValueError(f"The preset's global batch {global_batch} does not divide over {processes} processes: "
                         f"launch a number of processes that divides it, or give --per_device_train_batch_size "
                         f"yourself (the global batch is then that times {processes}).")
    return global_batch // processes


def apply_recipe(preset, arguments: Iterable, explicit: set[str]) -> list:
    """`arguments` (parsed dataclasses) with the preset's recipe applied to every field not in `explicit` (the
    fields the user set); returns them in the same order. The training batch is the official global one, split
    over the processes (`per_device_batch`) unless the user set `per_device_train_batch_size`."""
    recipe = preset_recipe(preset)
    updated, applied, kept = [], {}, []
    for argument in arguments:
        ours = {n: v for kind, own in recipe.items() if isinstance(argument, kind) for n, v in own.items()}
        values = {name: value for name, value in ours.items() if name not in explicit}
        kept += sorted(set(ours) & explicit)
        if "per_device_train_batch_size" in values and isinstance(argument, ContinualTrainingArguments):
            values["per_device_train_batch_size"] = per_device_batch(values["per_device_train_batch_size"],
                                                                     argument.world_size)
        updated.append(dataclasses.replace(argument, **values) if values else argument)
        applied.update(values)
    if applied or kept:  # once, every value the preset set (the batch: per device)
        logger.info("Preset %s sets %s%s", get_preset(preset).name,
                    ", ".join(f"{name}={value}" for name, value in applied.items()) or "nothing",
                    f"; keeps your {', '.join(kept)}." if kept else ".")
    return updated
