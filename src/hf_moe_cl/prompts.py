"""Class-name prompts through CLIP's text tower: the classifier weights of zero-shot and task-aware CLIP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    max_length = getattr(tokenizer, "model_max_length", None)
    truncate = isinstance(max_length, int) and max_length < 10_000
    return dict(tokenizer(prompts, padding=True, truncation=truncate, return_tensors="pt"))


@torch.no_grad()
def class_text_features(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """(classes, dim) unit-norm text features, each the normalised mean over the prompt templates."""
    total = None
    for template in templates:
        tokens = tokenize_prompts(tokenizer, [template.format(name) for name in classnames])
        tokens = {k: v.to(device) for k, v in tokens.items()}
        features = F.normalize(model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        total = features if total is None else total + features
    return F.normalize(total, dim=-1)
