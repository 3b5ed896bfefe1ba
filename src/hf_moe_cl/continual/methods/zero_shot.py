"""Zero-shot CLIP: the pretrained model on every task, never trained (the lower bound of Transfer's reference)."""

from __future__ import annotations

from ...classification import ZERO_SHOT
from .registry import register_method
from .base import ContinualMethod


@register_method
class ZeroShot(ContinualMethod):
    """The pretrained CLIP as it is: every row of its accuracy matrix is the zero-shot accuracy."""

    name = "zero-shot"
    trains = False
    untouched_is_fixed = True

    def task_route(self, index: int) -> int:
        return ZERO_SHOT  # its model for every task is the pretrained one

    def save(self, folder) -> None:
        """Nothing changes, nothing to save."""

    def load(self, folder) -> None:
        """Nothing was saved."""
