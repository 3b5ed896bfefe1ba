"""MoE-Adapters (Yu et al., CVPR 2024): task-routed expert LoRAs, activate-freeze, expert merging and DDAS.

The adapter's settings (experts, top-k, noise, growth, the DDAS selector) are its `MoELoraConfig`'s; this method
owns what happens around each task: routers, freezing, merging, fitting the selector, routing reports.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from ...classification import ImageRoutes
from ...ddas.features import load_alexnet, selector_features
from ...ddas.fitting import SelectorFitting, check_calibration, reference_images
from ...ddas.settings import SELECTOR_OPTION_NAMES, DDASArguments, SelectorConfig
from ...options import short_repr
from ...tuners.moe_lora import MoELoraConfig, MoELoraModel
from ...tuners.moe_lora.config import check_growth_threshold
from ...tuners.moe_lora.model import find_moe, tower_of
from ..run_folder import jsonable
from ..tasks import check_image_column
from .base import ContinualMethod
from .expert_usage import evaluation_selections, routing_report, slots_by_tower, trainable_share
from .moe_adapters_arguments import MoEAdaptersArguments  # also imported from here, its module before 0.3
from .registry import register_method

logger = logging.getLogger("hf_moe_cl")


def global_selection_counts(moe: MoELoraModel, task: int) -> dict[str, torch.Tensor]:
    """This task's expert-selection counts over all processes, equal on every rank and to a 1-process run.

    Image batches are split across processes, so vision-tower counts are summed; every process encodes the same
    class prompts, so text-tower counts are averaged.
    """
    counts = {name: row.clone() for name, row in moe.selection_counts(task).items()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for name, row in counts.items():
            dist.all_reduce(row)
            if tower_of(name) == "text":
                row //= world
    return counts


class ExpertMergingCallback(TrainerCallback):
    """Every `every` optimizer steps, merge the current task's two most-selected experts (Park, 2024)."""

    def __init__(self, method: "MoEAdapters", every: int):
        if every < 1:
            raise ValueError(f"Expert merging needs a positive period, got {every}.")
        self.method, self.every = method, every
        self.merges = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps < self.every:
            raise ValueError(f"merge_experts_every={self.every} is more than this task's {state.max_steps} optimizer "
                             "steps: no merge would happen in it. Give at most "
                             f"{state.max_steps} (0 disables merging), or train each task longer (max_steps).")
        # a merge writes the two most-selected experts into a third, trainable one (hidden frozen ones: 3 trainable)
        hide = self.method.moe.moe_config.hide_frozen_experts
        short = [name for name, slots in self.method.moe.expert_slots().items()
                 if slots["total"] < 3 or slots["trainable"] < (3 if hide else 1)]
        if short:
            why, fix = (("with hide_frozen_experts, fewer than 3 of its experts are trainable",
                         ", or set hide_frozen_experts=False") if hide else ("none of its experts trains", ""))
            logger.warning("merge_experts_every: task router %s merges nothing in %d layer(s) (e.g. %s): %s. Give the "
                           "bank more experts or let it grow (expert_growth_threshold of at least 3 / num_experts)%s.",
                           self.method.current_route, len(short), short[0], why, fix)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        task = self.method.current_route
        if task is None or state.global_step % self.every:
            return
        moe = self.method.moe
        merged = moe.merge_experts(task, optimizer=optimizer, counts=global_selection_counts(moe, task))
        self.merges += bool(merged)


@register_method
class MoEAdapters(ContinualMethod):
    """MoE-Adapters on a `get_peft_model(clip, MoELoraConfig(...))` model: one router per task, activate-freeze
    after each task, optional expert merging, and a DDAS selector for images without a task id.

    `selector` gives the settings of the DDAS selector the adapter gets when DDAS first fits one (default: the
    untouched CLIP's image embeddings); an adapter that has a selector keeps its own.
    """

    name = "moe-adapters"
    arguments_class = MoEAdaptersArguments
    mixed_routes = True
    batch_selection = True
    untouched_is_fixed = True

    def __init__(self, model, arguments: Optional[MoEAdaptersArguments] = None,
                 ddas: Optional[DDASArguments] = None, ddas_reference: Optional[Dataset] = None,
                 selector: Optional[SelectorConfig] = None):
        super().__init__(model, arguments)
        if find_moe(model) is None:
            raise ValueError("MoEAdapters needs a MoE-LoRA model: get_peft_model(clip, MoELoraConfig(...)).")
        self.ddas = ddas if ddas is not None else DDASArguments()
        self._check_against_the_adapter(selector)
        self.ddas_reference = ddas_reference
        self.current_route: Optional[int] = None
        self._sequence: list = []  # the tasks of the running sequence
        self.routing_reports: list[dict] = []  # after each task: learned task -> shares of its selections
        self.trainable_experts: list[dict] = []  # after each task: tower -> share of expert slots still trainable
        self.expert_growth: list[dict] = []  # before each task: layer -> experts added (empty: none)
        self.expert_slots: list[dict] = []  # after each task: tower -> {"total", "trainable"} expert slots
        self._alexnet = None
        self._merging = (ExpertMergingCallback(self, self.arguments.merge_experts_every)
                         if self.arguments.merge_experts_every > 0 else None)

    def _check_against_the_adapter(self, selector: Optional[SelectorConfig]) -> None:
        """Options of hf-moe-cl 0.2 that are the adapter's settings now must agree with the model's; a freeze
        beyond the model's experts would freeze whole banks. Sets the selector settings DDAS will use."""
        moe, arguments = self.moe, self.arguments
        config = moe.moe_config
        moved = dict(getattr(arguments, "moved", {}))
        growth = moved.pop("expert_growth_threshold", None)
        if growth is not None:  # as hf-moe-cl 0.2 did: the run's threshold, saved with the adapter
            check_growth_threshold("expert_growth_threshold", growth)
            config.expert_growth_threshold = growth
        differ = [name for name, value in moved.items() if value != getattr(config, name)]
        if differ:
            raise ValueError(
                f"MoEAdaptersArguments has {', '.join(f'{n}={moved[n]!r}' for n in differ)} but the model's adapter "
                f"has {', '.join(f'{n}={getattr(config, n)!r}' for n in differ)}: a model given to MoEAdapters keeps "
                "its own settings. Build the model with MoELoraConfig(...) set as wanted.")
        smallest = min(slots["total"] for slots in moe.expert_slots().values())
        freeze = arguments.freeze_experts_per_task
        if freeze is not None and freeze > smallest:
            raise ValueError(f"freeze_experts_per_task={freeze} is more than the {smallest} experts of this model's "
                             f"smallest bank: one task would freeze every expert it used. Give at most {smallest - 1} "
                             f"to leave later tasks experts to train there ({smallest} freezes the whole bank, 0 "
                             f"disables freezing, None freezes top_k={config.top_k}).")
        if (every := arguments.merge_experts_every) and smallest < 3 and config.expert_growth_threshold is None:
            raise ValueError(f"merge_experts_every={every} averages a task's two most-selected experts into a third, "
                             f"but this model's smallest bank has {smallest} experts: no merge would ever happen. Give "
                             "the adapter at least 3 (MoELoraConfig(num_experts=...)), or merge_experts_every=0.")
        moved = {SELECTOR_OPTION_NAMES[name]: value for name, value in getattr(self.ddas, "moved", {}).items()}
        if moved and selector is not None:
            raise ValueError(f"DDASArguments has {sorted(moved)} and MoEAdapters got selector=...: give the "
                             "selector's settings once, in SelectorConfig.")
        given = selector or (SelectorConfig(**moved) if moved else None)
        if moe.selector is not None and given is not None:
            given.check_kept_by(moe.selector.config, None if selector is not None else list(moved))
        settings = moe.selector.config if moe.selector is not None else given or SelectorConfig()
        self.selector_settings = settings.bound_to(self.model.config)
        self.ddas.check_selector(self.selector_settings)

    @classmethod
    def from_base(cls, base, options=(), num_tasks=1, rank=64, reference_images=None):
        """A new adapter from the `MoELoraConfig` among `options` (its sizes; the paper's by default), with
        `num_tasks` routers (one if `shared_router`) of rank `rank`."""
        arguments = cls.pick(options, MoEAdaptersArguments)
        config = dataclasses.replace(cls.pick(options, MoELoraConfig), r=rank, **getattr(arguments, "moved", {}),
                                     num_tasks=1 if arguments.shared_router else num_tasks)
        model = get_peft_model(copy.deepcopy(base), config)
        selector = next((option for option in options if isinstance(option, SelectorConfig)), None)
        return cls(model, arguments, cls.pick(options, DDASArguments), reference_images, selector)

    @property
    def moe(self) -> MoELoraModel:
        return find_moe(self.model)

    @property
    def selects_routes(self) -> bool:
        selector = self.moe.selector
        return self.ddas.ddas or (selector is not None and selector.has_reference)

    # ----- the task loop -------------------------------------------------------------------------------------------
    def begin_sequence(self, context, tasks) -> None:
        if context.trains and self.moe.moe_config.inference_mode:
            raise ValueError("This MoE-LoRA adapter was loaded for inference (PeftModel.from_pretrained's default "
                             "is_trainable=False): its experts and routers cannot train. Load it with "
                             "PeftModel.from_pretrained(base, path, is_trainable=True) to teach it more tasks.")
        reference = self.ddas_reference
        if self.ddas.ddas:
            if self.arguments.shared_router:
                raise ValueError("DDAS needs one router per task: it cannot be used with shared_router=True.")
            learned_reference = self.moe.selector is not None and self.moe.selector.has_reference
            if learned_reference and reference is not None:  # a continued model: its reference autoencoder is kept
                logger.warning("ddas_reference is not used: this model's DDAS selector has learned its reference "
                               "autoencoder already (it is kept); only the new tasks' autoencoders are fitted.")
            elif not learned_reference and (not isinstance(reference, Dataset) or len(reference) == 0
                                            or "image" not in reference.column_names):
                raise ValueError(
                    "DDAS needs reference images: pass `ddas_reference=` (a non-empty datasets.Dataset with an `image` "
                    "column, e.g. Tiny ImageNet; the shared assets have reference/tinyimagenet-ref) to MoEAdapters, "
                    "got " + (f"{len(reference)} rows with columns {reference.column_names}" if isinstance(
                        reference, Dataset) else short_repr(reference)) + ".")
            if not learned_reference:
                check_image_column(reference, "DDAS reference images (ddas_reference)", context.check_images,
                                   context.show_progress)
                reference_images(self.ddas, reference, context.seed)  # what the first fit will train on
            if self.selector_settings.feature_extractor == "alexnet" and self._alexnet is None:
                # loaded (downloaded) now, so a missing file or network fails before the first task trains
                self._alexnet = load_alexnet(self.ddas.ddas_alexnet_weights, context.device)
        if self.selects_routes:  # a continued model's selector learns the new tasks too, even without ddas=True
            check_calibration(self.ddas, tasks)
        self._sequence = list(tasks)
        moe = self.moe
        if self.arguments.shared_router:
            if moe.moe_config.expert_growth_threshold is not None:
                raise ValueError("Expert growth needs one router per task (it grows before each new task's router "
                                 "trains): it cannot be used with shared_router=True.")
            if 0 in moe.frozen_routers():  # read from its bank: the new tasks would train no router at all
                raise ValueError("Router 0 of this model was frozen with the experts of the task it learned: with "
                                 "shared_router=True the new tasks would go through it, and no router would train. "
                                 "Continue it with shared_router=False (new routers of their own), or start anew.")
            return
        learned = [info["name"] if info else None for info in moe.task_info]
        while learned and learned[-1] is None:
            learned.pop()
        if None in learned:
            raise ValueError(f"Routers {[i for i, n in enumerate(learned) if n is None]} of this adapter have no "
                             "task record (task_info) although later ones do; it cannot be continued safely.")
        again = [task.name for task in tasks if task.name in learned]
        if again and not self.arguments.relearn_tasks:
            raise ValueError(
                f"This model already learned {again} (routers {[learned.index(n) for n in again]}, frozen with their "
                "experts). Give new tasks new names, or set MoEAdaptersArguments(relearn_tasks=True) to learn them "
                "again with new routers of their own; the learned routers stay as they are.")
        if learned:
            logger.info("Continuing a model that learned %d task(s) %s: the new tasks get routers %d to %d.",
                        len(learned), learned, len(learned), len(learned) + len(tasks) - 1)
        self.first_route = len(learned)
        while moe.num_tasks < self.first_route + len(tasks):
            moe.add_task()
        if context.trains:
            self._check_room(len(tasks))

    def _check_room(self, count: int) -> None:
        """Before the first of `count` tasks trains, refuse a sequence whose later tasks would certainly find no
        expert left to train in some layer: with the top_k policy and no growth, a `freeze_experts_per_task` as large
        as a bank freezes every expert the first task selects (left at top_k = num_experts, the paper's rule does so
        too: a warning, the later tasks then train their routers alone); with hide_frozen_experts, each task freezes at
        least min(k, top_k) new experts per layer (it selects only experts no earlier task froze), so the last one
        must be left top_k."""
        config, arguments, adapter = self.moe.moe_config, self.arguments, self.moe._adapter()
        if config.expert_growth_threshold is not None or arguments.freeze_policy != "top_k" or count < 2:
            return
        given = arguments.freeze_experts_per_task
        k = config.top_k if given is None else given
        smallest = min(slots["total"] for slots in self.moe.expert_slots().values())
        if k >= smallest:
            what = (f"freeze_experts_per_task={given}" + (f" (top_k={k})" if given is None else "")
                    + f" freezes all {smallest} experts of this model's smallest bank after the first of these {count} "
                    "tasks (every expert it selects): the later ones would train no expert there")
            fix = (f"give at most {smallest - 1} (0 disables freezing), give the bank more experts than top_k, or let "
                   "it grow (MoELoraConfig(expert_growth_threshold=...))")
            if given is not None:
                raise ValueError(f"{what}. {fix[0].upper()}{fix[1:]}.")
            logger.warning("%s, only their routers. To train experts in every task, %s.", what, fix)
        if not config.hide_frozen_experts:
            return
        first = min(layer.selectable_experts(adapter, self.first_route) for layer in self.moe.moe_layers().values())
        left = first - (count - 1) * min(k, config.top_k)
        if left < config.top_k:
            raise ValueError(f"With hide_frozen_experts, {count} tasks freezing {min(k, config.top_k)} expert(s) per "
                             f"layer each leave the last one {max(left, 0)} expert(s) of {first}, fewer than "
                             f"top_k={config.top_k}. Grow the bank (expert_growth_threshold of at least top_k / "
                             "num_experts), give it more experts, or set hide_frozen_experts=False.")

    def task_route(self, index: int) -> int:
        return 0 if self.arguments.shared_router else self.first_route + index

    def route_count(self, tasks) -> int:
        return self.moe.num_tasks

    def fingerprint(self) -> dict:
        selector = {"selector": self.selector_settings.to_dict()} if self.selects_routes else {}
        return {**super().fingerprint(), "ddas": jsonable(self.ddas), **selector}

    def begin_task(self, context, index, task) -> None:
        self.current_route = self.task_route(index)
        if not self.arguments.shared_router:
            added = self.moe.grow_experts(self.current_route) if context.trains else {}
            if added:
                logger.info("Task %s: %d layer(s) grew by %d expert(s) in all (fewer than %.2f x num_experts "
                            "trainable).", task.name, len(added), sum(added.values()),
                            self.moe.moe_config.expert_growth_threshold)
            self.expert_growth.append(added)  # nothing unless the adapter grows
        self.moe.set_task(self.current_route)  # refused if hide_frozen_experts left the task too few experts

    def extra_loss(self):
        return self.moe.aux_loss()

    def callbacks(self):
        return [self._merging] if self._merging is not None else []

    def end_task(self, context, index, task) -> None:
        moe, route, arguments = self.moe, self.current_route, self.arguments
        self.current_route = None
        if context.trains and not arguments.shared_router:
            moe.set_selection_counts(route, global_selection_counts(moe, route))
            if arguments.freeze_policy == "coverage":
                used = evaluation_selections(self.model, context, route, task, arguments.freeze_images)
                moe.freeze_covering(route, used, arguments.freeze_coverage)
            elif arguments.freeze_experts_per_task is None or arguments.freeze_experts_per_task > 0:
                moe.freeze_most_selected(route, arguments.freeze_experts_per_task)
        if arguments.shared_router:
            return
        moe.set_task_info(route, task.name, task.classnames, task.templates)
        if self.selects_routes:
            self._fit_selector(context, route, task)  # a continued model's selector learns the new tasks too
        self.expert_slots.append(slots_by_tower(moe))
        if arguments.routing_report:
            self.trainable_experts.append(trainable_share(moe))
            learned = self._sequence[: route + 1 - self.first_route]
            self.routing_reports.append({
                task.name: routing_report(self.model, context, self.first_route + i, task,
                                          arguments.routing_report_images) for i, task in enumerate(learned)})

    def _fit_selector(self, context, route: int, task) -> None:
        moe = self.moe
        if moe.selector is None:
            moe.enable_selector(self.selector_settings)
        self.model.eval()
        fitting = SelectorFitting(moe.selector, self.ddas, context, lambda pixels: self.selector_features(pixels)[0])
        fitting.fit(route, task, self.ddas_reference)

    def diagnostics(self) -> dict:
        result = {"expert_slots": self.expert_slots, "expert_growth": self.expert_growth} if self.expert_slots else {}
        if self.routing_reports:
            result.update(routing_report=self.routing_reports, trainable_experts=self.trainable_experts)
        return result

    def restore_diagnostics(self, diagnostics: dict) -> None:
        for key, attribute in (("routing_report", "routing_reports"), ("trainable_experts", "trainable_experts"),
                               ("expert_slots", "expert_slots"), ("expert_growth", "expert_growth")):
            setattr(self, attribute, list(diagnostics.get(key, [])))

    # ----- classification ------------------------------------------------------------------------------------------
    def acting_as(self, route: Union[int, torch.Tensor]):
        return self.moe.routing(route)

    def selector_features(self, pixels: torch.Tensor):
        """The DDAS selector's features of `pixels`, and the untouched CLIP's embeddings of them (see
        `ddas.features.selector_features`)."""
        return selector_features(self.moe.selector.config, self.model, pixels, lambda: self.moe.routing(None),
                                 self._alexnet_for(pixels.device))

    def _alexnet_for(self, device):
        if self.moe.selector.config.feature_extractor == "alexnet" and self._alexnet is None:
            self._alexnet = load_alexnet(self.ddas.ddas_alexnet_weights, device)
        return self._alexnet

    def select_routes(self, classifier, pixels):
        """DDAS's routes, per image."""
        routes, _, untouched = self.moe.selector.choose(self.model, pixels, lambda: self.moe.routing(None),
                                                         self._alexnet_for(pixels.device))
        return ImageRoutes(routes), untouched

    def choose_routes(self, classifier, pixels, untouched=None, unit=None):
        """Per-image and per-unit routes from one computation of every autoencoder's errors."""
        routes, units, _ = self.moe.selector.choose(self.model, pixels, lambda: self.moe.routing(None),
                                                    self._alexnet_for(pixels.device), untouched, unit)
        return ImageRoutes(routes), units

    def learned_tasks(self) -> dict[int, dict]:
        selector, info = self.moe.selector, self.moe.task_info
        trained = [t for t in range(self.moe.num_tasks) if selector is not None and selector.task_is_trained(t)]
        missing = [t for t in trained if not info[t] or not info[t].get("classnames")]
        if missing:
            raise ValueError(f"Tasks {missing} have no class names in the adapter config (`task_info`); save the "
                             "adapter from ContinualTrainer or call set_task_info().")
        return {t: info[t] for t in trained}

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def load(self, folder: Path) -> None:
        """The adapter saved by `save`: weights (selector included), task records and selector settings."""
        moe = self.moe
        if not (Path(folder) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"No MoE-LoRA adapter (adapter_config.json) in {folder} to resume from.")
        saved = MoELoraConfig.from_pretrained(str(folder))
        if saved.num_tasks != moe.num_tasks:
            raise ValueError(
                f"Cannot resume from {folder}: its adapter has {saved.num_tasks} task routers, this model "
                f"{moe.num_tasks}.")
        if saved.selector is not None and moe.selector is None:
            moe.enable_selector(saved.selector)
        moe.grow_to(saved.experts_per_module)  # a grown bank: its shapes before its weights
        moe.moe_config.task_info = saved.task_info
        path = Path(folder) / "adapter_model.safetensors"
        try:
            set_peft_model_state_dict(self.model, load_file(path))
        except ValueError as error:  # the checks of MoELoraModel's loader, which does not know the file
            raise ValueError(f"{path}: {error}") from None
