"""`ContinualTrainingArguments`: `TrainingArguments` with MoE-Adapters' per-task defaults and the task loop's options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """Every task trains with these settings (a fresh optimiser and schedule per task); method options live in the
    method's own arguments (e.g. `MoEAdaptersArguments`)."""

    max_steps: int = field(
        default=1000,
        metadata={"help": "Training steps per task (paper: 1000); -1 trains `num_train_epochs` epochs per task "
                  "instead (the class-incremental recipe), 0 only evaluates."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of tasks without their own."})
    warmup_steps: float = field(default=100, metadata={"help": "Linear warmup steps of every task's schedule."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of every task (paper: cosine)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    label_smoothing_factor: float = field(default=0.2, metadata={"help": "Label smoothing (paper: 0.2)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device (paper: 64)."})
    per_device_eval_batch_size: int = field(
        default=128, metadata={"help": "Evaluation batch size per device (official: 128). Speed only: the protocol "
                               "matrix decides per `protocol_unit` images whatever it is."},
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0 disables it (official: none)."})
    train_augmentation: Optional[str] = field(
        default="random_resized_crop",
        metadata={"help": "Training images: 'random_resized_crop' (official: RandomResizedCrop to the model's input "
                  "size, scale 0.9-1.0, bicubic) or 'none' (the evaluation transform)."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `image`/`label` for the collator."})
    save_strategy: str = field(default="no", metadata={"help": "Mid-task checkpoints; tasks are saved anyway."})
    ddp_broadcast_buffers: Optional[bool] = field(
        default=False,
        metadata={"help": "Keep per-rank expert-selection counts; they are all-reduced before freezing/merging."},
    )
    task_learning_rates: Optional[list[float]] = field(
        default=None, metadata={"help": "One learning rate per task, overriding `learning_rate`."}
    )
    train_template: int = field(default=0, metadata={"help": "Prompt template used in training (paper: 0)."})
    evaluate_all_tasks: bool = field(
        default=True,
        metadata={"help": "After each task evaluate every task (accuracy matrix); False evaluates only that task."},
    )
    task_agnostic_eval: Optional[bool] = field(
        default=None,
        metadata={"help": "Also fill the matrices without a task id (the method picks each image's model); None: "
                  "whenever the method can (MoE-Adapters with DDAS, ConDU)."},
    )
    save_task_checkpoints: bool = field(
        default=True, metadata={"help": "Save the model and the matrix so far after every task (needed to resume)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let a new run (without resume) replace the task checkpoints already in output_dir."},
    )
    check_images: bool = field(
        default=True,
        metadata={"help": "Before training, decode every image of every split and name the first damaged one."},
    )

    eval_cache_gb: float = field(
        default=4.0,
        metadata={"help": "Memory (GiB) for test images kept preprocessed between evaluations, so each is decoded and "
                  "preprocessed once per run (and for the untouched model's embeddings of them); test sets beyond it "
                  "are read again each time (0: no cache)."},
    )
    protocol_unit: int = field(
        default=128,
        metadata={"help": "Images of one test set per decision of the `protocol` matrix (the official test batch, "
                  "128), whatever `per_device_eval_batch_size` is."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.eval_cache_gb, bool) or not isinstance(self.eval_cache_gb, (int, float)) or not (
                math.isfinite(self.eval_cache_gb) and self.eval_cache_gb >= 0):
            raise ValueError(f"eval_cache_gb must be a non-negative number of GiB, got {self.eval_cache_gb!r}.")
        if isinstance(self.protocol_unit, bool) or not isinstance(self.protocol_unit, int) or self.protocol_unit < 1:
            raise ValueError(f"protocol_unit must be a positive number of images, got {self.protocol_unit!r}.")
        rates = [("learning_rate", self.learning_rate)] + [
            (f"task_learning_rates[{i}]", rate) for i, rate in enumerate(self.task_learning_rates or [])]
        for name, rate in rates:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                raise ValueError(f"`{name}` must be a finite positive number, got {rate!r}.")
        if self.max_steps < -1:
            raise ValueError(f"`max_steps` must be the steps per task, -1 (train `num_train_epochs` epochs per task) "
                             f"or 0 (evaluate only), got {self.max_steps}.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError("With max_steps=-1 every task trains `num_train_epochs` epochs; set it above 0.")
        if self.train_augmentation not in (None, "none", "random_resized_crop"):
            raise ValueError(f"Unknown train_augmentation {self.train_augmentation!r}; use 'random_resized_crop' "
                             "(official) or 'none'.")
