"""ConDU (Gao et al.) as a continual method: per task a fine-tune from the pretrained CLIP whose delta is unified
with the earlier ones; classification with a task id rebuilds that task's delta, without one it votes by class
prototypes."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model

from ...classification import ZERO_SHOT, Routes, image_embeddings, text_embeddings
from ...condu import Delta, DeltaStore, applied_delta, model_fingerprint
from .registry import register_method
from .base import ContinualMethod


@dataclass
class ConDUArguments:
    condu_fine_tune: str = field(default="lora", metadata={"help": "ConDU: per-task 'lora' or 'full' fine-tuning."})
    condu_lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "ConDU: LoRA target modules."})
    condu_full_modules: str = field(
        default=r".*encoder\.layers.*", metadata={"help": "ConDU full fine-tuning: parameters that train (regex)."}
    )
    condu_top_k: int = field(default=4, metadata={"help": "ConDU: tasks voted for per image without a task id."})
    condu_weighting: str = field(
        default="uniform", metadata={"help": "ConDU: 'uniform' averaging (official) or 'similarity'-weighted."}
    )

    def __post_init__(self):
        if self.condu_fine_tune not in ("lora", "full"):
            raise ValueError(f"condu_fine_tune must be 'lora' or 'full', got {self.condu_fine_tune!r}.")
        if self.condu_weighting not in ("uniform", "similarity"):
            raise ValueError(f"condu_weighting must be 'uniform' (official) or 'similarity', got "
                             f"{self.condu_weighting!r}.")
        if self.condu_top_k < 1:
            raise ValueError(f"condu_top_k must be positive, got {self.condu_top_k}.")

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.condu_lora_targets.split(",") if t.strip())


@register_method
class ConDU(ContinualMethod):
    """`model` stays the pretrained CLIP; a task's model is it plus the task's rebuilt delta (`applied_delta`
    adds it and restores the pretrained tensors exactly afterwards)."""

    name = "condu"
    arguments_class = ConDUArguments
    selects_routes = True

    def __init__(self, model, arguments: Optional[ConDUArguments] = None, rank: int = 64):
        super().__init__(model.eval(), arguments)
        self.rank = rank
        self.store = DeltaStore()
        self._training: Optional[torch.nn.Module] = None
        self._deltas: dict[int, Delta] = {}

    @property
    def recipe(self) -> str:
        return f"condu-{self.arguments.condu_fine_tune}"

    @classmethod
    def from_base(cls, base, options=(), num_tasks=1, rank=64, reference_images=None):
        return cls(copy.deepcopy(base), cls.pick(options, ConDUArguments), rank=rank)

    # ----- the task loop -------------------------------------------------------------------------------------------
    def delta_tensor_names(self) -> list[str]:
        """The tensors a task may change: the LoRA-targeted weights, or every parameter under the full-FT regex."""
        if self.arguments.condu_fine_tune == "lora":
            targets = self.arguments.lora_target_list
            return [f"{name}.weight" for name, module in self.model.named_modules()
                    if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        pattern = re.compile(self.arguments.condu_full_modules)
        return [name for name, _ in self.model.named_parameters() if pattern.fullmatch(name)]

    def begin_sequence(self, trainer, tasks) -> None:
        if not self.delta_tensor_names():
            raise ValueError("No tensor of the model matches the ConDU targets; check condu_lora_targets / "
                             "condu_full_modules.")

    def begin_task(self, trainer, index, task) -> None:
        model = copy.deepcopy(self.model)
        if self.arguments.condu_fine_tune == "lora":
            model = get_peft_model(model, LoraConfig(r=self.rank, lora_alpha=self.rank,
                                                     target_modules=list(self.arguments.lora_target_list)))
        else:
            chosen = set(self.delta_tensor_names())
            for name, param in model.named_parameters():
                param.requires_grad_(name in chosen)
        self._training = model

    def training_model(self):
        return self._training

    def end_task(self, trainer, index, task) -> None:
        model, self._training = self._training, None
        tuned = (model.merge_and_unload() if self.arguments.condu_fine_tune == "lora" else model).state_dict()
        pretrained = self.model.state_dict()
        delta = {name: (tuned[name] - pretrained[name]).float().cpu() for name in self.delta_tensor_names()}
        self.store.add_task(delta, self._prototypes(trainer, task), name=task.name)
        self._deltas = {}

    @torch.no_grad()
    def _prototypes(self, trainer, task) -> dict[str, torch.Tensor]:
        """Per class: the normalised mean of the pretrained CLIP's normalised image features, and its text feature."""
        device = trainer.args.device
        features, labels = [], []
        for batch in trainer.get_eval_dataloader(task.train_dataset):
            features.append(image_embeddings(self.model, batch["pixel_values"].to(device)))
            labels.append(batch["labels"].to(device))
        features, labels = torch.cat(features), torch.cat(labels)
        sums = torch.zeros(len(task.classnames), features.shape[-1], device=device).index_add(0, labels, features)
        text = text_embeddings(self.model, trainer.processing_class.tokenizer, task.classnames, task.templates, device)
        return {"image": torch.nn.functional.normalize(sums, dim=-1).cpu(), "text": text.cpu()}

    # ----- classification ------------------------------------------------------------------------------------------
    def task_delta(self, task: int) -> Delta:
        if task not in self._deltas:
            self._deltas[task] = self.store.task_delta(task)
        return self._deltas[task]

    def routed(self, route: int):
        return applied_delta(self.model, None if route == ZERO_SHOT else self.task_delta(route))

    @torch.no_grad()
    def vote(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the top-K tasks by best prototype similarity, and their similarities."""
        scores = torch.stack([
            (image_features @ p["image"].to(image_features.device).T).amax(-1) for p in self.store.prototypes
        ], dim=-1)
        top = scores.topk(min(self.arguments.condu_top_k, scores.shape[-1]), dim=-1)
        return top.values, top.indices

    def select_routes(self, classifier, pixels, per_batch=False):
        """The pretrained model and the top-K voted task models, their softmax outputs averaged: uniformly (1/(K+1)
        each, the official code) or with the task models sharing K/(K+1) by the softmax of their similarity."""
        if per_batch:
            raise NotImplementedError("ConDU votes per image; it has no per-batch decision.")
        pretrained = image_embeddings(self.model, pixels)
        similarity, voted = self.vote(pretrained)
        k = voted.shape[1]
        if self.arguments.condu_weighting == "uniform":
            task_weights = torch.full_like(similarity, 1.0 / (k + 1))
        else:
            task_weights = torch.softmax(similarity, dim=-1) * k / (k + 1)
        ids = torch.cat([torch.full_like(voted[:, :1], ZERO_SHOT), voted], dim=1)
        weights = torch.cat([torch.full_like(similarity[:, :1], 1.0 / (k + 1)), task_weights], dim=1)
        return Routes(ids, weights, fusion="probabilities", selected=voted[:, 0]), pretrained

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Unified delta, packed masks, rescalers and prototypes (condu.safetensors + condu_config.json)."""
        self.store.save_pretrained(str(folder), model_fingerprint(self.model))

    def load(self, folder: Path) -> None:
        """Task triggers saved for this base model (another model's file is a clear error)."""
        self.store = DeltaStore.from_pretrained(str(folder), model_fingerprint(self.model))
        self._deltas = {}
