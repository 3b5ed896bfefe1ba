"""What a MoE-LoRA adapter must satisfy to be injected into a model or loaded into it: each check names the file a
bad value came from and what to do. `MoELoraModel` calls them at peft's two entry points (`inject_adapter`,
`_remap_adapter_state_dict_for_load`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...ddas.settings import EDITED, SELECTOR_KEY
from .bank import EXPERT_PARAMS, ROUTER_PARAMS
from .base_weights import base_weights_record, check_base
from .config import MoELoraConfig
from .peft_type import MOE_LORA_PREFIX

FROZEN_BY, ROUTER_FROZEN, EXPERT_TASK = "moe_lora_frozen_by", "moe_lora_router_frozen", "moe_lora_expert_task"


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
    foreign = sorted(key for key in remapped if key in expected and adapter_part(key, adapter_name) is None)
    if foreign:
        raise ValueError(f"The MoE-LoRA checkpoint (adapter_model.safetensors) holds {len(foreign)} tensor(s) of the "
                         f"base model (e.g. {foreign[:2]}), which loading would write over the base model's own "
                         "weights: an adapter saves only its experts, routers, frozen flags, DDAS selector and "
                         "`modules_to_save` copies. The file was edited or written by other code: save or download "
                         "the adapter again (to change the base model, load it, change it, then add the adapter).")
    own = {key for key in expected if adapter_part(key, adapter_name) is not None}
    missing, unexpected = sorted(own - set(remapped)), sorted(set(remapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"The MoE-LoRA checkpoint does not match this model: {len(missing)} adapter tensors of the "
                         f"model are not in it (e.g. {missing[:2]}) and {len(unexpected)} of its tensors have no place "
                         f"in the model (e.g. {unexpected[:2]}), as when the base model has more or fewer layers. "
                         f"{fix}")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in remapped.items():
        problem = value_problem(key, value, config.num_tasks, config.num_experts)
        if problem:
            raise ValueError(f"The MoE-LoRA checkpoint (adapter_model.safetensors) holds invalid values: {key!r} "
                             f"{problem}. The file was damaged or edited, or the training that wrote it diverged: save "
                             "or download the adapter again.")
        module, name = adapter_part(key, adapter_name)
        layers.setdefault(module, {})[name] = value
    problem = frozen_problem({module: values for module, values in layers.items() if FROZEN_BY in values})
    if problem:
        raise ValueError(f"The MoE-LoRA checkpoint (adapter_model.safetensors) holds frozen flags no training writes: "
                         f"{problem}. The file was damaged or edited: save or download the adapter again.")


def adapter_part(key: str, adapter_name: str) -> Optional[tuple[str, str]]:
    """(module, tensor) of a key of the adapter's own tensors (a MoE layer's bank or buffer, the DDAS selector's, a
    `modules_to_save` copy); None for any other key, such as the base model's."""
    parts = key.split(".")
    return next(((".".join(parts[:i]), parts[i]) for i in range(len(parts) - 1) if parts[i + 1] == adapter_name
                 and (parts[i].startswith(MOE_LORA_PREFIX) or parts[i] == "modules_to_save")), None)


def frozen_problem(layers: dict[str, dict[str, torch.Tensor]]) -> Optional[str]:
    """What no training writes in the frozen flags of the MoE layers ({module: {tensor name: value}}; None: nothing):
    `_freeze` freezes a task's router in every layer with the experts it froze, and a task selects (so freezes) only
    experts at or before its own growth."""
    routers = {module: values[ROUTER_FROZEN].tolist() for module, values in layers.items()}
    first = next(iter(routers), None)
    other = next((module for module in routers if routers[module] != routers[first]), None)
    if other is not None:
        return (f"{ROUTER_FROZEN} is {routers[first]} in {first!r} but {routers[other]} in {other!r}; a task's "
                "router is frozen in every layer at once")
    for module, values in layers.items():
        frozen_by, first_task = values[FROZEN_BY], values.get(EXPERT_TASK)
        for expert, task in [(e, t) for e, t in enumerate(frozen_by.tolist()) if t >= 0]:
            if not routers[module][task]:
                return (f"expert {expert} of {module!r} is frozen by task {task} ({FROZEN_BY}), whose router is not "
                        f"frozen ({ROUTER_FROZEN}): a task freezes its experts when it ends, with its router")
            if first_task is not None and int(first_task[expert]) > task:
                return (f"expert {expert} of {module!r} is frozen by task {task} ({FROZEN_BY}) but was added for task "
                        f"{int(first_task[expert])} ({EXPERT_TASK}): task {task}'s router never selects it")
    return None


def value_problem(key: str, value: torch.Tensor, num_tasks: int, num_experts: Optional[int] = None) -> Optional[str]:
    """What is wrong with a loaded tensor of a MoE layer (None: nothing, or not a MoE layer's tensor); `num_experts`:
    the config's, the bank's size before any growth (None: not checked)."""
    name = next((part for part in key.split(".") if part.startswith(MOE_LORA_PREFIX)), None)
    if name is None or name == SELECTOR_KEY:
        return None  # the selector checks its own tensors
    if name in EXPERT_PARAMS + ROUTER_PARAMS:
        if not value.dtype.is_floating_point:
            return f"has dtype {value.dtype}; weights are floating point"
        if not bool(torch.isfinite(value).all()):
            return f"holds {int((~torch.isfinite(value)).sum())} NaN or infinite value(s)"
        return None
    ranges = {"moe_lora_counts": (0, None), FROZEN_BY: (-1, num_tasks - 1), EXPERT_TASK: (0, num_tasks - 1)}
    if name in ranges:
        low, high = ranges[name]
        wanted = f"integers >= {low}" if high is None else f"integers in [{low}, {high}] ({num_tasks} task routers)"
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return f"has dtype {value.dtype}; it holds {wanted}"
        if value.numel() and (int(value.min()) < low or (high is not None and int(value.max()) > high)):
            return f"holds values from {int(value.min())} to {int(value.max())}; it holds {wanted}"
        if name == EXPERT_TASK and value.numel() > 1 and bool((value[1:] < value[:-1]).any()):
            return "is not in task order; a bank grows in task order, so each expert's task is at least the one before"
        if name == EXPERT_TASK and num_experts is not None and bool(value[:num_experts].any()):
            return (f"gives tasks {value[:num_experts].tolist()} to the bank's first {num_experts} experts "
                    f"(`num_experts`), which it had before any growth: every task router selects them, so they are 0")
        if name == EXPERT_TASK and num_experts is not None and not bool(value[num_experts:].all()):
            return (f"gives task 0 to experts after the bank's first {num_experts} (`num_experts`): the first task "
                    "trains on the whole bank and never grows it, so an added expert belongs to a later task (was "
                    "`num_experts` edited in adapter_config.json?)")
    if name == ROUTER_FROZEN and value.dtype != torch.bool:
        return f"has dtype {value.dtype}; it holds booleans (one per task router)"
    return None
