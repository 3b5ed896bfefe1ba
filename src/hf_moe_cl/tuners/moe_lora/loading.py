"""What a MoE-LoRA adapter must satisfy to be injected into a model or loaded into it: each check names the file a
bad value came from and what to do. `MoELoraModel` calls them at peft's two entry points (`inject_adapter`,
`_remap_adapter_state_dict_for_load`)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ...ddas.settings import EDITED, SELECTOR_KEY
from .bank import EXPERT_PARAMS, ROUTER_PARAMS
from .base_weights import base_weights_record, check_base
from .config import MoELoraConfig
from .peft_type import MOE_LORA_PREFIX

logger = logging.getLogger("hf_moe_cl")


def check_injection(model: nn.Module, config: MoELoraConfig, adapter_name: str, model_types) -> None:
    """Before anything is injected: peft's task types (which wrap language models), and the base weights the adapter
    was created on. A new adapter's config records them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.task_type is not None and model_type in model_types:
        raise ValueError(f"`task_type` of adapter {adapter_name!r} is {str(config.task_type)!r}, but peft's task "
                         f"types wrap language models, not a {model_type!r} model (its forward would fail): leave "
                         f"task_type None. {EDITED}.")
    if config.base_weights is None:  # a new adapter (or one saved before the record existed)
        config.base_weights = base_weights_record(model)
        return
    base = config.base_model_name_or_path
    check_base(config.base_weights, model, f"adapter {adapter_name!r}",
               "Load the base model it was trained on" + (f" ({base!r}, at the revision it was trained with)"
                                                          if base else "")
               + "; to load it on this one on purpose, set `base_weights=None` in its config "
               "(config = PeftConfig.from_pretrained(path); config.base_weights = None; "
               "PeftModel.from_pretrained(model, path, config=config)).")


def check_grown_modules(config: MoELoraConfig, adapter_name: str, adapted: set) -> None:
    """After injection: every module `experts_per_module` names is adapted in this model."""
    unknown = sorted(set(config.experts_per_module) - adapted)
    if unknown:
        raise ValueError(f"`experts_per_module` of adapter {adapter_name!r} names modules the adapter does not "
                         f"adapt in this model: {unknown[:3]}. {EDITED}, or the adapter belongs to another base model.")


def check_loaded_state(expected: dict, config: MoELoraConfig, adapter_name: str, remapped: dict) -> None:
    """A checkpoint (remapped to this model's keys) that does not fit `expected` (the model's state dict) is refused
    instead of loading part of it, and so is one holding values no adapter can have."""
    base = f" ({config.base_model_name_or_path!r})" if config.base_model_name_or_path else ""
    fix = f"Load it on the base model it was trained on{base} with the adapter_config.json saved beside it."
    for key, value in remapped.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(f"The MoE-LoRA checkpoint does not match this model: {key!r} has shape "
                             f"{tuple(value.shape)} in the checkpoint but {tuple(expected[key].shape)} here. {fix}")
    own = {key for key in expected if f".{adapter_name}" in key and MOE_LORA_PREFIX in key}
    missing, unexpected = sorted(own - set(remapped)), sorted(set(remapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"The MoE-LoRA checkpoint does not match this model: {len(missing)} adapter tensors of the "
                         f"model are not in it (e.g. {missing[:2]}) and {len(unexpected)} of its tensors have no place "
                         f"in the model (e.g. {unexpected[:2]}), as when the base model has more or fewer layers. "
                         f"{fix}")
    for key, value in remapped.items():
        problem = value_problem(key, value, config.num_tasks)
        if problem:
            raise ValueError(f"The MoE-LoRA checkpoint (adapter_model.safetensors) holds invalid values: {key!r} "
                             f"{problem}. The file was damaged or edited, or the training that wrote it diverged: save "
                             "or download the adapter again.")


def value_problem(key: str, value: torch.Tensor, num_tasks: int) -> Optional[str]:
    """What is wrong with a loaded tensor of a MoE layer (None: nothing, or not a MoE layer's tensor)."""
    name = next((part for part in key.split(".") if part.startswith(MOE_LORA_PREFIX)), None)
    if name is None or name == SELECTOR_KEY:
        return None  # the selector checks its own tensors
    if name in EXPERT_PARAMS + ROUTER_PARAMS:
        if not value.dtype.is_floating_point:
            return f"has dtype {value.dtype}; weights are floating point"
        if not bool(torch.isfinite(value).all()):
            return f"holds {int((~torch.isfinite(value)).sum())} NaN or infinite value(s)"
        return None
    ranges = {"moe_lora_counts": (0, None), "moe_lora_frozen_by": (-1, num_tasks - 1),
              "moe_lora_expert_task": (0, num_tasks - 1)}
    if name in ranges:
        low, high = ranges[name]
        wanted = f"integers >= {low}" if high is None else f"integers in [{low}, {high}] ({num_tasks} task routers)"
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return f"has dtype {value.dtype}; it holds {wanted}"
        if value.numel() and (int(value.min()) < low or (high is not None and int(value.max()) > high)):
            return f"holds values from {int(value.min())} to {int(value.max())}; it holds {wanted}"
        if name == "moe_lora_expert_task" and value.numel() > 1 and bool((value[1:] < value[:-1]).any()):
            return "is not in task order; a bank grows in task order, so each expert's task is at least the one before"
    if name == "moe_lora_router_frozen" and value.dtype != torch.bool:
        return f"has dtype {value.dtype}; it holds booleans (one per task router)"
    return None
