"""Continual full fine-tuning: one CLIP fine-tuned on every task in turn (the forgetting baseline)."""

from __future__ import annotations

from .registry import register_method
from .base import ContinualMethod


@register_method
class ContinualFineTune(ContinualMethod):
    """Every parameter trains on each task in order; unseen tasks are classified by the current model."""

    name = "full-finetune"

    def unseen_route(self, index: int) -> int:
        return index  # one model serves every route: the current one
