"""ConDU as a continual learner in the same harness as MoE-Adapters: train, unify, evaluate, vote."""

from __future__ import annotations

import copy
import dataclasses
import re
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from .condu import Delta, DeltaStore
from .prompts import class_text_features
from .tasks import ContinualTask
from .trainer import ContinualResult, ContinualTrainer, ContinualTrainingArguments


@contextmanager
def applied_delta(model, delta: Delta):
    """Run `model` as pretrained + delta; the pretrained tensors are restored exactly afterwards."""
    saved = {}
    try:
        with torch.no_grad():
            for name, value in delta.items():
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


class ConDULearner:
    """Per task: fine-tune from the pretrained CLIP (peft LoRA, merged, or full fine-tuning of `full_modules`),
    take the delta, unify it with the earlier ones, and keep only the unified delta, triggers and prototypes."""

    def __init__(self, base, processor, args: ContinualTrainingArguments, fine_tune: str = "lora", rank: int = 16,
                 lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), full_modules: str = r".*encoder\.layers.*",
                 top_k_tasks: int = 4, weighting: str = "uniform"):
        if fine_tune not in ("lora", "full"):
            raise ValueError(f"fine_tune must be 'lora' or 'full', got {fine_tune!r}.")
        if weighting not in ("uniform", "similarity"):
            raise ValueError(f"weighting must be 'uniform' (official) or 'similarity', got {weighting!r}.")
        self.base, self.processor, self.args = base.eval(), processor, args
        self.fine_tune, self.rank, self.lora_targets, self.full_modules = fine_tune, rank, lora_targets, full_modules
        self.top_k_tasks, self.weighting = top_k_tasks, weighting
        self.store = DeltaStore()
        self.evaluator = ContinualTrainer(model=self.base, args=dataclasses.replace(args, max_steps=0),
                                          processing_class=processor)
        self.device = self.evaluator.args.device

    # ----- training ------------------------------------------------------------------------------------------------
    def delta_tensor_names(self) -> list[str]:
        """The tensors a task may change: the LoRA-targeted weights, or every parameter under `full_modules`."""
        if self.fine_tune == "lora":
            return [f"{name}.weight" for name, module in self.base.named_modules()
                    if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in self.lora_targets]
        pattern = re.compile(self.full_modules)
        return [name for name, _ in self.base.named_parameters() if pattern.fullmatch(name)]

    def _fine_tune(self, index: int, task: ContinualTask) -> Delta:
        names = self.delta_tensor_names()
        if not names:
            raise ValueError("No tensor of the model matches the ConDU targets; check lora_targets / full_modules.")
        model = copy.deepcopy(self.base)
        if self.fine_tune == "lora":
            model = get_peft_model(model, LoraConfig(r=self.rank, lora_alpha=self.rank,
                                                     target_modules=list(self.lora_targets)))
        else:
            chosen = set(names)
            for name, param in model.named_parameters():
                param.requires_grad_(name in chosen)
        args = dataclasses.replace(self.args, output_dir=f"{self.args.output_dir}/condu-{task.name}",
                                   save_task_checkpoints=False, seed=self.args.seed + index,
                                   task_learning_rates=None, ddas=False, task_agnostic_eval=False)
        ContinualTrainer(model=model, args=args, processing_class=self.processor).train_tasks([task])
        tuned = (model.merge_and_unload() if self.fine_tune == "lora" else model).state_dict()
        pretrained = self.base.state_dict()
        return {name: (tuned[name] - pretrained[name]).float().cpu() for name in names}

    @torch.no_grad()
    def _prototypes(self, task: ContinualTask) -> dict[str, torch.Tensor]:
        """Per class: the normalised mean of the pretrained CLIP's normalised image features, and its text feature."""
        features, labels = [], []
        for batch in self.evaluator.get_eval_dataloader(task.train_dataset):
            image = self.base.get_image_features(pixel_values=batch["pixel_values"].to(self.device)).pooler_output
            features.append(F.normalize(image.float(), dim=-1))
            labels.append(batch["labels"].to(self.device))
        features, labels = torch.cat(features), torch.cat(labels)
        sums = torch.zeros(len(task.classnames), features.shape[-1], device=self.device).index_add(0, labels, features)
        image = F.normalize(sums, dim=-1)
        text = class_text_features(self.base, self.processor.tokenizer, task.classnames, task.templates, self.device)
        return {"image": image.cpu(), "text": text.cpu()}

    def learn(self, index: int, task: ContinualTask) -> None:
        task.validate()
        self.store.add_task(self._fine_tune(index, task), self._prototypes(task), name=task.name)

    # ----- inference -----------------------------------------------------------------------------------------------
    def evaluate_task_aware(self, task: ContinualTask, task_id: Optional[int]) -> float:
        if task_id is None:
            return self.evaluator.evaluate_task(task, route=None)
        with applied_delta(self.base, self.store.task_delta(task_id)):
            return self.evaluator.evaluate_task(task, route=None)

    @torch.no_grad()
    def vote(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the top-K tasks by best prototype similarity, and their similarities."""
        scores = torch.stack([
            (image_features @ p["image"].to(self.device).T).amax(-1) for p in self.store.prototypes
        ], dim=-1)
        k = min(self.top_k_tasks, self.store.num_tasks)
        return scores.topk(k, dim=-1)

    @torch.no_grad()
    def evaluate_task_agnostic(self, task: ContinualTask) -> tuple[float, float]:
        """(accuracy, % of images whose best-voted task is `task` itself, or -1.0 while `task` is unseen).

        The prediction averages the softmax of the pretrained model and of the top-K voted task models: each gets
        1/(K+1) (`uniform`, the official code), or the task models share K/(K+1) by the softmax of their prototype
        similarity (`similarity`). The loop runs over the tasks voted for, not over images.
        """
        names = self.store.task_names
        own = names.index(task.name) if task.name in names else None
        scale = self.base.logit_scale.exp().float()
        text_by_model: dict[Optional[int], torch.Tensor] = {}
        deltas: dict[int, Delta] = {}

        def delta_of(task_id: int) -> Delta:
            if task_id not in deltas:
                deltas[task_id] = self.store.task_delta(task_id)
            return deltas[task_id]

        def text_of(task_id: Optional[int]) -> torch.Tensor:
            if task_id not in text_by_model:
                delta = delta_of(task_id) if task_id is not None else None
                with applied_delta(self.base, delta) if delta is not None else nullcontext():
                    text_by_model[task_id] = class_text_features(
                        self.base, self.processor.tokenizer, task.classnames, task.templates, self.device
                    )
            return text_by_model[task_id]

        correct = total = identified = 0
        for batch in self.evaluator.get_eval_dataloader(task.eval_dataset):
            pixels, labels = batch["pixel_values"].to(self.device), batch["labels"].to(self.device)
            pretrained = F.normalize(self.base.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
            similarity, voted = self.vote(pretrained)
            k = voted.shape[1]
            if self.weighting == "uniform":
                weights = torch.full_like(similarity, 1.0 / (k + 1))
            else:
                weights = torch.softmax(similarity, dim=-1) * k / (k + 1)
            probabilities = torch.softmax(scale * pretrained @ text_of(None).T, dim=-1) / (k + 1)
            for task_id in voted.unique().tolist():
                rows, slot = torch.nonzero(voted == task_id, as_tuple=True)
                with applied_delta(self.base, delta_of(task_id)):
                    image = self.base.get_image_features(pixel_values=pixels[rows]).pooler_output
                image = F.normalize(image.float(), dim=-1)
                contribution = torch.softmax(scale * image @ text_of(task_id).T, dim=-1)
                probabilities.index_add_(0, rows, contribution * weights[rows, slot].unsqueeze(-1))
            correct += int((probabilities.argmax(-1) == labels).sum())
            total += labels.numel()
            if own is not None:
                identified += int((voted[:, 0] == own).sum())
        return 100.0 * correct / total, (100.0 * identified / total if own is not None else -1.0)

    def save_pretrained(self, folder: str) -> None:
        """Unified delta, packed masks, rescalers and prototypes (condu.safetensors + condu_config.json)."""
        self.store.save_pretrained(folder, model_fingerprint(self.base))

    def load_triggers(self, folder: str) -> None:
        """Load task triggers saved for this base model (another model's file is a clear error)."""
        self.store = DeltaStore.from_pretrained(folder, model_fingerprint(self.base))

    def run(self, tasks: list[ContinualTask]) -> ContinualResult:
        """Learn the tasks in order: task-aware and task-agnostic matrices and, after the last task, the voting's
        task-identification accuracy per task."""
        names = [t.name for t in tasks]
        aware, agnostic, identification = [], [], []
        for index, task in enumerate(tasks):
            self.learn(index, task)
            aware.append([self.evaluate_task_aware(other, j if j <= index else None) for j, other in enumerate(tasks)])
            evaluated = [self.evaluate_task_agnostic(other) for other in tasks]
            agnostic.append([accuracy for accuracy, _ in evaluated])
            identification = [share for _, share in evaluated]
        return ContinualResult(names, aware, task_agnostic_matrix=agnostic, task_identification=identification)
