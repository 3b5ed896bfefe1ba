"""Continual learning of CLIP: tasks, data, the `ContinualTrainer` task loop, evaluation and the methods."""

from .arguments import ContinualTrainingArguments
from .preprocessing import ImageClassificationCollator, to_rgb
from .methods import METHODS, ContinualMethod, get_method, method_for_model, register_method
from .result import ContinualResult
from .tasks import ContinualTask
from .trainer import ContinualTrainer

__all__ = ["METHODS", "ContinualMethod", "ContinualResult", "ContinualTask", "ContinualTrainer",
           "ContinualTrainingArguments", "ImageClassificationCollator", "get_method", "method_for_model",
           "register_method", "to_rgb"]
