"""Task-agnostic image classification: images in, labels out, with DDAS choosing each image's task router."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .collator import to_rgb
from .ddas import selector_features
from .prompts import class_text_features
from .tuners.moe_lora.model import find_moe


class TaskAgnosticClassifier:
    """Classify images without a task id.

    Each image goes where DDAS sends it: an image of a seen task is classified among that task's class names
    through its router; an image DDAS does not recognise goes to the untouched CLIP and is classified among the
    `candidate_labels` the caller gives. One forward pass per batch (per-sample routing), no loop over images.
    """

    def __init__(self, model, processor, feature_extractor=None):
        moe = find_moe(model)
        if moe is None or moe.selector is None:
            raise ValueError("TaskAgnosticClassifier needs a MoE-LoRA model with a DDAS selector "
                             "(train with ContinualTrainer(args.ddas=True) or attach_selector()).")
        info = moe.peft_config[moe._adapter()].task_info or []
        trained = [t for t in range(moe.selector.num_tasks) if bool(moe.selector.trained[t + 1])]
        missing = [t for t in trained if t >= len(info) or not info[t] or not info[t].get("classnames")]
        if missing:
            raise ValueError(f"Tasks {missing} have no class names in the adapter config (`task_info`); "
                             "save the adapter from ContinualTrainer or set config.task_info.")
        self.model, self.processor, self.moe = model, processor, moe
        self.selector, self.feature_extractor = moe.selector, feature_extractor
        self.tasks = {t: info[t] for t in trained}
        self.device = next(model.parameters()).device
        model.eval()
        self._task_text = {}
        self._candidate_text: dict[tuple, torch.Tensor] = {}
        for task, description in self.tasks.items():
            with moe.routing(task):
                self._task_text[task] = class_text_features(
                    model, processor.tokenizer, description["classnames"], description["templates"], self.device
                )

    def _zero_shot_text(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        if (labels, templates) not in self._candidate_text:
            with self.moe.routing(None):
                self._candidate_text[(labels, templates)] = class_text_features(
                    self.model, self.processor.tokenizer, list(labels), list(templates), self.device
                )
        return self._candidate_text[(labels, templates)]

    @classmethod
    def from_pretrained(cls, base_model_name_or_path: str, adapter_name_or_path: str, **kwargs):
        """Base CLIP + a published adapter folder or Hub repo that carries its DDAS selector."""
        from peft import PeftModel
        from transformers import CLIPModel, CLIPProcessor

        base = CLIPModel.from_pretrained(base_model_name_or_path, **kwargs)
        model = PeftModel.from_pretrained(base, adapter_name_or_path)
        return cls(model, CLIPProcessor.from_pretrained(base_model_name_or_path))

    def __call__(self, images: Sequence[Any], candidate_labels: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = ("a photo of a {}.",)) -> list[dict]:
        """One dict per image: `label`, `score` (softmax over the label set used) and `task` (None: zero-shot)."""
        if len(images) == 0:
            return []
        pixels = self.processor.image_processor(images=[to_rgb(image) for image in images],
                                                return_tensors="pt")["pixel_values"]
        return self.classify(pixels, candidate_labels, templates)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, candidate_labels: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = ("a photo of a {}.",)) -> list[dict]:
        """As `__call__`, for a batch of CLIP pixel values."""
        pixels = pixels.to(self.device)
        features = selector_features(self.selector, self.model, pixels, self.feature_extractor)
        routes = self.selector.select(features)
        with self.moe.routing(routes):
            image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        scale = self.model.logit_scale.exp().float()
        results: list[Optional[dict]] = [None] * pixels.shape[0]
        for route in routes.unique().tolist():
            chosen = torch.nonzero(routes == route).flatten()
            if route >= 0:
                text, names, task = self._task_text[route], self.tasks[route]["classnames"], self.tasks[route]["name"]
            else:
                if not candidate_labels:
                    raise ValueError(f"{chosen.numel()} image(s) are not from any task this model learned; pass "
                                     "`candidate_labels` to classify them with zero-shot CLIP.")
                text = self._zero_shot_text(tuple(candidate_labels), tuple(templates))
                names, task = list(candidate_labels), None
            probabilities = torch.softmax(scale * image[chosen] @ text.T, dim=-1)
            scores, labels = probabilities.max(-1)
            for position, label, score in zip(chosen.tolist(), labels.tolist(), scores.tolist()):
                results[position] = {"label": names[label], "score": score, "task": task}
        return results
