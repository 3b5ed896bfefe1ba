"""One continual-learning experiment: a method, a base CLIP, a task sequence -> accuracy matrices.

Every method goes through the same `ContinualTrainer` (tasks, loss, schedule, evaluation), so the comparison is
side by side; the method is looked up by name in the registry of `hf_moe_cl.continual.methods`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from transformers import set_seed

from ..continual import ContinualResult, ContinualTrainer, ContinualTrainingArguments
from ..continual.methods import METHODS, get_method
from ..options import check_option


@dataclass
class MethodArguments:
    """Which method to run, and what every method shares; each method's own options are its `arguments_class`."""

    method: str = field(default="moe-adapters", metadata={"help": f"One of {', '.join(METHODS)}."})
    rank: int = field(default=64, metadata={"help": "Rank of MoE experts, of the LoRA baseline and of ConDU's LoRA."})
    use_task_learning_rates: bool = field(
        default=True,
        metadata={"help": "Use each task's official learning rate for the method (MoE-Adapters', ConDU's) where the "
                  "preset has one; false: `learning_rate` for every task."},
    )

    def __post_init__(self):
        check_option("method", self.method, str)
        get_method(self.method)
        check_option("rank", self.rank, int, low=1)
        check_option("use_task_learning_rates", self.use_task_learning_rates, bool)


def build_method(method_args: MethodArguments, base, num_tasks: int, options: Sequence = (), reference_images=None):
    """The method named by `method_args` on a private copy of `base`; `options` are parsed argument dataclasses,
    each method taking its own (defaults for the others)."""
    return get_method(method_args.method).from_base(base, options, num_tasks=num_tasks, rank=method_args.rank,
                                                    reference_images=reference_images)


def prepare_method(method_args: MethodArguments, base, tasks, args: ContinualTrainingArguments,
                   options: Sequence = (), reference_images=None):
    """(method, training arguments) for a run of `tasks`: the method built from a seeded start (its adapter's
    initialisation does not depend on what ran before), every task at `learning_rate` unless the method's official
    per-task rates are wanted."""
    if not method_args.use_task_learning_rates:
        if args.task_learning_rates is not None:
            raise ValueError("task_learning_rates and use_task_learning_rates=False disagree: the latter trains every "
                             "task at `learning_rate`. Drop one of them.")
        args = dataclasses.replace(args, task_learning_rates=[args.learning_rate] * len(tasks))
    set_seed(args.seed)
    return build_method(method_args, base, len(tasks), options, reference_images), args


def run_method(method_args: MethodArguments, base, processor, tasks, args: ContinualTrainingArguments,
               resume: bool = False, options: Sequence = (), reference_images=None) -> ContinualResult:
    """Run one method over `tasks`; checkpoints go under `args.output_dir`. `reference_images` are images of no
    task, for methods that learn to recognise unknown images (DDAS's reference set)."""
    method, args = prepare_method(method_args, base, tasks, args, options, reference_images)
    trainer = ContinualTrainer(method=method, args=args, processing_class=processor)
    return trainer.train_tasks(tasks, resume=resume)

