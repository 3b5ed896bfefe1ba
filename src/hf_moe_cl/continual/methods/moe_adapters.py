"""MoE-Adapters (Yu et al., CVPR 2024): task-routed expert LoRAs, activate-freeze, expert merging and DDAS."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from ...classification import text_embeddings
from ...files import check_safetensors_file
from ...options import check_flags, check_option
from ...tuners.moe_lora import MoELoraConfig, MoELoraModel
from ...tuners.moe_lora.features import AlexNetFeatures
from ...tuners.moe_lora.model import find_moe, tower_of
from ..checkpoints import jsonable
from .registry import register_method
from .base import ContinualMethod
from .ddas import DDASArguments, DDASSelection

logger = logging.getLogger("hf_moe_cl")

# The adapter `MoEAdapters.from_base` builds where MoEAdaptersArguments leave these to the model (None): the paper's.
NEW_ADAPTER = {"num_experts": 22, "top_k": 2, "noisy_gating": True, "noisy_gating_eval": False}


@dataclass
class MoEAdaptersArguments:
    """MoE-Adapters' options beyond the adapter's size (`MoELoraConfig`). The adapter's settings (`num_experts`,
    `top_k`, `noisy_gating`, `noisy_gating_eval`) are None by default: those of the model given to `MoEAdapters` (a
    value that differs from them is refused), the paper's for the adapter `from_base` builds (`NEW_ADAPTER`)."""

    num_experts: Optional[int] = field(
        default=None, metadata={"help": "MoE-Adapters: experts per block (None: the model's; a new adapter: 22)."}
    )
    expert_growth_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Grow the expert bank: before each new task, a block (of either tower) whose share of "
                  "trainable experts (frozen by no task) is below this gets new experts that bring it back to it "
                  "(saved in the adapter config: a loaded model keeps growing). None: the paper's fixed bank."},
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "MoE-Adapters: experts per sample (None: the model's; a new adapter: 2)."}
    )
    noisy_gating: Optional[bool] = field(
        default=None,
        metadata={"help": "MoE-Adapters: noisy top-k gating in training (None: the model's; a new adapter: true)."},
    )
    noisy_gating_eval: Optional[bool] = field(
        default=None, metadata={"help": "Keep the gating noise on in evaluation (the official class-incremental code; "
                                "None: the model's; a new adapter: false)."}
    )
    freeze_experts_per_task: Optional[int] = field(
        default=None,
        metadata={"help": "Activate-freeze: experts frozen per layer after each task (default top_k; 0 disables)."},
    )
    freeze_policy: str = field(
        default="top_k",
        metadata={"help": "Activate-freeze rule: 'top_k' (the paper: the k experts selected most in training) or "
                  "'coverage' (the experts that carry the task's evaluation-time routing of its training images and "
                  "prompts, up to `freeze_coverage` of it; 1.0 makes the task's predictions on them final)."},
    )
    freeze_coverage: float = field(
        default=1.0, metadata={"help": "freeze_policy='coverage': share of the task's selections to freeze."}
    )
    freeze_images: Optional[int] = field(
        default=None,
        metadata={"help": "freeze_policy='coverage': training images whose routing is covered (None: all of them)."},
    )
    routing_report: bool = field(
        default=True,
        metadata={"help": "After each task, measure for every learned task the share of its evaluation-time expert "
                  "selections that fall on experts it did not freeze (diagnostics['routing_report'])."},
    )
    routing_report_images: int = field(
        default=256, metadata={"help": "Training images per learned task used by the routing report."}
    )
    merge_experts_every: int = field(
        default=0, metadata={"help": "Expert merging every N steps of a task (Park, 2024: 100); 0 disables."}
    )
    shared_router: bool = field(
        default=False,
        metadata={"help": "Route every task through router 0 and never freeze (the paper's class-incremental setup)."},
    )
    relearn_tasks: bool = field(
        default=False,
        metadata={"help": "Continuing a trained model: a task named like one it learned gets a new router of its own "
                  "(the learned one stays frozen); by default such a task is refused."},
    )

    def __post_init__(self):
        given = [name for name in NEW_ADAPTER if getattr(self, name) is not None]  # None: the model's
        if "num_experts" in given:
            check_option("num_experts", self.num_experts, int, low=1)
        # bounded by the bank from_base builds; MoEAdapters checks them again against a model given to it
        experts = self.num_experts or NEW_ADAPTER["num_experts"]
        if "top_k" in given:
            check_option("top_k", self.top_k, int, low=1, high=experts)
        check_option("expert_growth_threshold", self.expert_growth_threshold, float, low=0.0, high=1.0,
                     low_open=True, high_open=True, optional=True)
        check_option("freeze_experts_per_task", self.freeze_experts_per_task, int, low=0, high=experts, optional=True)
        check_option("freeze_policy", self.freeze_policy, str, choices=("top_k", "coverage"))
        check_option("freeze_coverage", self.freeze_coverage, float, low=0.0, high=1.0, low_open=True)
        check_option("freeze_images", self.freeze_images, int, low=1, optional=True)
        check_option("routing_report_images", self.routing_report_images, int, low=1)
        check_option("merge_experts_every", self.merge_experts_every, int, low=0)
        check_flags(self, [name for name in ("noisy_gating", "noisy_gating_eval") if name in given] +
                    ["routing_report", "shared_router", "relearn_tasks"])

    def for_new_adapter(self) -> "MoEAdaptersArguments":
        """These options with the adapter's settings left to the model (None) set to the paper's (`NEW_ADAPTER`)."""
        return dataclasses.replace(self, **{name: value for name, value in NEW_ADAPTER.items()
                                            if getattr(self, name) is None})


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

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        task = self.method.current_route
        if task is None or state.global_step % self.every:
            return
        moe = self.method.moe
        merged = moe.merge_experts(task, optimizer=optimizer, counts=global_selection_counts(moe, task))
        self.merges += bool(merged)


@register_method
class MoEAdapters(DDASSelection, ContinualMethod):
    """MoE-Adapters on a `get_peft_model(clip, MoELoraConfig(...))` model: one router per task, activate-freeze
    after each task, optional expert merging, and a DDAS selector for images without a task id."""

    name = "moe-adapters"
    arguments_class = MoEAdaptersArguments
    mixed_routes = True
    batch_selection = True
    untouched_is_fixed = True

    def __init__(self, model, arguments: Optional[MoEAdaptersArguments] = None,
                 ddas: Optional[DDASArguments] = None, ddas_reference: Optional[Dataset] = None):
        super().__init__(model, arguments)
        if find_moe(model) is None:
            raise ValueError("MoEAdapters needs a MoE-LoRA model: get_peft_model(clip, MoELoraConfig(...)).")
        self.arguments = self._fit_to_model(self.arguments)
        self.ddas = ddas if ddas is not None else DDASArguments()
        self.check_feature_layer()
        self.ddas_reference = ddas_reference
        self.current_route: Optional[int] = None
        self.first_route = 0  # routers before it were learned before this sequence (a published model continued)
        self._sequence: list = []  # the tasks of the running sequence
        self.routing_reports: list[dict] = []  # after each task: learned task -> shares of its selections
        self.trainable_experts: list[dict] = []  # after each task: tower -> share of expert slots still trainable
        self.expert_growth: list[dict] = []  # before each task: layer -> experts added (empty: none)
        self.expert_slots: list[dict] = []  # after each task: tower -> {"total", "trainable"} expert slots
        self._alexnet: Optional[AlexNetFeatures] = None
        self._merging = (ExpertMergingCallback(self, self.arguments.merge_experts_every)
                         if self.arguments.merge_experts_every > 0 else None)

    @classmethod
    def from_base(cls, base, options=(), num_tasks=1, rank=64, reference_images=None):
        arguments = cls.pick(options, MoEAdaptersArguments).for_new_adapter()
        config = MoELoraConfig(num_tasks=1 if arguments.shared_router else num_tasks,
                               num_experts=arguments.num_experts, top_k=arguments.top_k, r=rank,
                               noisy_gating=arguments.noisy_gating, noisy_gating_eval=arguments.noisy_gating_eval,
                               expert_growth_threshold=arguments.expert_growth_threshold)
        model = get_peft_model(copy.deepcopy(base), config)
        return cls(model, arguments, cls.pick(options, DDASArguments), reference_images)

    @property
    def moe(self) -> MoELoraModel:
        return find_moe(self.model)

    def _fit_to_model(self, arguments: MoEAdaptersArguments) -> MoEAdaptersArguments:
        """`arguments` with the model's adapter settings. A setting given that differs from the model's could not
        take effect, and a freeze beyond the model's experts would freeze whole banks: both are refused."""
        config = self.moe.moe_config
        differ = [name for name in NEW_ADAPTER if getattr(arguments, name) not in (None, getattr(config, name))]
        if differ:
            raise ValueError(
                f"MoEAdaptersArguments has {', '.join(f'{n}={getattr(arguments, n)!r}' for n in differ)} but the "
                f"model's adapter has {', '.join(f'{n}={getattr(config, n)!r}' for n in differ)}: a model given to "
                "MoEAdapters keeps its own settings. Leave them None (the model's), or build the model with "
                "MoELoraConfig(...) set as wanted (MoEAdapters.from_base does it from these arguments)."
            )
        smallest = min(slots["total"] for slots in self.moe.expert_slots().values())
        freeze = arguments.freeze_experts_per_task
        if freeze is not None and freeze > smallest:
            raise ValueError(f"freeze_experts_per_task={freeze} is more than the {smallest} experts of this model's "
                             f"smallest bank: one task would freeze every expert it used. Give at most {smallest} (0 "
                             f"disables freezing, None freezes top_k={config.top_k}).")
        return dataclasses.replace(arguments, **{name: getattr(config, name) for name in NEW_ADAPTER})

    @property
    def selects_routes(self) -> bool:
        selector = self.moe.selector
        return self.ddas.ddas or (selector is not None and selector.has_reference)

    # ----- the task loop -------------------------------------------------------------------------------------------
    def begin_sequence(self, trainer, tasks) -> None:
        if self.ddas.ddas and self.arguments.shared_router:
            raise ValueError("DDAS needs one router per task: it cannot be used with shared_router=True.")
        if self.ddas.ddas and (self.ddas_reference is None or len(self.ddas_reference) == 0):
            raise ValueError(
                "DDAS needs reference images: pass `ddas_reference=` (a dataset with an `image` column, e.g. Tiny "
                "ImageNet; the shared assets have reference/tinyimagenet-ref) to MoEAdapters."
            )
        if self.ddas.ddas and self.ddas.ddas_feature_extractor == "alexnet" and self._alexnet is None:
            # loaded (downloaded) now, so a missing file or network fails before the first task trains
            try:
                self._alexnet = AlexNetFeatures(self.ddas.ddas_alexnet_weights).to(trainer.args.device)
            except OSError as error:
                raise OSError(f"The DDAS AlexNet weights (ddas_alexnet_weights={self.ddas.ddas_alexnet_weights!r}) "
                              f"cannot be loaded: {error}. Download the file where there is a network and pass its "
                              "path as ddas_alexnet_weights.") from error
        if self.ddas.ddas:
            self.check_calibration(tasks)
        self._sequence = list(tasks)
        if self.arguments.shared_router:
            if self.arguments.expert_growth_threshold is not None:
                raise ValueError("Expert growth needs one router per task (it grows before each new task's router "
                                 "trains): it cannot be used with shared_router=True.")
            return
        moe = self.moe
        if self.arguments.expert_growth_threshold is not None:  # given for this run: saved with the adapter
            moe.moe_config.expert_growth_threshold = self.arguments.expert_growth_threshold
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
                "again with new routers of their own; the learned routers stay as they are."
            )
        if learned:
            logger.info("Continuing a model that learned %d task(s) %s: the new tasks get routers %d to %d.",
                        len(learned), learned, len(learned), len(learned) + len(tasks) - 1)
        self.first_route = len(learned)
        while moe.num_tasks < self.first_route + len(tasks):
            moe.add_task()

    def task_route(self, index: int) -> int:
        return 0 if self.arguments.shared_router else self.first_route + index

    def route_count(self, tasks) -> int:
        return self.moe.num_tasks

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "ddas": jsonable(self.ddas)}

    def begin_task(self, trainer, index, task) -> None:
        self.current_route = self.task_route(index)
        if not self.arguments.shared_router:
            added = self.moe.grow_experts(self.current_route) if trainer.args.max_steps != 0 else {}
            if added:
                logger.info("Task %s: %d layer(s) grew by %d expert(s) in all (trainable share below %.2f).",
                            task.name, len(added), sum(added.values()), self.moe.moe_config.expert_growth_threshold)
            self.expert_growth.append(added)  # nothing unless the adapter grows
        self.moe.set_task(self.current_route)

    def extra_loss(self):
        return self.moe.aux_loss()

    def callbacks(self):
        return [self._merging] if self._merging is not None else []

    def end_task(self, trainer, index, task) -> None:
        moe, route, arguments = self.moe, self.current_route, self.arguments
        self.current_route = None
        if trainer.args.max_steps != 0 and not arguments.shared_router:
            moe.set_selection_counts(route, global_selection_counts(moe, route))
            if arguments.freeze_policy == "coverage":
                used = self.evaluation_selections(trainer, route, task, arguments.freeze_images)
                moe.freeze_covering(route, used, arguments.freeze_coverage)
            elif arguments.freeze_experts_per_task is None or arguments.freeze_experts_per_task > 0:
                moe.freeze_most_selected(route, arguments.freeze_experts_per_task)
        if arguments.shared_router:
            return
        moe.set_task_info(route, task.name, task.classnames, task.templates)
        if self.ddas.ddas or (moe.selector is not None and moe.selector.has_reference):
            self._fit_selector(trainer, route, task)  # a continued model's selector learns the new tasks too
        self.expert_slots.append(self._slots_by_tower())
        if arguments.routing_report:
            self.trainable_experts.append(self._trainable_share())
            learned = range(self.first_route, route + 1)
            self.routing_reports.append({self._sequence[r - self.first_route].name:
                                         self._leak(trainer, r, self._sequence[r - self.first_route])
                                         for r in learned})

    @torch.no_grad()
    def evaluation_selections(self, trainer, route: int, task, max_images: Optional[int] = None
                              ) -> dict[str, torch.Tensor]:
        """Per layer, how often each expert is chosen when `route` classifies `task`'s training images (a seeded
        sample of `max_images`, or all) and encodes its prompts, as at evaluation: no noise, no augmentation."""
        dataset = task.train_dataset
        if max_images is not None and len(dataset) > max_images:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(trainer.args.seed))
            dataset = dataset.select(sorted(order[:max_images].tolist()))
        selections: dict = {}
        self.model.eval()
        device = trainer.args.device
        with self.moe.routing(route, selections=selections):
            for batch in trainer.progress(trainer.get_eval_dataloader(dataset), f"routing of {task.name}"):
                self.model.get_image_features(pixel_values=batch["pixel_values"].to(device))
            text_embeddings(self.model, trainer.processing_class.tokenizer, task.classnames, task.templates, device)
        return self.moe.selection_histogram(selections)

    def _leak(self, trainer, route: int, task) -> dict:
        """Shares of `task`'s evaluation-time selections on experts that are still trainable (later tasks can move
        them) and on experts it did not freeze itself, per tower and per layer."""
        used = self.evaluation_selections(trainer, route, task, self.arguments.routing_report_images)
        frozen_by = {name: layer.moe_lora_frozen_by[self.moe._adapter()].cpu()
                     for name, layer in self.moe.moe_layers().items()}
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

    def _trainable_share(self) -> dict[str, float]:
        """Per tower, the share of expert slots (layers x experts) no task has frozen: what later tasks can still
        train, the price of a freeze policy."""
        flags: dict[str, list] = {}
        for name, layer in self.moe.moe_layers().items():
            flags.setdefault(tower_of(name), []).append(layer.moe_lora_frozen_by[self.moe._adapter()] < 0)
        return {tower: float(torch.cat(values).float().mean()) for tower, values in flags.items()}

    def _slots_by_tower(self) -> dict[str, dict[str, int]]:
        """Per tower, the expert slots (layers x experts) and those frozen by no task."""
        slots: dict[str, dict[str, int]] = {}
        for name, layer_slots in self.moe.expert_slots().items():
            tower = slots.setdefault(tower_of(name), {"total": 0, "trainable": 0})
            tower["total"] += layer_slots["total"]
            tower["trainable"] += layer_slots["trainable"]
        return slots

    def diagnostics(self) -> dict:
        result = {"expert_slots": self.expert_slots, "expert_growth": self.expert_growth} if self.expert_slots else {}
        if self.routing_reports:
            result.update(routing_report=self.routing_reports, trainable_experts=self.trainable_experts)
        return result

    def restore_diagnostics(self, diagnostics: dict) -> None:
        self.routing_reports = list(diagnostics.get("routing_report", []))
        self.trainable_experts = list(diagnostics.get("trainable_experts", []))
        self.expert_slots = list(diagnostics.get("expert_slots", []))
        self.expert_growth = list(diagnostics.get("expert_growth", []))

    # ----- classification ------------------------------------------------------------------------------------------
    def routed(self, route: Union[int, torch.Tensor]):
        return self.moe.routing(route)

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
                f"{moe.num_tasks}."
            )
        if saved.selector is not None and moe.selector is None:
            moe.enable_selector(saved.selector)
        moe.grow_to(saved.experts_per_module)  # a grown bank: its shapes before its weights
        moe.moe_config.task_info = saved.task_info
        path = Path(folder) / "adapter_model.safetensors"
        check_safetensors_file(path)
        try:
            set_peft_model_state_dict(self.model, load_file(path))
        except ValueError as error:  # the checks of MoELoraModel's loader, which does not know the file
            raise ValueError(f"{path}: {error}") from None

