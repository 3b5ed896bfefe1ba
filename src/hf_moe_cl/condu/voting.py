"""ConDU's semantic voting: which learned tasks an image is close to, by class prototypes of the pretrained CLIP.

A task's prototypes are built from two per-class means over its training images and prompt templates: the mean of
the pretrained model's unit image features and the mean of its unit text features. "fused" prototypes are their
normalised average (official `src/models/finetune.py`, after training; the paper's text feature + mean image
feature points the same way, and votes only use directions); "image" prototypes use the image mean alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOTYPE_KINDS = ("fused", "image")


def prototype_vectors(means: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(classes, dim) unit prototypes of one task from its `image_mean` and `text_mean`; a class without images
    falls back to its text mean when fused (as the official code does)."""
    if kind not in PROTOTYPE_KINDS:
        raise ValueError(f"Unknown prototype kind {kind!r}; use one of {PROTOTYPE_KINDS}.")
    vectors = means["image_mean"] + means["text_mean"] if kind == "fused" else means["image_mean"]
    return F.normalize(vectors.float(), dim=-1)


@torch.no_grad()
def vote(image_features: torch.Tensor, prototypes: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the `k` tasks whose closest class prototype is most similar (cosine), best first, and those
    similarities: (batch, k) each."""
    if not prototypes:
        raise ValueError("No learned task to vote for: train ConDU on a task first.")
    scores = torch.stack([(image_features @ p.to(image_features.device).T).amax(-1) for p in prototypes], dim=-1)
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return top.values, top.indices
