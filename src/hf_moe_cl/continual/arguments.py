"""`ContinualTrainingArguments`: `TrainingArguments` with MoE-Adapters' per-task defaults and the task loop's options."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from ..options import check_flags, check_option, short_repr

logger = logging.getLogger("hf_moe_cl")

# TrainingArguments with which the HF Trainer would save or evaluate on its own inside a task: the value that leaves
# both to the task loop, and why another value is refused.
LEFT_TO_THE_TASK_LOOP = {
    "save_strategy": ("no", "the Trainer's checkpoint-N folders count the steps from 0 in every task, so each task's "
                      "replace the previous task's, and none can be resumed; the task loop saves every task itself "
                      "(save_task_checkpoints)"),
    "eval_strategy": ("no", "the Trainer has no eval_dataset; the task loop evaluates the tasks after each task itself "
                      "(evaluate_all_tasks); to measure during a task, call trainer.evaluate() from a callback"),
    "load_best_model_at_end": (False, "every task keeps its own checkpoint; there is no best one to reload"),
    "remove_unused_columns": (False, "the collator reads the `image` and `label` columns, which the model's forward "
                              "does not name"),
}


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """Every task trains with these settings (a fresh optimiser and schedule per task); method options live in the
    method's own arguments (e.g. `MoEAdaptersArguments`)."""

    max_steps: int = field(default=1000, metadata={
        "help": "Training steps per task (paper: 1000); -1 trains `num_train_epochs` epochs per task "
                "instead (the class-incremental recipe), 0 only evaluates."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of tasks without their own."})
    warmup_steps: float = field(default=100, metadata={"help": "Linear warmup steps of every task's schedule."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule of every task (paper: cosine)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    label_smoothing_factor: float = field(default=0.2, metadata={"help": "Label smoothing (paper: 0.2)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device (paper: 64)."})
    per_device_eval_batch_size: int = field(default=128, metadata={
        "help": "Evaluation batch size per device (official: 128). Speed only: the protocol "
                "matrix decides per `protocol_unit` images whatever it is."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0 disables it (official: none)."})
    train_augmentation: Optional[str] = field(default="random_resized_crop", metadata={
        "help": "Training images: 'random_resized_crop' (official: RandomResizedCrop to the model's input "
                "size, scale 0.9-1.0, bicubic) or 'none' (the evaluation transform)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `image`/`label` for the collator."})
    save_strategy: str = field(default="no", metadata={
        "help": "Must stay 'no': the task loop saves each task (save_task_checkpoints)."})
    ddp_broadcast_buffers: Optional[bool] = field(default=False, metadata={
        "help": "Keep per-rank expert-selection counts; they are all-reduced before freezing/merging."})
    task_learning_rates: Optional[list[float]] = field(default=None, metadata={
        "help": "One learning rate per task, overriding `learning_rate`."})
    train_template: int = field(default=0, metadata={"help": "Prompt template used in training (paper: 0)."})
    evaluate_all_tasks: bool = field(default=True, metadata={
        "help": "After each task evaluate every task (accuracy matrix); False evaluates only that task."})
    task_agnostic_eval: Optional[bool] = field(default=None, metadata={
        "help": "Also fill the matrices without a task id (the method picks each image's model); None: "
                "whenever the method can (MoE-Adapters with DDAS, ConDU)."})
    save_task_checkpoints: bool = field(default=True, metadata={
        "help": "Save the model and the matrix so far after every task (needed to resume)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Let a new run (without resume) replace the task checkpoints already in output_dir."})
    check_images: bool = field(default=True, metadata={
        "help": "Before training, decode every image of every split and name the first damaged one."})

    eval_cache_gb: float = field(default=4.0, metadata={
        "help": "Memory (GiB) for test images kept preprocessed between evaluations, so each is decoded and "
                "preprocessed once per run (and for the untouched model's embeddings of them); test sets beyond it "
                "are read again each time (0: no cache)."})
    official_cil_eval: bool = field(default=False, metadata={
        "help": "Evaluate as MoE-Adapters' class-incremental code (the CIL presets set it): test images through the "
                "training augmentation, drawn anew at every evaluation, and the class prompts encoded again (their "
                "router noise drawn again) for every 64 test images (cil/main.py line 55; cil/continual_clip/models.py "
                "lines 29, 36-40). False: the evaluation transform, and the prompts encoded once per evaluation."})
    protocol_unit: int = field(default=128, metadata={
        "help": "Images of one test set per decision of the `protocol` matrix (the official test batch, "
                "128), whatever `per_device_eval_batch_size` is."})

    def __post_init__(self):
        for name, (off, why) in LEFT_TO_THE_TASK_LOOP.items():
            value = getattr(self, name)
            if value != off:  # transformers' strategy enums equal their string values
                raise ValueError(f"`{name}={short_repr(value)}` cannot be used with ContinualTrainer: {why}. Leave "
                                 f"`{name}` at {off!r}.")
        super().__post_init__()
        self._check_launch()
        check_option("max_steps", self.max_steps, int)
        if self.max_steps < -1:
            raise ValueError(f"`max_steps` must be the steps per task, -1 (train `num_train_epochs` epochs per task) "
                             f"or 0 (evaluate only), got {self.max_steps}.")
        check_option("num_train_epochs", self.num_train_epochs, float, low=0)
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError("With max_steps=-1 every task trains `num_train_epochs` epochs; set it above 0.")
        if not isinstance(self.task_learning_rates, (type(None), list, tuple)):
            raise ValueError(f"`task_learning_rates` must be None or a list of one learning rate per task, got "
                             f"{self.task_learning_rates!r}.")
        rates = [("learning_rate", self.learning_rate)] + [
            (f"task_learning_rates[{i}]", rate) for i, rate in enumerate(self.task_learning_rates or [])]
        for name, rate in rates:
            check_option(name, rate, float, low=0, low_open=True)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "protocol_unit"):
            check_option(name, getattr(self, name), int, low=1)
        check_option("train_template", self.train_template, int, low=0)
        check_option("dataloader_num_workers", self.dataloader_num_workers, int, low=0)
        check_option("save_total_limit", self.save_total_limit, int, low=1, optional=True)
        check_option("seed", self.seed, int, low=0, high=2**32 - 1)
        for name in ("warmup_steps", "weight_decay", "adam_epsilon", "eval_cache_gb"):
            check_option(name, getattr(self, name), float, low=0)
        check_option("max_grad_norm", self.max_grad_norm, float, low=0, optional=True)
        for name in ("label_smoothing_factor", "adam_beta1", "adam_beta2"):
            check_option(name, getattr(self, name), float, low=0, high=1, high_open=True)
        check_flags(self, ("evaluate_all_tasks", "save_task_checkpoints", "overwrite_output_dir", "check_images",
                           "official_cil_eval"))
        check_option("task_agnostic_eval", self.task_agnostic_eval, bool, optional=True)
        check_option("train_augmentation", self.train_augmentation, str, choices=("random_resized_crop", "none"),
                     optional=True)
        if self.max_steps >= 0 and self.num_train_epochs != TrainingArguments.num_train_epochs:
            logger.warning("num_train_epochs=%g is not used: max_steps=%d sets the steps of every task. Set "
                           "max_steps=-1 to train num_train_epochs epochs per task.", self.num_train_epochs,
                           self.max_steps)
        if self.max_steps > 0 and self.warmup_steps >= max(1, self.max_steps):
            logger.warning("warmup_steps=%g is not shorter than max_steps=%d: every task trains while its learning rate "
                           "still rises and never reaches %g (the presets' warmup is 100 steps). Give fewer "
                           "warmup_steps, or more max_steps.", self.warmup_steps, self.max_steps, self.learning_rate)

    def _check_launch(self) -> None:
        """Refuse a launch whose processes would each train alone."""
        fix = "docs/trainer.md, Launching, gives the commands"
        if (announced := int(os.environ.get("WORLD_SIZE", 1))) != self.world_size:
            if not self.use_cpu and not torch.cuda.is_available():
                fix = f"Without a GPU, --use_cpu true (use_cpu=True) joins them in one gloo group; {fix}"
            raise ValueError(f"The launcher announces WORLD_SIZE={announced} processes, but this run has "
                             f"{self.world_size}: each process would train alone. {fix}.")
        split = getattr(self.accelerator_config, "split_batches", False)
        if split and self.world_size > 1 and self.per_device_eval_batch_size % self.world_size:
            raise ValueError(  # accelerate refuses the loader only after task 1 trained (DDAS, ConDU, routing report)
                f"split_batches=True splits every batch over the {self.world_size} processes, but "
                f"per_device_eval_batch_size={self.per_device_eval_batch_size} does not divide by {self.world_size}: "
                f"give a multiple of {self.world_size}.")
        if "WORLD_SIZE" not in os.environ and {"MASTER_ADDR", "ACCELERATE_USE_CPU"} <= set(os.environ):
            raise ValueError("accelerate launch was given several processes but started this one alone (it does so "
                             "with --cpu, or without --multi_gpu): several CPU processes need torchrun with --use_cpu "
                             f"true, several GPUs --multi_gpu, one process --num_processes 1. {fix}.")
