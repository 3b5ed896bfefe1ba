"""`ContinualTrainer`: the HF `Trainer` run over a sequence of tasks, with activate-freeze and an accuracy matrix."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .collator import ImageClassificationCollator
from .ddas import DistributionSelector, clip_image_features, selector_features
from .metrics import mtil_metrics
from .prompts import class_text_features, tokenize_prompts
from .safetensors_files import check_safetensors_file
from .tasks import ContinualTask
from .tuners.moe_lora import MoELoraConfig, MoELoraModel
from .tuners.moe_lora.model import find_moe, tower_of

PROGRESS_FILE = "continual_progress.json"


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """`TrainingArguments` with MoE-Adapters' per-task defaults and the continual-learning options."""

    max_steps: int = field(default=1000, metadata={"help": "Training steps per task (paper: 1000)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of tasks without their own."})
    warmup_steps: float = field(default=100, metadata={"help": "Linear warmup steps of every task's schedule."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of every task (paper: cosine)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    label_smoothing_factor: float = field(default=0.2, metadata={"help": "Label smoothing (paper: 0.2)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device (paper: 64)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `image`/`label` for the collator."})
    save_strategy: str = field(default="no", metadata={"help": "Mid-task checkpoints; tasks are saved anyway."})
    ddp_broadcast_buffers: Optional[bool] = field(
        default=False,
        metadata={"help": "Keep per-rank expert-selection counts; they are all-reduced before freezing/merging."},
    )
    task_learning_rates: Optional[list[float]] = field(
        default=None, metadata={"help": "One learning rate per task, overriding `learning_rate`."}
    )
    freeze_experts_per_task: Optional[int] = field(
        default=None,
        metadata={"help": "Activate-freeze: experts frozen per layer after each task (default top_k; 0 disables)."},
    )
    merge_experts_every: int = field(
        default=0, metadata={"help": "Expert merging every N steps of a task (seed paper: 100); 0 disables."}
    )
    train_template: int = field(default=0, metadata={"help": "Prompt template used in training (paper: 0)."})
    shared_router: bool = field(
        default=False,
        metadata={"help": "Route every task through router 0 and never freeze (the paper's class-incremental setup)."},
    )
    evaluate_all_tasks: bool = field(
        default=True,
        metadata={"help": "After each task evaluate every task (accuracy matrix); False evaluates only that task."},
    )
    save_task_checkpoints: bool = field(
        default=True, metadata={"help": "Save the model and the matrix so far after every task (needed to resume)."}
    )
    ddas: bool = field(
        default=False,
        metadata={"help": "Train a DDAS selector (MoE-LoRA): a reference autoencoder once, one per task after it."},
    )
    ddas_feature_layer: Optional[int] = field(
        default=None,
        metadata={"help": "DDAS features: None = the untouched CLIP's image embedding; k = tokens after k blocks."},
    )
    ddas_hidden_dim: int = field(default=100, metadata={"help": "Hidden width of every DDAS autoencoder."})
    ddas_task_steps: int = field(default=300, metadata={"help": "Training steps of each task autoencoder."})
    ddas_reference_steps: int = field(default=1000, metadata={"help": "Training steps of the reference one."})
    ddas_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoders."})
    ddas_threshold: Optional[float] = field(
        default=None, metadata={"help": "Fixed zero-shot threshold; None calibrates one per task on held-out data."}
    )
    ddas_quantile: float = field(
        default=0.95, metadata={"help": "Calibrated threshold: this quantile of held-out in-task errors."}
    )
    ddas_max_images: int = field(default=2000, metadata={"help": "Images per task used to fit its autoencoder."})
    task_agnostic_eval: bool = field(
        default=False,
        metadata={"help": "Also fill a task-agnostic accuracy matrix: DDAS picks every image's router."},
    )


@dataclass
class ContinualResult:
    task_names: list[str]
    accuracy_matrix: list[list[Optional[float]]]
    task_agnostic_matrix: Optional[list[list[float]]] = None
    # per stage, per evaluated task: how many images DDAS sent to [zero-shot, task 0, task 1, ...]
    task_selection: Optional[list[list[list[int]]]] = None
    # ConDU after the last task: per task, % of its images whose best-voted task is the task itself
    task_identification: Optional[list[float]] = None

    @property
    def metrics(self) -> dict[str, float]:
        return mtil_metrics(self.accuracy_matrix)


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

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"Expert merging needs a positive period, got {every}.")
        self.every = every
        self.merges = 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        moe = find_moe(model)
        task = moe.active_task if moe is not None else None
        if task is None or state.global_step % self.every:
            return
        counts = global_selection_counts(moe, task)
        merged = moe.merge_experts(task, optimizer=optimizer, counts=counts)
        self.merges += bool(merged)


class ContinualTrainer(Trainer):
    """Trains a CLIP model (MoE-LoRA, peft LoRA or plain) on tasks in order and fills the accuracy matrix.

    Loss: cross-entropy of `logit_scale.exp() * image_features @ text_features.T` over the current task's class
    names, the text tower run with gradients (template `train_template`). Evaluation: text features averaged over
    all templates; seen tasks through their router, unseen tasks through the zero-shot path (MoE-LoRA only).
    `processing_class` is a `CLIPProcessor` (tokenizer + image processor).
    """

    def __init__(self, model=None, args: Optional[ContinualTrainingArguments] = None, processing_class=None,
                 ddas_reference: Optional[Dataset] = None, **kwargs):
        if processing_class is None or not hasattr(processing_class, "tokenizer"):
            raise ValueError("ContinualTrainer needs `processing_class=CLIPProcessor(...)` (tokenizer + image processor).")
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = ImageClassificationCollator(processing_class.image_processor)
        args = args if args is not None else ContinualTrainingArguments(output_dir="continual_output")
        if not isinstance(args, ContinualTrainingArguments):
            raise ValueError("ContinualTrainer needs `args` of type ContinualTrainingArguments.")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if args.merge_experts_every > 0:
            callbacks.append(ExpertMergingCallback(args.merge_experts_every))
        super().__init__(model=model, args=args, processing_class=processing_class, callbacks=callbacks, **kwargs)
        self.current_task: Optional[ContinualTask] = None
        self._prompt_tokens: Optional[dict[str, torch.Tensor]] = None
        self.ddas_reference = ddas_reference

    # ----- loss ----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = {k: v.to(inputs["pixel_values"].device) for k, v in self._prompt_tokens.items()}
        outputs = model(pixel_values=inputs["pixel_values"], **tokens)
        loss = F.cross_entropy(
            outputs.logits_per_image.float(), inputs["labels"], label_smoothing=self.args.label_smoothing_factor
        )
        moe = find_moe(self.model)
        aux = moe.aux_loss() if moe is not None else None
        if aux is not None:
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    # ----- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_task(self, task: ContinualTask, route: Optional[int]) -> float:
        """Top-1 accuracy (%) on the task's eval set; `route` is the task router (None: zero-shot / plain model)."""
        model = self.model
        model.eval()
        moe = find_moe(model)
        device = self.args.device
        context = moe.routing(route) if moe is not None else nullcontext()
        with context:
            text = class_text_features(model, self.processing_class.tokenizer, task.classnames, task.templates, device)
            correct = total = 0
            for batch in self.get_eval_dataloader(task.eval_dataset):
                image = model.get_image_features(pixel_values=batch["pixel_values"].to(device)).pooler_output
                predictions = (F.normalize(image.float(), dim=-1) @ text.T).argmax(-1)
                predictions, labels = self.accelerator.gather_for_metrics((predictions, batch["labels"].to(device)))
                correct += int((predictions == labels).sum())
                total += labels.numel()
        return 100.0 * correct / total

    @torch.no_grad()
    def evaluate_task_agnostic(self, task: ContinualTask) -> tuple[float, list[int]]:
        """Accuracy (%) when DDAS picks every image's router, and how many images went to [zero-shot, task 0, ...].

        Images are classified among the task's class names, the text encoded through the router DDAS chose.
        """
        model = self.model
        model.eval()
        moe = find_moe(model)
        selector = moe.selector
        device = self.args.device
        text_by_route: dict[int, torch.Tensor] = {}
        correct = total = 0
        selected = torch.zeros(selector.num_tasks + 1, dtype=torch.long, device=device)
        for batch in self.get_eval_dataloader(task.eval_dataset):
            pixels = batch["pixel_values"].to(device)
            routes = selector.select(selector_features(selector, model, pixels))
            with moe.routing(routes):
                image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
            predictions = torch.empty_like(routes)
            for route in routes.unique().tolist():
                if route not in text_by_route:
                    with moe.routing(route if route >= 0 else None):
                        text_by_route[route] = class_text_features(
                            model, self.processing_class.tokenizer, task.classnames, task.templates, device
                        )
                chosen = routes == route
                predictions[chosen] = (image[chosen] @ text_by_route[route].T).argmax(-1)
            predictions, labels, routes = self.accelerator.gather_for_metrics(
                (predictions, batch["labels"].to(device), routes)
            )
            correct += int((predictions == labels).sum())
            total += labels.numel()
            selected += torch.bincount(routes + 1, minlength=selector.num_tasks + 1)
        return 100.0 * correct / total, selected.tolist()

    # ----- DDAS ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _selector_input(self, dataset: Dataset, extract) -> torch.Tensor:
        """`extract(pixel_values)` features of up to `ddas_max_images` images, gathered from every process."""
        if len(dataset) > self.args.ddas_max_images:
            dataset = dataset.select(range(self.args.ddas_max_images))
        self.model.eval()
        features = []
        for batch in self.get_eval_dataloader(dataset):
            pixels = batch["pixel_values"].to(self.args.device)
            features.append(self.accelerator.gather_for_metrics(extract(pixels)))
        return torch.cat(features)

    def _ensure_selector(self, moe: MoELoraModel):
        if moe.selector is not None and bool(moe.selector.trained[0]):
            return moe.selector
        if self.ddas_reference is None or len(self.ddas_reference) == 0:
            raise ValueError(
                "args.ddas needs reference images: pass `ddas_reference=` (a dataset with an `image` column, e.g. "
                "Tiny ImageNet; the shared assets have reference/tinyimagenet-ref)."
            )
        reference = self.ddas_reference
        if "label" not in reference.column_names:
            reference = reference.add_column("label", [0] * len(reference))
        layer = self.args.ddas_feature_layer
        features = self._selector_input(reference, lambda pixels: clip_image_features(self.model, pixels, layer))
        selector = DistributionSelector(features.shape[-1], moe.num_tasks, hidden_dim=self.args.ddas_hidden_dim,
                                        feature_layer=layer)
        moe.attach_selector(selector)
        selector.fit_reference(features, steps=self.args.ddas_reference_steps, lr=self.args.ddas_learning_rate,
                               seed=self.args.seed)
        return selector

    def _fit_task_selector(self, index: int, task: ContinualTask) -> None:
        selector = self._ensure_selector(find_moe(self.model))
        features = self._selector_input(task.train_dataset,
                                        lambda pixels: selector_features(selector, self.model, pixels))
        selector.fit_task(index, features,
                          steps=self.args.ddas_task_steps, lr=self.args.ddas_learning_rate,
                          threshold=self.args.ddas_threshold, quantile=self.args.ddas_quantile,
                          seed=self.args.seed)

    # ----- the task loop -------------------------------------------------------------------------------------------
    def train_tasks(self, tasks: list[ContinualTask], resume: bool = False) -> ContinualResult:
        """Train the tasks in order; after each: activate-freeze, one accuracy-matrix row, a checkpoint folder.

        With `resume=True`, the last finished task's checkpoint under `output_dir` is loaded and training goes on
        from the next task, giving the same result as an uninterrupted run.
        """
        train = self.args.max_steps > 0
        for task in tasks:
            task.validate(needs_training=train)
        if len({task.name for task in tasks}) != len(tasks):
            raise ValueError("Task names must be unique: they name the checkpoint folders.")
        if self.args.task_learning_rates is not None and len(self.args.task_learning_rates) != len(tasks):
            raise ValueError(
                f"task_learning_rates has {len(self.args.task_learning_rates)} entries for {len(tasks)} tasks."
            )
        moe = find_moe(self.model)
        uses_ddas = self.args.ddas or self.args.task_agnostic_eval
        if uses_ddas and (moe is None or self.args.shared_router):
            raise ValueError("DDAS and task-agnostic evaluation need a MoE-LoRA model with one router per task.")
        if self.args.task_agnostic_eval and not self.args.ddas and moe.selector is None:
            raise ValueError("task_agnostic_eval needs a DDAS selector: set ddas=True (or attach a trained one).")
        if self.args.ddas and (self.ddas_reference is None or len(self.ddas_reference) == 0):
            raise ValueError("ddas=True needs reference images: pass `ddas_reference=` to ContinualTrainer.")
        if moe is not None and not self.args.shared_router:
            while moe.num_tasks < len(tasks):
                moe.add_task()
        names = [task.name for task in tasks]
        matrix: list[list[Optional[float]]] = []
        agnostic: Optional[list] = [] if self.args.task_agnostic_eval else None
        selection: Optional[list] = [] if self.args.task_agnostic_eval else None
        start = 0
        if resume:
            start, matrix, agnostic = self._resume(names)
        for index in range(start, len(tasks)):
            task = tasks[index]
            if train:
                self._train_one_task(index, task)
            if moe is not None and not self.args.shared_router:
                self._record_task_info(moe, index, task)
            if self.args.ddas:
                self._fit_task_selector(index, task)
            row = []
            for j, other in enumerate(tasks):
                if self.args.evaluate_all_tasks or j == index:
                    row.append(self.evaluate_task(other, self._route_for(j, seen=j <= index)))
                else:
                    row.append(None)
            matrix.append(row)
            self.log({f"accuracy/{other}": acc for other, acc in zip(names, row) if acc is not None})
            if agnostic is not None:
                evaluated = [self.evaluate_task_agnostic(other) for other in tasks]
                agnostic.append([accuracy for accuracy, _ in evaluated])
                selection.append([counts for _, counts in evaluated])
                self.log({f"task_agnostic_accuracy/{n}": a for n, a in zip(names, agnostic[-1])})
            if self.args.save_task_checkpoints:
                self._save_task(index, names, matrix, agnostic)
        return ContinualResult(task_names=names, accuracy_matrix=matrix, task_agnostic_matrix=agnostic,
                               task_selection=selection)

    @staticmethod
    def _record_task_info(moe: MoELoraModel, index: int, task: ContinualTask) -> None:
        config = moe.peft_config[moe._adapter()]
        info = list(config.task_info or [])
        info += [None] * (index + 1 - len(info))
        info[index] = {"name": task.name, "classnames": list(task.classnames), "templates": list(task.templates)}
        config.task_info = info

    def _route_for(self, task_index: int, seen: bool) -> Optional[int]:
        if find_moe(self.model) is None or not seen:
            return None
        return 0 if self.args.shared_router else task_index

    def _train_one_task(self, index: int, task: ContinualTask) -> None:
        set_seed(self.args.seed + index)
        self.current_task = task
        moe = find_moe(self.model)
        route = self._route_for(index, seen=True)
        if moe is not None:
            moe.set_task(route)
        template = task.templates[min(self.args.train_template, len(task.templates) - 1)]
        self._prompt_tokens = tokenize_prompts(self.processing_class.tokenizer, task.prompts(template))
        rates = self.args.task_learning_rates
        self.args.learning_rate = rates[index] if rates else (task.learning_rate or self.args.learning_rate)
        self.train_dataset = task.train_dataset
        self.optimizer, self.lr_scheduler = None, None
        self.train()
        if moe is not None and not self.args.shared_router:
            counts = global_selection_counts(moe, route)
            moe.set_selection_counts(route, counts)
            k = self.args.freeze_experts_per_task
            if k is None or k > 0:
                moe.freeze_most_selected(route, k)

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def _task_dir(self, index: int, name: str) -> Path:
        return Path(self.args.output_dir) / f"task-{index:02d}-{name}"

    def _save_task(self, index: int, names: list[str], matrix, agnostic) -> None:
        folder = self._task_dir(index, names[index])
        if self.is_world_process_zero():
            folder.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(folder)
            self.state.save_to_json(str(folder / "trainer_state.json"))
            progress = {"finished_task": index, "task_names": names, "accuracy_matrix": matrix,
                        "task_agnostic_matrix": agnostic}
            (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=1))
        self.accelerator.wait_for_everyone()

    def _resume(self, names: list[str]) -> tuple[int, list]:
        finished = None
        for index, name in enumerate(names):
            if (self._task_dir(index, name) / PROGRESS_FILE).is_file():
                finished = index
        if finished is None:
            return 0, [], [] if self.args.task_agnostic_eval else None
        folder = self._task_dir(finished, names[finished])
        progress = json.loads((folder / PROGRESS_FILE).read_text())
        if progress["task_names"] != names:
            raise ValueError(
                f"Cannot resume from {folder}: it was trained on tasks {progress['task_names']}, not {names}. "
                "Use another output_dir or the same task sequence."
            )
        self._load_weights(folder)
        return finished + 1, progress["accuracy_matrix"], progress.get("task_agnostic_matrix")

    def _load_weights(self, folder: Path) -> None:
        if isinstance(self.model, PeftModel):
            path = folder / "adapter_model.safetensors"
            check_safetensors_file(path)
            set_peft_model_state_dict(self.model, load_file(path))
            moe = find_moe(self.model)
            if moe is not None:  # the selector and task_info travel with the saved config
                saved = MoELoraConfig.from_pretrained(str(folder))
                moe.peft_config[moe._adapter()].task_info = saved.task_info
                if saved._loaded_selector is not None:
                    moe.attach_selector(saved._loaded_selector)
        else:
            state = {}
            for path in sorted(folder.glob("model*.safetensors")):
                check_safetensors_file(path)
                state.update(load_file(path))
            if not state:
                raise FileNotFoundError(f"No model*.safetensors in {folder} to resume from.")
            self.model.load_state_dict(state, strict=False)
