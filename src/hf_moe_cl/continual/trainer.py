"""`ContinualTrainer`: the HF `Trainer` run over a sequence of tasks, filling accuracy matrices and checkpoints.

The trainer owns the task loop, the matrices and the checkpoint folders; what is trained and how images are
classified belongs to a `ContinualMethod` (MoE-Adapters, ConDU, the baselines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Trainer, set_seed

from ..classification import ZERO_SHOT, RoutedClassifier, tokenize_prompts
from .arguments import ContinualTrainingArguments
from .data import ImageClassificationCollator
from .evaluation import evaluate_task
from .methods import ContinualMethod, method_for_model
from .result import MATRIX_KINDS, ContinualResult
from .tasks import ContinualTask

PROGRESS_FILE = "continual_progress.json"


class ContinualTrainer(Trainer):
    """Trains a CLIP model on tasks in order with a continual method and fills the accuracy matrices.

    Loss: cross-entropy of `logit_scale.exp() * image_features @ text_features.T` over the current task's class
    names, the text tower run with gradients (template `train_template`), plus the method's extra loss.
    Evaluation: text features averaged over all templates, through `classification.RoutedClassifier`.
    `processing_class` is a `CLIPProcessor` (tokenizer + image processor). `method` defaults to the one `model`
    implies (`methods.method_for_model`).
    """

    def __init__(self, model=None, args: Optional[ContinualTrainingArguments] = None, processing_class=None,
                 method: Optional[ContinualMethod] = None, **kwargs):
        if processing_class is None or not hasattr(processing_class, "tokenizer"):
            raise ValueError("ContinualTrainer needs `processing_class=CLIPProcessor(...)` (tokenizer + image processor).")
        if method is None:
            if model is None:
                raise ValueError("ContinualTrainer needs a `model` or a `method`.")
            method = method_for_model(model)
        elif model is not None and model is not method.model:
            raise ValueError("Pass either `model` or `method` (whose model is trained), not a different model.")
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = ImageClassificationCollator(processing_class.image_processor)
        args = args if args is not None else ContinualTrainingArguments(output_dir="continual_output")
        if not isinstance(args, ContinualTrainingArguments):
            raise ValueError("ContinualTrainer needs `args` of type ContinualTrainingArguments.")
        callbacks = list(kwargs.pop("callbacks", None) or []) + method.callbacks()
        model = method.training_model()
        super().__init__(model=method.model if model is None else model, args=args,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        self.method = method
        self.current_task: Optional[ContinualTask] = None
        self.num_routes = 0
        self._prompt_tokens: Optional[dict[str, torch.Tensor]] = None

    # ----- loss ----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = {k: v.to(inputs["pixel_values"].device) for k, v in self._prompt_tokens.items()}
        outputs = model(pixel_values=inputs["pixel_values"], **tokens)
        loss = F.cross_entropy(
            outputs.logits_per_image.float(), inputs["labels"], label_smoothing=self.args.label_smoothing_factor
        )
        extra = self.method.extra_loss()
        if extra is not None:
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    # ----- evaluation ----------------------------------------------------------------------------------------------
    def classifier(self) -> RoutedClassifier:
        """The classification core over the method's current models."""
        return RoutedClassifier(self.method, self.processing_class.tokenizer, self.args.device)

    def evaluate_task(self, task: ContinualTask, route: int = ZERO_SHOT) -> float:
        """Top-1 accuracy (%) of the method's `route` model on the task (-1: the model for no learned task)."""
        return evaluate_task(self, self.method, self.classifier(), task, "oracle", route)[0]

    def _agnostic_kinds(self) -> list[str]:
        wanted = self.args.task_agnostic_eval
        if wanted is None:
            wanted = self.method.selects_routes
        if not wanted:
            return []
        if not self.method.selects_routes:
            raise ValueError(
                f"task_agnostic_eval needs a method that picks a model per image without a task id; "
                f"{type(self.method).__name__} cannot (MoE-Adapters needs a DDAS selector: DDASArguments(ddas=True))."
            )
        return [kind for kind in MATRIX_KINDS[:2] if kind == "per_image" or self.method.batch_selection]

    def _evaluate_stage(self, index: int, tasks: list[ContinualTask], matrices: dict, histograms: dict,
                        pretrained: dict[int, float]) -> None:
        """One row of every matrix after task `index`. An unseen task whose route is None (the method's own
        selection) is classified as in the per-image matrix; that evaluation is shared with the matrix."""
        method, classifier = self.method, self.classifier()
        per_image: dict[int, tuple] = {}

        def selected(j: int) -> tuple:
            if j not in per_image:
                per_image[j] = evaluate_task(self, method, classifier, tasks[j], "per_image")
            return per_image[j]

        row = []
        for j, other in enumerate(tasks):
            if not (self.args.evaluate_all_tasks or j == index):
                row.append(None)
            elif j < index and method.task_models_are_final:
                row.append(matrices["oracle"][j][j])
            else:
                route = method.task_route(j) if j <= index else method.unseen_route(index)
                if route == ZERO_SHOT:
                    row.append(pretrained[j])
                elif route is None:
                    row.append(selected(j)[0])
                else:
                    row.append(evaluate_task(self, method, classifier, other, "oracle", route)[0])
        matrices["oracle"].append(row)
        self.log({f"accuracy/{other.name}": acc for other, acc in zip(tasks, row) if acc is not None})
        for kind in histograms:
            evaluated = [selected(j) if kind == "per_image" else evaluate_task(self, method, classifier, other, kind)
                         for j, other in enumerate(tasks)]
            matrices[kind].append([accuracy for accuracy, _ in evaluated])
            histograms[kind].append([counts for _, counts in evaluated])
            self.log({f"{kind}_accuracy/{o.name}": a for o, a in zip(tasks, matrices[kind][-1])})

    def _pretrained_accuracies(self, tasks: list[ContinualTask]) -> dict[int, float]:
        """Accuracy of the method's model for no learned task (-1) on every task that some cell evaluates with it,
        measured before any training: that model never changes."""
        method, last = self.method, len(tasks) - 1
        needed = {j for j in range(len(tasks)) if method.task_route(j) == ZERO_SHOT}
        needed |= {j for i in range(last) for j in range(i + 1, len(tasks)) if method.unseen_route(i) == ZERO_SHOT}
        if not self.args.evaluate_all_tasks:
            needed &= {j for j in range(len(tasks)) if method.task_route(j) == ZERO_SHOT}
        classifier = self.classifier()
        return {j: evaluate_task(self, method, classifier, tasks[j], "oracle", ZERO_SHOT)[0] for j in sorted(needed)}

    # ----- the task loop -------------------------------------------------------------------------------------------
    def train_tasks(self, tasks: list[ContinualTask], resume: bool = False) -> ContinualResult:
        """Train the tasks in order; after each: the method's end of task, one row of each matrix, a checkpoint.

        With `resume=True`, the last finished task's checkpoint under `output_dir` is loaded and training goes on
        from the next task, giving the same result as an uninterrupted run.
        """
        train = self.method.trains and self.args.max_steps > 0
        for task in tasks:
            task.validate(needs_training=train)
        if len({task.name for task in tasks}) != len(tasks):
            raise ValueError("Task names must be unique: they name the checkpoint folders.")
        if self.args.task_learning_rates is not None and len(self.args.task_learning_rates) != len(tasks):
            raise ValueError(
                f"task_learning_rates has {len(self.args.task_learning_rates)} entries for {len(tasks)} tasks."
            )
        histograms = {kind: [] for kind in self._agnostic_kinds()}
        self.method.begin_sequence(self, tasks)
        self.num_routes = len(tasks)
        names = [task.name for task in tasks]
        pretrained = self._pretrained_accuracies(tasks)
        matrices = {"oracle": [], **{kind: [] for kind in histograms}}
        start = 0
        if resume:
            start = self._resume(names, matrices, histograms)
        for index in range(start, len(tasks)):
            task = tasks[index]
            set_seed(self.method.task_seed(self.args.seed, index))
            self.current_task = task
            self.method.begin_task(self, index, task)
            if train:
                self._train_one_task(index, task)
            self.method.end_task(self, index, task)
            self.current_task = None
            self._evaluate_stage(index, tasks, matrices, histograms, pretrained)
            if self.args.save_task_checkpoints:
                self._save_task(index, names, matrices, histograms)
        diagnostics = dict(self.method.diagnostics())
        if histograms:
            diagnostics["route_histogram"] = histograms
        ordered = {kind: matrices[kind] for kind in MATRIX_KINDS if kind in matrices}
        return ContinualResult(task_names=names, matrices=ordered, diagnostics=diagnostics)

    def _train_one_task(self, index: int, task: ContinualTask) -> None:
        model = self.method.training_model()
        if model is not self.model:
            self.model = self.model_wrapped = model.to(self.args.device)
        template = task.templates[min(self.args.train_template, len(task.templates) - 1)]
        self._prompt_tokens = tokenize_prompts(self.processing_class.tokenizer, task.prompts(template))
        self.args.learning_rate = self.task_learning_rate(index, task)
        self.train_dataset = task.train_dataset
        self.optimizer, self.lr_scheduler = None, None
        self.train()
        self.accelerator.free_memory()  # the next task prepares its own model and optimiser

    def task_learning_rate(self, index: int, task: ContinualTask) -> float:
        """`task_learning_rates[index]`, else the task's own rate, else its official rate for the method's recipe,
        else `learning_rate`."""
        if self.args.task_learning_rates is not None:
            return self.args.task_learning_rates[index]
        if task.learning_rate is not None:
            return task.learning_rate
        return task.official_learning_rates.get(self.method.recipe, self.args.learning_rate)

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def _task_dir(self, index: int, name: str) -> Path:
        return Path(self.args.output_dir) / f"task-{index:02d}-{name}"

    def _save_task(self, index: int, names: list[str], matrices: dict, histograms: dict) -> None:
        folder = self._task_dir(index, names[index])
        if self.is_world_process_zero():
            folder.mkdir(parents=True, exist_ok=True)
            self.method.save(folder)
            self.state.save_to_json(str(folder / "trainer_state.json"))
            progress = {"finished_task": index, "task_names": names, "matrices": matrices,
                        "route_histogram": histograms}
            (folder / PROGRESS_FILE).write_text(json.dumps(progress, indent=1))
        self.accelerator.wait_for_everyone()

    def _resume(self, names: list[str], matrices: dict, histograms: dict) -> int:
        finished = None
        for index, name in enumerate(names):
            if (self._task_dir(index, name) / PROGRESS_FILE).is_file():
                finished = index
        if finished is None:
            return 0
        folder = self._task_dir(finished, names[finished])
        progress = json.loads((folder / PROGRESS_FILE).read_text())
        if progress["task_names"] != names:
            raise ValueError(
                f"Cannot resume from {folder}: it was trained on tasks {progress['task_names']}, not {names}. "
                "Use another output_dir or the same task sequence."
            )
        self.method.load(folder)
        for kind in matrices:
            matrices[kind].extend(progress["matrices"].get(kind, []))
        for kind in histograms:
            histograms[kind].extend(progress["route_histogram"].get(kind, []))
        return finished + 1
