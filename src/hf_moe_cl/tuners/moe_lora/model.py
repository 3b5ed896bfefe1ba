"""`MoELoraModel`: injects task-routed expert banks into a CLIP model and manages tasks, freezing and merging."""

from __future__ import annotations

import logging
import operator
from contextlib import contextmanager
from functools import partial
from typing import Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _remove_adapter_name_from_state_dict_key
from torch import nn

from .peft_type import MOE_LORA_PREFIX
from .config import CLIP_BLOCK_TARGETS, MoELoraConfig, check_task_info_entry
from .experts import ExpertBookkeeping
from .gating import NO_ROUTE, TaskRoute
from .layer import EXPERT_PARAMS, ROUTER_PARAMS, MoELoraBlock, MoELoraLayer, MoELoraLinear
from ...classification import image_embeddings
from .base_weights import base_weights_record
from .features import prefix_features, vision_prefix
from .selector import DistributionSelector, SelectorConfig, legacy_selector_prefixes, stack_legacy_autoencoders

# CLIPVisionModel / CLIPTextModel name their blocks `encoder.layers.N` (transformers 5) or
# `vision_model.encoder.layers.N` / `text_model.encoder.layers.N` (transformers 4).
TARGETS_BY_MODEL_TYPE = {
    "clip": CLIP_BLOCK_TARGETS,
    "clip_vision_model": r"(.*vision_model\.)?encoder\.layers\.\d+",
    "clip_text_model": r"(.*text_model\.)?encoder\.layers\.\d+",
}

TaskIds = Union[None, int, torch.Tensor]
logger = logging.getLogger("hf_moe_cl")
SELECTOR_ATTRIBUTE = "moe_lora_selector"


def find_moe(model) -> Optional["MoELoraModel"]:
    """The MoE-LoRA tuner inside a PeftModel (None for other models)."""
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, MoELoraModel) else None


def tower_of(layer_name: str) -> str:
    """'vision' or 'text' for a module name of a CLIP model ('other' outside both towers)."""
    if "vision_model" in layer_name:
        return "vision"
    if "text_model" in layer_name:
        return "text"
    return "other"




def _value_problem(key: str, value: torch.Tensor, num_tasks: int) -> Optional[str]:
    """What is wrong with a loaded tensor of a MoE layer (None: nothing, or not a MoE layer's tensor): weights must be
    finite floats; selection counts non-negative integers; the task that froze an expert -1 (none) or a task id;
    the task an expert was added for a task id; router freeze flags booleans."""
    name = next((part for part in key.split(".") if part.startswith(MOE_LORA_PREFIX)), None)
    if name is None or name == SELECTOR_ATTRIBUTE:
        return None  # the selector checks its own tensors
    integer = not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
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
        if not integer:
            return f"has dtype {value.dtype}; it holds {wanted}"
        if value.numel() and (int(value.min()) < low or (high is not None and int(value.max()) > high)):
            return f"holds values from {int(value.min())} to {int(value.max())}; it holds {wanted}"
    if name == "moe_lora_router_frozen" and value.dtype != torch.bool:
        return f"has dtype {value.dtype}; it holds booleans (one per task router)"
    return None


class MoELoraModel(ExpertBookkeeping, BaseTuner):
    """Task-routed mixture of expert LoRAs (MoE-Adapters) as a peft tuner.

    Use through `get_peft_model(clip, MoELoraConfig(...))`; the methods below are reachable from the returned
    `PeftModel`. Task 0 is routed after creation; `set_task(None)` (or -1) gives the untouched base model. The
    route of a call is passed to every layer as an argument (`routing()`, `model(..., task_ids=...)`).
    """

    prefix: str = MOE_LORA_PREFIX
    tuner_layer_cls = MoELoraLayer
    target_module_mapping = TARGETS_BY_MODEL_TYPE

    def _create_and_replace(
        self,
        peft_config: MoELoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
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
        raise ValueError(
            f"Target module {key!r} ({type(base).__name__}) is not supported by MoE-LoRA: it adapts transformer "
            "blocks that have `layer_norm2` and `mlp` (the default placement) or `nn.Linear` modules. Change "
            "`target_modules` in MoELoraConfig."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if new_module is getattr(child, "base_layer", None):
            # unloading: put the wrapped block or Linear back as it was
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _post_injection_hook(self, model: nn.Module, config: MoELoraConfig, adapter_name: str) -> None:
        # One router: route through it, like any adapter. Several: until set_task() / task_ids / routing() pick a
        # route, images go through the DDAS selector when the adapter has a trained one; otherwise training is
        # refused and inference warns once that it runs as the untouched model (see `_unrouted`).
        self._default_route = TaskRoute(task=0) if config.num_tasks == 1 else NO_ROUTE
        self._task_chosen = config.num_tasks == 1
        self._warned_unrouted = False
        self._clip_call = False  # inside a forward of the whole CLIP model (both towers)
        self._images_route: Union[None, int, str] = None  # what the selector picked for that call's images
        self._pushed = {"vision_model": False, "text_model": False}  # a tower hook routed the running call
        self._call_routes: list[TaskRoute] = []
        # Registered once, never per call: a compiled model traces them as part of its graph.
        for layer in self.moe_layers().values():
            if getattr(layer, "_route_hook", None) is None:
                layer._route_hook = layer.register_forward_pre_hook(self._inject_route, with_kwargs=True)
        if getattr(self, "_model_hooks", None) is None:
            self._model_hooks = [self.model.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                                 self.model.register_forward_hook(self._end_call)]
            for tower, begin in (("vision_model", self._route_images), ("text_model", self._route_text)):
                module = getattr(self.model, tower, None)
                if isinstance(module, nn.Module):
                    self._model_hooks += [module.register_forward_pre_hook(begin, with_kwargs=True),
                                          module.register_forward_hook(partial(self._end_tower, tower))]

    # ----- routing -------------------------------------------------------------------------------------------------
    def _inject_route(self, module, args, kwargs):
        """Forward pre-hook of every MoE layer: the call's route is an argument of the layer's forward."""
        if "task_route" not in kwargs:
            if self._call_routes:
                kwargs["task_route"] = self._call_routes[-1]
            else:
                if not self._task_chosen:
                    self._unrouted()
                kwargs["task_route"] = self._default_route
        return args, kwargs

    def _unrouted(self) -> None:
        """A call no route was chosen for: an error in training, a warning (once) in inference."""
        advice = ("pass task_ids=<one task id per sample> to the model, call set_task(t) for every sample, or "
                  "classify images with TaskAgnosticClassifier")
        if self.training and torch.is_grad_enabled():
            raise ValueError(f"This MoE-LoRA adapter has {self.num_tasks} task routers and none was chosen for this "
                             f"training step, so no expert would train: {advice}. With the plain Trainer, keep the "
                             "`task_ids` column (remove_unused_columns=False).")
        if not self._warned_unrouted:
            self._warned_unrouted = True
            logger.warning("This MoE-LoRA adapter has %d task routers and no task was chosen (and no trained DDAS "
                           "selector picks one): it runs as the untouched base model. To use the adapter, %s; "
                           "set_task(None) makes the untouched model explicit.", self.num_tasks, advice)

    def _begin_call(self, module, args, kwargs):
        """Pre-hook of the whole CLIP: `task_ids` is routing, consumed by the tuner (the wrapped CLIP never sees
        it); the selector's choice for this call's images may route its text."""
        kwargs.pop("task_ids", None)
        self._clip_call, self._images_route = True, None
        return args, kwargs

    def _end_call(self, module, args, output):
        self._clip_call, self._images_route = False, None

    def _selecting(self) -> bool:
        """No route was chosen for this call and the adapter's trained selector is to pick one per image."""
        if self._call_routes or self._task_chosen:
            return False
        selector = self.selector
        return selector is not None and selector.has_reference

    def _route_images(self, module, args, kwargs):
        """Pre-hook of the vision tower: without a chosen route, the selector routes each image (its features from
        the untouched model)."""
        if not self._selecting():
            return None
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        config = self.selector.config
        if config.feature_extractor != "clip":
            raise ValueError(
                f"This adapter's DDAS selector reads {config.feature_extractor} features, which the model cannot "
                "compute by itself: classify with TaskAgnosticClassifier (it loads them), or pass task_ids."
            )
        routes = self.selector.select(self.clip_selector_features(pixels)[0])
        chosen = routes.unique().tolist()
        self._images_route = chosen[0] if len(chosen) == 1 else "mixed"
        self._call_routes.append(self._make_route(routes))
        self._pushed["vision_model"] = True
        return None

    @torch.no_grad()
    def clip_selector_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The selector's CLIP features of `pixels`, computed by the untouched model (its image embeddings, or its
        tokens after `feature_layer` blocks), and those embeddings when they are the features."""
        layer = self.selector.config.feature_layer
        with self.routing(None):
            if layer is None:
                embeddings = image_embeddings(self.model, pixels)
                return embeddings, embeddings
            return prefix_features(vision_prefix(self.model.vision_model, pixels, layer)), None

    def _end_tower(self, tower: str, module, args, output):
        """Forward hook of a tower: the route its pre-hook gave the call ends with it."""
        if self._pushed[tower]:
            self._pushed[tower] = False
            self._call_routes.pop()

    def _route_text(self, module, args, kwargs):
        """Pre-hook of the text tower: in a CLIP call whose images the selector routed, the text goes through their
        task; images of several tasks in one call cannot share text features."""
        if self._clip_call and self._images_route is not None and not self._call_routes:
            if self._images_route == "mixed":
                raise ValueError(
                    "The DDAS selector sent this batch's images to different tasks, and one CLIP call has one set of "
                    "text features: classify them with TaskAgnosticClassifier (text per task), or pass task_ids."
                )
            self._call_routes.append(self._make_route(self._images_route))
            self._pushed["text_model"] = True
        return None

    def _make_route(self, task_ids: TaskIds, selections: Optional[dict] = None) -> TaskRoute:
        if task_ids is None:
            return NO_ROUTE
        if isinstance(task_ids, torch.Tensor) and task_ids.dim() > 0:
            if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
                raise ValueError(f"task_ids must be an integer tensor (one task id per sample), got {task_ids.dtype}.")
            if task_ids.dim() != 1 or task_ids.numel() == 0 or task_ids.device.type == "meta":
                raise ValueError(f"task_ids must be a non-empty 1-D tensor with values (one task id per sample), got "
                                 f"shape {tuple(task_ids.shape)} on {task_ids.device}; use task_ids.flatten() only if "
                                 "that is the order of the samples.")
            ids = task_ids.long().flatten()
            if torch.compiler.is_compiling():  # checking the values would read them back from the device
                return TaskRoute.per_sample(ids, selections)
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_tasks):
                raise ValueError(
                    f"task_ids must lie in [-1, {self.num_tasks - 1}] (-1 is the zero-shot base model); got values "
                    f"from {int(ids.min())} to {int(ids.max())}."
                )
            if not bool((ids >= 0).any()):
                return NO_ROUTE
            return TaskRoute.per_sample(ids, selections)
        task = self._as_task_id(task_ids)
        return NO_ROUTE if task == -1 else TaskRoute(task=self._check_task(task), selections=selections)

    @staticmethod
    def _as_task_id(value) -> int:
        """An int task id from an int, a numpy integer or a 0-d integer tensor; floats and bools are errors."""
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise ValueError(f"A task id must be an integer, got the boolean {value!r}.")
        if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
            raise ValueError(f"A task id must be one integer, got {value!r}; per-sample task ids go to routing() or "
                             "`task_ids` as a 1-D integer tensor (torch.tensor(ids)), one id per sample.")
        try:
            return operator.index(value)
        except TypeError:
            raise ValueError(
                f"A task id must be an integer (or -1 / None for the zero-shot base model), got {value!r} of type "
                f"{type(value).__name__}; pass int(task) if you mean a whole number."
            ) from None

    def set_task(self, task: Optional[int]) -> None:
        """Route every later call through `task`'s router; None or -1 gives the unadapted base model."""
        self._default_route = self._make_route(None if task is None else self._as_task_id(task))
        self._task_chosen = True

    @property
    def active_task(self) -> Optional[int]:
        """The task `set_task` routes every sample to (None: zero-shot or per-sample routing)."""
        return self._default_route.task

    def _check_checkpointed_linear_routing(self) -> None:
        """Linear experts inside a checkpointed block are recomputed in backward, after a per-call route ended."""
        if not self.training:
            return
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False) and any(
                isinstance(m, MoELoraLinear) for m in module.modules()
            ):
                raise ValueError(
                    "Per-call routing (task_ids / routing()) in training with gradient checkpointing needs the block "
                    "placement of MoE-LoRA (the default target_modules); with Linear targets use set_task(), or "
                    "disable gradient checkpointing."
                )

    @contextmanager
    def routing(self, task_ids: TaskIds, selections: Optional[dict] = None):
        """Route the calls inside the block with an int task or per-sample ids (length batch, -1 for zero-shot).

        With `selections` (a dict), every layer adds the experts it chose (count them with `selection_histogram`).
        """
        route = self._make_route(task_ids, selections)
        self._check_checkpointed_linear_routing()
        self._call_routes.append(route)
        try:
            yield
        finally:
            self._call_routes.pop()

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`peft_model(..., task_ids=...)` routes one call, as peft does with `adapter_names`."""
        if kwargs.get("task_ids") is None:
            yield
            return
        with self.routing(kwargs["task_ids"]):
            yield

    # ----- DDAS selector (part of the adapter) ---------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection (at creation, `add_adapter`, `load_adapter`), plus the adapter's DDAS selector. An
        adapter created on other pretrained weights than `model`'s, or with settings that do not fit it, is refused
        before anything is injected."""
        config = self.peft_config[adapter_name]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.task_type is not None and model_type in TARGETS_BY_MODEL_TYPE:
            raise ValueError(f"`task_type` of adapter {adapter_name!r} is {str(config.task_type)!r}, but peft's task "
                             f"types wrap language models, not a {model_type!r} model (its forward would fail): leave "
                             "task_type None. In a saved adapter_config.json this means the file was damaged or "
                             "edited.")
        settings = None if config.selector is None else SelectorConfig.from_dict(config.selector)
        if settings is not None:
            self._check_selector_fits(model, settings, adapter_name)
        self._check_base_weights(model, config, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        unknown = sorted(set(config.experts_per_module) - set(self.moe_layers()))
        if unknown:
            raise ValueError(f"`experts_per_module` of adapter {adapter_name!r} names modules the adapter does not "
                             f"adapt in this model: {unknown[:3]}. In a saved adapter_config.json this means the file "
                             "was damaged or edited, or the adapter belongs to another base model.")
        if settings is not None:
            self._build_selector(adapter_name, settings, config.num_tasks)

    @staticmethod
    def _check_selector_fits(model: nn.Module, settings: SelectorConfig, adapter_name: str) -> None:
        """A selector reading the tokens after more vision blocks than `model` has would silently read them all."""
        layers = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", None)
        if settings.feature_extractor != "clip" or settings.feature_layer is None or layers is None:
            return
        if settings.feature_layer > len(layers):
            raise ValueError(f"The DDAS selector of adapter {adapter_name!r} reads the tokens after `feature_layer`="
                             f"{settings.feature_layer} vision blocks, but this model's vision tower has "
                             f"{len(layers)}: give 1 to {len(layers)}, or None for the image embeddings. In a saved "
                             "adapter_config.json this means the file was damaged or edited, or the adapter belongs "
                             "to another base model.")

    @staticmethod
    def _check_base_weights(model: nn.Module, config: MoELoraConfig, adapter_name: str) -> None:
        """Record the base's weights in a new adapter's config; compare them with a loaded adapter's record."""
        current = base_weights_record(model)
        if config.base_weights is None:  # a new adapter (or one saved before the record existed)
            config.base_weights = current
            return
        if current is None or config.base_weights == current:  # a meta-device base has no weights to compare
            return
        recorded = config.base_weights
        if recorded["layout"] != current["layout"]:
            return  # another architecture: loading the weights names the tensors that do not fit
        if recorded["dtype"] != current["dtype"]:
            logger.warning("Adapter %r was created on %s base weights and is loaded on %s ones: whether they are the "
                           "same pretrained weights cannot be checked (load the base in %s to check it).",
                           adapter_name, recorded["dtype"], current["dtype"], recorded["dtype"])
            return
        base = config.base_model_name_or_path
        raise ValueError(
            f"Adapter {adapter_name!r} was created on other pretrained weights than this model's (weights hash "
            f"{recorded['sha256']}, this model's {current['sha256']}): a base of the same shape with other weights "
            "gives wrong answers. Load the base model it was trained on"
            + (f" ({base!r}, at the revision it was trained with)" if base else "")
            + "; to load it on this one on purpose, set `base_weights=None` in its config "
            "(config = PeftConfig.from_pretrained(path); config.base_weights = None; "
            "PeftModel.from_pretrained(model, path, config=config))."
        )

    def _build_selector(self, adapter: str, settings: SelectorConfig, num_tasks: int) -> DistributionSelector:
        selector = DistributionSelector(settings, num_tasks)
        device = next(self.model.parameters()).device
        if SELECTOR_ATTRIBUTE not in self._modules:
            self.add_module(SELECTOR_ATTRIBUTE, nn.ModuleDict())
        self._modules[SELECTOR_ATTRIBUTE][adapter] = selector.to(device)
        return selector

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's `delete_adapter`, and the adapter's DDAS selector with it."""
        super().delete_adapter(adapter_name)
        selectors = self._modules.get(SELECTOR_ATTRIBUTE)
        if selectors is not None and adapter_name in selectors:
            del selectors[adapter_name]

    def enable_selector(self, settings: Union[SelectorConfig, dict]) -> DistributionSelector:
        """Give the adapter a DDAS selector (untrained) with these settings; it is saved, pushed and loaded with the
        adapter's weights."""
        settings = settings if isinstance(settings, SelectorConfig) else SelectorConfig.from_dict(settings)
        adapter = self._adapter()
        self._check_selector_fits(self.model, settings, adapter)
        self.peft_config[adapter].selector = settings.to_dict()
        return self._build_selector(adapter, settings, self.num_tasks)

    @property
    def selector(self) -> Optional[DistributionSelector]:
        """The adapter's DDAS selector (None if it has none)."""
        selectors = self._modules.get(SELECTOR_ATTRIBUTE)
        adapter = self._adapter()
        if selectors is None or adapter not in selectors:
            return None
        return selectors[adapter]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".{SELECTOR_ATTRIBUTE}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{SELECTOR_ATTRIBUTE}.", 1)
        return _remove_adapter_name_from_state_dict_key(key, adapter_name)

    def unload(self) -> nn.Module:
        """The base model as it was: the wrapped blocks and Linears back in place, no hook of this tuner left."""
        for handle in getattr(self, "_model_hooks", None) or []:
            handle.remove()
        self._model_hooks = None
        return super().unload()

    def _check_merge_allowed(self):
        raise ValueError(
            "MoE-LoRA routes every sample to its own experts, so it cannot be merged into the base weights; "
            "keep the adapter, or call unload() to get the base model back."
        )

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "add_weighted_adapter is not supported by MoE-LoRA, because its experts are chosen per sample by task "
            "routers: a weighted sum of two adapters' experts has no router that was trained to use it. Keep the "
            "adapters separate and switch with set_adapter(), or route tasks with set_task() / task_ids."
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's remapping, refusing a checkpoint that does not fit this model instead of loading part of it. A
        selector saved by hf-moe-cl <= 0.2 (one module per autoencoder) is stacked first."""
        for prefix in legacy_selector_prefixes(state_dict):
            state_dict = stack_legacy_autoencoders(state_dict, prefix)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = model.state_dict()
        base = config.base_model_name_or_path
        fix = (f"Load it on the base model it was trained on ({base!r})" if base else
               "Load it on the base model it was trained on") + " with the adapter_config.json saved beside it."
        for key, value in remapped.items():
            if key in expected and expected[key].shape != value.shape:
                raise ValueError(
                    f"The MoE-LoRA checkpoint does not match this model: {key!r} has shape {tuple(value.shape)} in "
                    f"the checkpoint but {tuple(expected[key].shape)} here. {fix}"
                )
        own = {key for key in expected if f".{adapter_name}" in key and MOE_LORA_PREFIX in key}
        missing, unexpected = sorted(own - set(remapped)), sorted(set(remapped) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"The MoE-LoRA checkpoint does not match this model: {len(missing)} adapter tensors of the model are "
                f"not in it (e.g. {missing[:2]}) and {len(unexpected)} of its tensors have no place in the model "
                f"(e.g. {unexpected[:2]}), as when the base model has more or fewer layers. {fix}"
            )
        for key, value in remapped.items():
            problem = _value_problem(key, value, config.num_tasks)
            if problem:
                raise ValueError(
                    f"The MoE-LoRA checkpoint (adapter_model.safetensors) holds invalid values: {key!r} {problem}. "
                    "The file was damaged or edited, or the training that wrote it diverged: save or download the "
                    "adapter again."
                )
        return remapped

    # ----- introspection -------------------------------------------------------------------------------------------
    def moe_layers(self) -> dict[str, MoELoraLayer]:
        """Adapted modules by name, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MoELoraLayer)}

    def _adapter(self) -> str:
        adapters = [a for a in self.active_adapters if isinstance(self.peft_config.get(a), MoELoraConfig)]
        if len(adapters) != 1:
            raise ValueError(
                f"Task management needs exactly one active MoE-LoRA adapter, found {adapters}; "
                "call set_adapter(name) first."
            )
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

    def _check_task(self, task: int) -> int:
        task = self._as_task_id(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(
                f"Task id {task!r} is out of range: this adapter has {self.num_tasks} task routers (ids 0 to "
                f"{self.num_tasks - 1}; -1 or None is the zero-shot base model). Use add_task() to add one."
            )
        return task

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
