"""`MoELoraModel`: injects task-routed expert banks into a CLIP model, as a peft tuner (routing, loading checks and
the experts' bookkeeping live in `routing.py`, `loading.py`, `experts.py`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _remove_adapter_name_from_state_dict_key
from torch import nn

from ...ddas.selector import DistributionSelector
from ...ddas.settings import SELECTOR_KEY, SelectorConfig
from ...legacy import legacy_selector_prefixes, stack_legacy_autoencoders
from .config import CLIP_BLOCK_TARGETS, MoELoraConfig, check_task_info_entry
from .experts import ExpertBookkeeping
from .layer import NO_MERGE, MoELoraBlock, MoELoraLayer, MoELoraLinear
from .loading import check_grown_modules, check_injection, check_loaded_state
from .peft_type import MOE_LORA_PREFIX
from .routing import TaskRouting

# CLIPVisionModel / CLIPTextModel name their blocks `encoder.layers.N` (transformers 5) or
# `vision_model.encoder.layers.N` / `text_model.encoder.layers.N` (transformers 4).
TARGETS_BY_MODEL_TYPE = {
    "clip": CLIP_BLOCK_TARGETS,
    "clip_vision_model": r"(.*vision_model\.)?encoder\.layers\.\d+",
    "clip_text_model": r"(.*text_model\.)?encoder\.layers\.\d+",
}


def _bound(settings: SelectorConfig, model, adapter: str) -> SelectorConfig:
    return settings.bound_to(getattr(model, "config", None), f"The DDAS selector of adapter {adapter!r}")


def find_moe(model) -> Optional["MoELoraModel"]:
    """The MoE-LoRA tuner inside a PeftModel (None for other models)."""
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, MoELoraModel) else None


def tower_of(layer_name: str) -> str:
    """'vision' or 'text' for a module name of a CLIP model ('other' outside both towers)."""
    return next((tower for tower in ("vision", "text") if f"{tower}_model" in layer_name), "other")


class MoELoraModel(TaskRouting, ExpertBookkeeping, BaseTuner):
    """Task-routed mixture of expert LoRAs (MoE-Adapters) as a peft tuner.

    Use through `get_peft_model(clip, MoELoraConfig(...))`; the methods below are reachable from the returned
    `PeftModel`. Task 0 is routed after creation; `set_task(None)` (or -1) gives the untouched base model. The
    route of a call is passed to every layer as an argument (`routing()`, `model(..., task_ids=...)`).
    """

    prefix: str = MOE_LORA_PREFIX
    tuner_layer_cls = MoELoraLayer
    target_module_mapping = TARGETS_BY_MODEL_TYPE

    def _create_and_replace(self, peft_config: MoELoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        num_experts = peft_config.experts_per_module.get(current_key, peft_config.num_experts)
        if isinstance(target, MoELoraLayer):
            target.update_layer(adapter_name, peft_config, num_experts=num_experts)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, current_key, num_experts)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: MoELoraConfig, adapter_name: str, target: nn.Module, key: str,
                           num_experts: Optional[int] = None) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            return MoELoraLinear(target, adapter_name, config, num_experts=num_experts)
        if isinstance(getattr(base, "layer_norm2", None), nn.LayerNorm) and hasattr(base, "mlp"):
            return MoELoraBlock(target, adapter_name, config, num_experts=num_experts)
        raise ValueError(f"Target module {key!r} ({type(base).__name__}) is not supported by MoE-LoRA: it adapts "
                         "transformer blocks that have `layer_norm2` and `mlp` (the default placement) or `nn.Linear` "
                         "modules. Change `target_modules` in MoELoraConfig.")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if new_module is getattr(child, "base_layer", None):
            # unloading: put the wrapped block or Linear back as it was
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _post_injection_hook(self, model: nn.Module, config: MoELoraConfig, adapter_name: str) -> None:
        self._start_routing(config.num_tasks)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection (at creation, `add_adapter`, `load_adapter`), plus the adapter's DDAS selector. An
        adapter created on other pretrained weights than `model`'s, or with settings that do not fit it, is refused
        before anything is injected."""
        config = self.peft_config[adapter_name]
        settings = None if config.selector is None else _bound(SelectorConfig.from_dict(config.selector), model,
                                                                 adapter_name)
        check_injection(model, config, adapter_name, TARGETS_BY_MODEL_TYPE)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        check_grown_modules(config, adapter_name, set(self.moe_layers()))
        if settings is not None:
            self._build_selector(adapter_name, settings)

    # ----- the DDAS selector (part of the adapter) -----------------------------------------------------------------
    def _build_selector(self, adapter: str, settings: SelectorConfig) -> DistributionSelector:
        """The adapter's selector with `settings` (bound to the model), recorded in its config."""
        config = self.peft_config[adapter]
        config.selector = settings.to_dict()
        selector = DistributionSelector(settings, config.num_tasks)
        if SELECTOR_KEY not in self._modules:
            self.add_module(SELECTOR_KEY, nn.ModuleDict())
        self._modules[SELECTOR_KEY][adapter] = selector.to(next(self.model.parameters()).device)
        return selector

    def enable_selector(self, settings: Union[SelectorConfig, dict, None] = None) -> DistributionSelector:
        """Give the adapter a DDAS selector (untrained) with these settings (default: the untouched CLIP's image
        embeddings); it is saved, pushed and loaded with the adapter's weights."""
        settings = settings if isinstance(settings, SelectorConfig) else SelectorConfig.from_dict(settings or {})
        adapter = self._adapter()
        return self._build_selector(adapter, _bound(settings, self.model, adapter))

    @property
    def selector(self) -> Optional[DistributionSelector]:
        """The adapter's DDAS selector (None if it has none)."""
        selectors = self._modules.get(SELECTOR_KEY)
        adapter = self._adapter()
        return selectors[adapter] if selectors is not None and adapter in selectors else None

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's `delete_adapter`, and the adapter's DDAS selector with it."""
        super().delete_adapter(adapter_name)
        selectors = self._modules.get(SELECTOR_KEY)
        if selectors is not None and adapter_name in selectors:
            del selectors[adapter_name]

    # ----- peft's save, load and merge -----------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".{SELECTOR_KEY}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{SELECTOR_KEY}.", 1)
        return _remove_adapter_name_from_state_dict_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's remapping, refusing a checkpoint that does not fit this model instead of loading part of it. A
        selector saved by hf-moe-cl <= 0.2 (one module per autoencoder) is stacked first."""
        for prefix in legacy_selector_prefixes(state_dict):
            state_dict = stack_legacy_autoencoders(state_dict, prefix)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_state(model.state_dict(), config, adapter_name, remapped)
        return remapped

    def unload(self) -> nn.Module:
        """The base model as it was: the wrapped blocks and Linears back in place, no hook of this tuner left."""
        self._stop_routing()
        return super().unload()

    def _check_merge_allowed(self):
        raise ValueError(NO_MERGE)

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError("add_weighted_adapter is not supported by MoE-LoRA, because its experts are chosen per sample "
                         "by task routers: a weighted sum of two adapters' experts has no router that was trained to "
                         "use it. Keep the adapters separate and switch with set_adapter(), or route tasks with "
                         "set_task() / task_ids.")

    # ----- introspection -------------------------------------------------------------------------------------------
    def moe_layers(self) -> dict[str, MoELoraLayer]:
        """Adapted modules by name, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MoELoraLayer)}

    def _adapter(self) -> str:
        adapters = [a for a in self.active_adapters if isinstance(self.peft_config.get(a), MoELoraConfig)]
        if len(adapters) != 1:
            raise ValueError(f"Task management needs exactly one active MoE-LoRA adapter, found {adapters}; call "
                             "set_adapter(name) first.")
        return adapters[0]

    @property
    def moe_config(self) -> MoELoraConfig:
        """The active adapter's config (num_tasks, task_info, selector settings, ...)."""
        return self.peft_config[self._adapter()]

    @property
    def num_tasks(self) -> int:
        return self.moe_config.num_tasks

    @property
    def task_info(self) -> list[Optional[dict]]:
        """Per task router: its name, class names and templates (None where nothing was recorded)."""
        info = list(self.moe_config.task_info or [])
        return info + [None] * (self.num_tasks - len(info))

    def set_task_info(self, task: int, name: str, classnames: list[str], templates: list[str]) -> None:
        """Record what task `task`'s router was trained on (saved in the adapter config); checked here, so that a
        saved adapter always loads again."""
        task = self._check_task(task)
        check_task_info_entry(task, name, classnames, templates)
        info = self.task_info
        info[task] = {"name": name, "classnames": list(classnames), "templates": list(templates)}
        self.moe_config.task_info = info

    # ----- tasks ---------------------------------------------------------------------------------------------------
    def add_task(self) -> int:
        """Append a router for a new task to every layer (and an autoencoder to the selector); return its id."""
        adapter = self._adapter()
        for layer in self.moe_layers().values():
            layer.add_task(adapter)
        if self.selector is not None:
            self.selector.add_task()
        self.peft_config[adapter].num_tasks += 1
        return self.peft_config[adapter].num_tasks - 1

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the load-balancing losses of the last training forward (None when the coefficient is 0)."""
        losses = [layer.balance_loss for layer in self.moe_layers().values() if layer.balance_loss is not None]
        return torch.stack(losses).sum() if losses else None
