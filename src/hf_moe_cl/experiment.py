"""One continual-learning experiment: a method, a base CLIP, a task sequence -> an accuracy matrix.

Every method goes through the same `ContinualTrainer` (tasks, loss, schedule, evaluation), so the comparison is
side by side: MoE-Adapters, zero-shot CLIP, continual full fine-tuning, continual peft LoRA, and individual full
fine-tuning per task (each task from the pretrained model: the upper bound).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import set_seed

from .condu_learner import ConDULearner
from .trainer import ContinualResult, ContinualTrainer, ContinualTrainingArguments
from .tuners.moe_lora import MoELoraConfig

METHODS = ("moe-adapters", "zero-shot", "full-finetune", "lora", "individual-finetune", "condu")


@dataclass
class MethodArguments:
    """Which method to run and its adapter sizes."""

    method: str = field(default="moe-adapters", metadata={"help": f"One of {', '.join(METHODS)}."})
    num_experts: int = field(default=22, metadata={"help": "MoE-Adapters: experts per block."})
    top_k: int = field(default=2, metadata={"help": "MoE-Adapters: experts per sample."})
    rank: int = field(default=64, metadata={"help": "Rank of MoE experts and of the LoRA baseline."})
    noisy_gating: bool = field(default=True, metadata={"help": "MoE-Adapters: noisy top-k gating in training."})
    lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "LoRA baseline: comma-separated modules."})
    condu_top_k: int = field(default=4, metadata={"help": "ConDU: tasks voted for per image without a task id."})
    condu_weighting: str = field(
        default="uniform", metadata={"help": "ConDU: 'uniform' averaging (official) or 'similarity'-weighted."}
    )
    use_task_learning_rates: bool = field(
        default=True,
        metadata={"help": "MoE-Adapters: use each task's own learning rate (the paper's) where the preset has one."},
    )

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")


def build_model(method_args: MethodArguments, base, num_tasks: int):
    """The trainable model of a continual method, on a private copy of `base`."""
    model = copy.deepcopy(base)
    if method_args.method == "moe-adapters":
        config = MoELoraConfig(num_tasks=num_tasks, num_experts=method_args.num_experts, top_k=method_args.top_k,
                               r=method_args.rank, noisy_gating=method_args.noisy_gating)
        return get_peft_model(model, config)
    if method_args.method == "lora":
        return get_peft_model(model, LoraConfig(r=method_args.rank, lora_alpha=method_args.rank,
                                                target_modules=list(method_args.lora_target_list)))
    return model


def _with(args: ContinualTrainingArguments, **changes) -> ContinualTrainingArguments:
    return dataclasses.replace(args, **changes)


def run_method(method_args: MethodArguments, base, processor, tasks, args: ContinualTrainingArguments,
               resume: bool = False, ddas_reference=None) -> ContinualResult:
    """Run one method over `tasks`; checkpoints go under `args.output_dir`. `ddas_reference` (reference images)
    is used by MoE-Adapters when `args.ddas` is set."""
    names = [task.name for task in tasks]
    method = method_args.method
    if method in ("full-finetune", "lora", "individual-finetune", "condu") or not method_args.use_task_learning_rates:
        args = _with(args, task_learning_rates=[args.learning_rate] * len(tasks))
    if method != "moe-adapters":  # DDAS belongs to MoE-Adapters
        args = _with(args, ddas=False, task_agnostic_eval=False)
    if method in ("zero-shot", "individual-finetune"):
        zero_shot = zero_shot_row(base, processor, tasks, args)
        if method == "zero-shot":
            return ContinualResult(names, [list(zero_shot) for _ in tasks])
        own = []
        for task in tasks:
            task_args = _with(args, output_dir=str(Path(args.output_dir) / f"individual-{task.name}"),
                              task_learning_rates=[args.learning_rate])
            trainer = ContinualTrainer(model=copy.deepcopy(base), args=task_args, processing_class=processor)
            own.append(trainer.train_tasks([task], resume=resume).accuracy_matrix[0][0])
        matrix = [[own[j] if j <= i else zero_shot[j] for j in range(len(tasks))] for i in range(len(tasks))]
        return ContinualResult(names, matrix)
    set_seed(args.seed)  # adapter initialisation does not depend on what ran before
    if method == "condu":
        learner = ConDULearner(copy.deepcopy(base), processor, args, rank=method_args.rank,
                               lora_targets=method_args.lora_target_list, top_k_tasks=method_args.condu_top_k,
                               weighting=method_args.condu_weighting)
        result = learner.run(tasks)
        learner.save_pretrained(str(Path(args.output_dir) / "condu-triggers"))
        return result
    model = build_model(method_args, base, num_tasks=1 if args.shared_router else len(tasks))
    trainer = ContinualTrainer(model=model, args=args, processing_class=processor, ddas_reference=ddas_reference)
    return trainer.train_tasks(tasks, resume=resume)


def zero_shot_row(base, processor, tasks, args: ContinualTrainingArguments) -> list[float]:
    evaluator = ContinualTrainer(model=copy.deepcopy(base), args=_with(args, max_steps=0), processing_class=processor)
    return [evaluator.evaluate_task(task, route=None) for task in tasks]
