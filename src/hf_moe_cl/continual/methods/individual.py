"""Individual fine-tuning: each task fine-tuned alone from the pretrained CLIP (the upper bound of Last)."""

from __future__ import annotations

import torch

from .registry import register_method
from .base import ContinualMethod


@register_method
class IndividualFineTune(ContinualMethod):
    """Before each task the model is reset to the pretrained weights; a learned task keeps its own model, so its
    accuracy is measured once, right after it trained. Each task trains as a run of its own, with the run's seed."""

    name = "individual-finetune"
    task_models_are_final = True

    def __init__(self, model, arguments=None):
        super().__init__(model, arguments)
        self._pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def task_seed(self, seed: int, index: int) -> int:
        return seed

    def begin_task(self, context, index, task) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self._pretrained)

    def load(self, folder) -> None:
        """A later task starts from the pretrained weights: nothing of a finished task is needed to resume."""
