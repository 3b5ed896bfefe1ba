"""`ContinualTrainer`: the HF `Trainer` run over a sequence of tasks, filling accuracy matrices and checkpoints.

The trainer owns the task loop, the matrices and the checkpoint folders; what is trained and how images are
classified belongs to a `ContinualMethod` (MoE-Adapters, ConDU, the baselines).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer, set_seed
from transformers.trainer_callback import ProgressCallback

from ..classification import ZERO_SHOT, RoutedClassifier, tokenize_prompts
from ..files import atomic_files, write_json_atomic
from .run_folder import (PROGRESS_FILE, check_output_dir, finished_folders, prune, remove_temporary, resume_point,
                         run_identity, run_lock, save_results, save_task, task_folder)
from .arguments import ContinualTrainingArguments
from .card import model_card
from .context import TaskContext
from .preprocessing import ImageClassificationCollator, training_augmentation
from .evaluation import CellRequest, EvaluationEngine
from .methods import ContinualMethod, method_for_model
from .result import MATRIX_KINDS, MATRIX_TITLES, ContinualResult
from .tasks import ContinualTask, check_tasks

logger = logging.getLogger("hf_moe_cl")


class TaskProgressCallback(ProgressCallback):
    """transformers' training progress bar, named after the task it trains."""

    def __init__(self, trainer: "ContinualTrainer"):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.trainer.task_label)


class ContinualTrainer(Trainer):
    """Trains a CLIP model on tasks in order with a continual method and fills the accuracy matrices.

    Loss: cross-entropy of `logit_scale.exp() * image_features @ text_features.T` over the current task's class
    names, the text tower run with gradients (template `train_template`), plus the method's extra loss.
    Evaluation: text features averaged over all templates, through `classification.RoutedClassifier`.
    `processing_class` is a `CLIPProcessor` (tokenizer + image processor). `method` defaults to the one `model`
    implies (`methods.method_for_model`). Use `train_tasks`; `train()` and `evaluate()` work on the task being
    trained.
    """

    def __init__(self, model=None, args: Optional[ContinualTrainingArguments] = None, processing_class=None,
                 method: Optional[ContinualMethod] = None, **kwargs):
        if processing_class is None or not hasattr(processing_class, "tokenizer"):
            raise ValueError("ContinualTrainer needs `processing_class=CLIPProcessor(...)` (tokenizer + image "
                             "processor).")
        if method is None:
            if model is None:
                raise ValueError("ContinualTrainer needs a `model` or a `method`.")
            method = method_for_model(model)
        elif model is not None and model is not method.model:
            raise ValueError("Pass either `model` or `method` (whose model is trained), not a different model.")
        args = args if args is not None else ContinualTrainingArguments(output_dir="continual_output")
        if not isinstance(args, ContinualTrainingArguments):
            raise ValueError("ContinualTrainer needs `args` of type ContinualTrainingArguments.")
        output_dir = Path(args.output_dir)
        check_output_dir(output_dir)  # before the Trainer creates the folder there
        self._output_dir_had_files = output_dir.is_dir() and any(output_dir.iterdir())  # Trainer creates it
        image_processor = processing_class.image_processor
        augment = training_augmentation(image_processor, args.train_augmentation)
        if kwargs.get("data_collator") is None:  # training batches go through the official augmentation
            kwargs["data_collator"] = ImageClassificationCollator(image_processor, augment)
        elif augment is not None:
            raise ValueError("`train_augmentation` applies to the collator ContinualTrainer makes; with a "
                             "data_collator of your own (it collates the training batches) set "
                             "train_augmentation='none' and augment in your collator.")
        callbacks = list(kwargs.pop("callbacks", None) or []) + method.callbacks()
        model = method.training_model()
        super().__init__(model=method.model if model is None else model, args=args,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(TaskProgressCallback(self))
        # compute_loss gives a batch mean, not one scaled by the items of the accumulated batches: the Trainer then
        # divides it by gradient_accumulation_steps (CLIP's forward takes **kwargs, so it would assume the scaling)
        self.model_accepts_loss_kwargs = False
        self.method = method
        self.evaluation_collator = ImageClassificationCollator(  # test images as evaluated
            image_processor, augment if args.official_cil_eval else None)
        self.current_task: Optional[ContinualTask] = None
        self.task_label = ""
        self.num_routes = 0
        self._task_inputs: Optional[tuple[dict[str, torch.Tensor], torch.Tensor]] = None  # prompts, label map
        self._in_task_loop = False
        self._steps_done = 0  # optimizer steps of the finished tasks
        self._step_offset = 0  # added to the Trainer's per-task step in logs
        self.result: Optional[ContinualResult] = None  # of the last `train_tasks`: the card `save_model` writes
        self._result_tasks: Optional[list[ContinualTask]] = None  # its tasks (their class names, for the card)
        self._checked_images: set[str] = set()  # fingerprints of the datasets whose images all decoded

    # ----- Trainer entry points ------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """Trains the current task; a task sequence is trained with `train_tasks`."""
        if not self._in_task_loop:
            raise ValueError("ContinualTrainer trains a sequence of tasks: call "
                             "trainer.train_tasks([ContinualTask(...), ...]) instead of train().")
        return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy of the model being trained on the current task (its eval split, or `eval_dataset`), as a
        Trainer user expects during `train_tasks` (e.g. from a callback; `eval_strategy` stays "no": the Trainer has
        no eval_dataset of its own)."""
        task = self.current_task
        if task is None:
            raise ValueError("ContinualTrainer.evaluate() measures the task being trained inside train_tasks(); to "
                             "measure a task at other times use trainer.evaluate_task(task, route).")
        if eval_dataset is not None:
            task = ContinualTask(task.name, None, eval_dataset, task.classnames, task.templates)
            task.validate(needs_training=False, check_images=self.args.check_images, checked=self._checked_images)
        current = ContinualMethod(self.model)  # the training model as it is: no routing
        classifier = RoutedClassifier(current, self.processing_class.tokenizer, self.args.device)
        cells = EvaluationEngine(self, current).evaluate(task, CellRequest(oracle=ZERO_SHOT), classifier)
        self.model.train()
        metrics = {f"{metric_key_prefix}_accuracy": cells["oracle"].accuracy}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Logs with a step that keeps increasing across tasks (each task's Trainer state restarts at 0)."""
        self.state.global_step += self._step_offset
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step -= self._step_offset

    def task_context(self) -> TaskContext:
        """What the method's hooks get: this run's device, seed, tokenizer and ways to read images."""
        args = self.args
        return TaskContext(device=args.device, seed=args.seed, trains=args.max_steps != 0,
                           tokenizer=self.processing_class.tokenizer,
                           image_processor=self.processing_class.image_processor,
                           augmentation=args.train_augmentation, eval_batch_size=args.eval_batch_size,
                           num_workers=args.dataloader_num_workers,
                           show_progress=self.is_world_process_zero() and not args.disable_tqdm,
                           check_images=args.check_images,
                           prepare=self.accelerator.prepare, gather=self.accelerator.gather_for_metrics)

    # ----- loss ----------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_tokens, label_map = self._task_inputs
        tokens = {k: v.to(inputs["pixel_values"].device) for k, v in prompt_tokens.items()}
        outputs = model(pixel_values=inputs["pixel_values"], **tokens)
        labels = label_map.to(inputs["labels"].device)[inputs["labels"]]
        smoothing = self.args.label_smoothing_factor
        loss = F.cross_entropy(outputs.logits_per_image.float(), labels, label_smoothing=smoothing)
        extra = self.method.extra_loss()
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            resumable = self.args.save_task_checkpoints and finished_folders(self.args.output_dir)
            raise FloatingPointError(
                f"{self.task_label}: the training loss became {loss.item()} at step {self.state.global_step + 1}. "
                f"The task stopped before anything of it was saved (earlier task checkpoints are intact). Lower the "
                f"learning rate ({self.args.learning_rate:g}; the task's `learning_rate` or `task_learning_rates`) "
                "or check the task's data, then " + ("continue with resume=True." if resumable else
                                                     "run again (no task checkpoint exists yet: nothing to resume)."))
        return (loss, outputs) if return_outputs else loss

    # ----- evaluation ----------------------------------------------------------------------------------------------
    def classifier(self) -> RoutedClassifier:
        """The classification core over the method's current models (the untouched model's text features kept for
        the run when that model never changes)."""
        untouched = self.engine.untouched_text if self.method.untouched_is_fixed else None
        return RoutedClassifier(self.method, self.processing_class.tokenizer, self.args.device, untouched)

    def evaluate_task(self, task: ContinualTask, route: int = ZERO_SHOT) -> float:
        """Top-1 accuracy (%) of the method's `route` model on the task (-1: the model for no learned task); the
        task is checked first as `train_tasks` checks an evaluation-only task (a split whose images this trainer
        already decoded in a check is not decoded again)."""
        index = None if isinstance(route, bool) else getattr(route, "__index__", lambda: None)()  # 1.9 is refused
        if index is None or index < ZERO_SHOT:
            raise ValueError(f"evaluate_task: `route` must be an integer, {ZERO_SHOT} (the model for no learned task) "
                             f"or a task's route (0, 1, ...), got {route!r}.")
        if not isinstance(task, ContinualTask):
            raise ValueError(f"evaluate_task needs a ContinualTask, got {type(task).__name__}.")
        task.validate(needs_training=False, check_images=self.args.check_images, checked=self._checked_images)
        return self.engine.evaluate(task, CellRequest(oracle=index), self.classifier())["oracle"].accuracy

    @property
    def engine(self) -> EvaluationEngine:
        """The evaluation engine of the method (its caches live as long as the trainer)."""
        if getattr(self, "_engine", None) is None or self._engine.method is not self.method:
            self._engine = EvaluationEngine(self, self.method)
        return self._engine

    def _evaluate_stage(self, index: int, tasks: list[ContinualTask], matrices: dict, histograms: dict,
                        pretrained: dict[int, float]) -> dict[str, int]:
        """One row of every matrix after task `index`, logged; returns the image encodings run since the last stage."""
        engine = self.engine
        rows = engine.stage(index, tasks, self.classifier(), matrices, histograms, pretrained)
        matrices["oracle"].append(rows["oracle"])
        for kind in histograms:
            matrices[kind].append([cell.accuracy for cell in rows[kind]])
            histograms[kind].append([cell.histogram for cell in rows[kind]])
        metrics = {}
        for kind in matrices:
            evaluated = [(task.name, value) for task, value in zip(tasks, matrices[kind][-1]) if value is not None]
            metrics.update({f"{kind}_accuracy/{name}": value for name, value in evaluated})
            logger.info("%s, %s matrix, %s: %s", self.task_label, kind, MATRIX_TITLES.get(kind, kind),
                        ", ".join(f"{name} {value:.2f}" for name, value in evaluated))
        self.log(metrics)  # log_history, on_log and the integrations of `report_to`
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        counted, self._encodings_mark = self._encodings_mark, dict(engine.encodings)
        return {name: engine.encodings[name] - counted[name] for name in counted}

    # ----- the task loop -------------------------------------------------------------------------------------------
    def run_identity(self, tasks: list[ContinualTask]) -> dict:
        """What makes a checkpoint folder this run's: compared before resuming."""
        return run_identity(self.method, self.args, tasks,
                            [self.task_learning_rate(i, task) for i, task in enumerate(tasks)])

    def train_tasks(self, tasks: list[ContinualTask], resume: bool = False) -> ContinualResult:
        """Train the tasks in order; after each: the method's end of task, a checkpoint, one row of each matrix.

        With `resume=True`, the last task checkpoint under `output_dir` is loaded (after checking it belongs to this
        run) and the run goes on from there, giving the same result as an uninterrupted run; the learning rates of
        tasks not trained yet may differ from the first start (logged). A run holds `output_dir/.run.lock` while it
        lasts: a second run on the same folder is refused.
        """
        if resume and not self.args.save_task_checkpoints:
            raise ValueError("resume=True continues from the task checkpoints in output_dir, but "
                             "save_task_checkpoints=False neither writes nor reads them. Set "
                             "save_task_checkpoints=True to resume, or start the run without resume=True.")
        train = self.method.trains and self.args.max_steps != 0
        check_tasks(tasks, train, self.args, self.processing_class.tokenizer, recipe=self.method.recipe,
                    progress=self.is_world_process_zero() and not self.args.disable_tqdm, checked=self._checked_images)
        for name, parameter in self.method.model.named_parameters():
            if parameter.device.type != "meta" and not torch.isfinite(parameter).all():
                raise ValueError(f"The model's {name} holds NaN or infinite values before any training: the base model "
                                 "(or the adapter it continues) is damaged. Load it again from its source.")
        if resume and not (self._output_dir_had_files or finished_folders(self.args.output_dir)):
            raise ValueError(f"resume=True, but output_dir {self.args.output_dir} was empty or did not exist: there is "
                             "nothing to resume. Check the path, or start the run without resume=True.")
        args, processes = self.args, self.accelerator.num_processes
        logger.info("%d task(s) with %s on %d process(es), global batch %d (%d per device); checkpoints and results "
                    "in %s", len(tasks), self.method.name or type(self.method).__name__, processes,
                    args.per_device_train_batch_size * processes * args.gradient_accumulation_steps,
                    args.per_device_train_batch_size, Path(args.output_dir).resolve())
        # the folder checks and the lock hold without task checkpoints too: such a run still writes there (save_model)
        self.result = self._result_tasks = None
        with run_lock(self.args.output_dir) if self.is_world_process_zero() else nullcontext():
            self.result = self._train_tasks(tasks, resume, train)
        self._result_tasks = list(tasks)
        return self.result

    def _train_tasks(self, tasks: list[ContinualTask], resume: bool, train: bool) -> ContinualResult:
        histograms = {kind: [] for kind in self.engine.agnostic_kinds()}
        context = self.task_context()
        self.method.begin_sequence(context, tasks)
        self.num_routes = self.method.route_count(tasks)
        names = [task.name for task in tasks]
        run = self.run_identity(tasks)
        main = self.is_world_process_zero()
        if main:
            remove_temporary(self.args.output_dir)
        # the checkpoint resumed from (None: start at the first task); a folder of another run is refused
        folder, progress = resume_point(self.args.output_dir, names, run, resume, self.args.overwrite_output_dir, main)
        self.accelerator.wait_for_everyone()
        matrices = {"oracle": [], **{kind: [] for kind in histograms}}
        encodings: list[dict[str, int]] = []
        start = 0
        if progress is not None:
            self.method.load(folder)
            start = progress["finished_task"] + (1 if progress["evaluated"] else 0)
            encodings.extend(progress.get("image_encodings", []))
            for kind in matrices:
                matrices[kind].extend(progress["matrices"].get(kind, []))
            for kind in histograms:
                histograms[kind].extend(progress["route_histogram"].get(kind, []))
            self._steps_done = self._step_offset = progress["steps_done"]
            self.method.restore_diagnostics(progress.get("diagnostics", {}))
            logger.info("Resuming after task %d/%d (%s) from %s.", progress["finished_task"] + 1, len(tasks),
                        names[progress["finished_task"]], self.args.output_dir)
        self._encodings_mark = dict(self.engine.encodings)
        pretrained = self.engine.pretrained_accuracies(tasks, self.classifier())
        for index in range(start, len(tasks)):
            task = tasks[index]
            self.task_label = f"task {index + 1}/{len(tasks)}: {task.name}"
            trained_before = progress is not None and progress["finished_task"] == index
            if not trained_before:
                logger.info("%s", self.task_label)
                self._step_offset = self._steps_done
                set_seed(self.method.task_seed(self.args.seed, index))
                self.current_task = task
                self.method.begin_task(context, index, task)
                if train:
                    self._train_one_task(index, task)
                    self._steps_done += self.state.global_step
                self.method.end_task(context, index, task)
                self.current_task = None
                if self.args.save_task_checkpoints:
                    progress = self._save_task(index, names, matrices, histograms, run)
            encodings.append(self._evaluate_stage(index, tasks, matrices, histograms, pretrained))
            if self.args.save_task_checkpoints:
                progress.update(evaluated=True, matrices=matrices, route_histogram=histograms,
                                image_encodings=encodings)
                if main:
                    write_json_atomic(task_folder(self.args.output_dir, index, task.name) / PROGRESS_FILE, progress)
                    prune(self.args.output_dir, self.args.save_total_limit)
                self.accelerator.wait_for_everyone()
        diagnostics = dict(self.method.diagnostics(), image_encodings=encodings)
        if histograms:  # columns: zero-shot, then every route (a continued model's earlier tasks, idle routers too)
            own = [self.method.task_route(i) for i in range(len(tasks))]
            labels = {route: info["name"] for route, info in self.method.learned_tasks().items()}
            labels.update(zip(own, names))
            diagnostics.update(route_histogram=histograms, task_routes=own,
                               route_names=[labels.get(route, f"router {route}") for route in range(self.num_routes)])
        ordered = {kind: matrices[kind] for kind in MATRIX_KINDS if kind in matrices}
        return ContinualResult(task_names=names, matrices=ordered, diagnostics=diagnostics)

    def _train_one_task(self, index: int, task: ContinualTask) -> None:
        """`Trainer.train()` on the task, with its model, learning rate, dataset, prompts and labels given to the
        trainer for that call only: nothing of one task is left for the next, the user's arguments never change."""
        run_args, run_model, run_wrapped = self.args, self.model, self.model_wrapped
        model = self.method.training_model()
        if model is not run_model:
            self.model = self.model_wrapped = model.to(self.args.device)
        template = task.templates[self.args.train_template]
        label_map = torch.full((len(task.classnames),), -100, dtype=torch.long)
        label_map[task.trained_classes] = torch.arange(len(task.trained_classes))
        self._task_inputs = (tokenize_prompts(self.processing_class.tokenizer, task.prompts(template)), label_map)
        self.args = copy.copy(run_args)  # this task's arguments: the run's with the task's learning rate
        self.args.learning_rate = self.task_learning_rate(index, task)
        self.train_dataset = self.method.training_dataset(task)
        self.optimizer, self.lr_scheduler = None, None
        self._in_task_loop = True
        history = self.state.log_history  # train() starts a new TrainerState: the run's log keeps every task's
        try:
            self.train()
            self.state.log_history[:0] = history
        finally:
            self._in_task_loop = False
            self.args, self.model, self.model_wrapped = run_args, run_model, run_wrapped
            self.train_dataset, self._task_inputs, self.optimizer, self.lr_scheduler = None, None, None, None
            self.accelerator.free_memory()  # the next task prepares its own model and optimiser

    def task_learning_rate(self, index: int, task: ContinualTask) -> float:
        """`task_learning_rates[index]`, else the task's own rate, else its official rate for the method's recipe,
        else `learning_rate`."""
        if self.args.task_learning_rates is not None:
            return self.args.task_learning_rates[index]
        if task.learning_rate is not None:
            return task.learning_rate
        return task.official_learning_rates.get(self.method.recipe, self.args.learning_rate)

    # ----- the run's outputs ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The method's folder (`method.save`: for MoE-Adapters the peft adapter with its DDAS selector, for ConDU its
        publishable save) and its model card (README.md: tasks, the last `train_tasks` results, base model, training
        hyperparameters, versions) at `output_dir` (default: the run's), beside the task folders; each file replaced
        atomically. Nothing is pushed: publish with `hf_moe_cl.publishing.push_to_hub`."""
        if _internal_call:  # the Trainer's own saves (Trainer.push_to_hub, hyperparameter search)
            return super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            folder = output_dir or self.args.output_dir
            with atomic_files(folder, replaces=self.method.save_files) as staging:
                self.method.save(staging)
                model_card(self.method, result=self.result, tasks=self._result_tasks, training_args=self.args,
                           local_dir=folder).save(staging / "README.md")
        self.accelerator.wait_for_everyone()

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """As `Trainer.save_metrics` (`<split>_results.json`, merged into `all_results.json`), written atomically;
        for a run's final numbers: `trainer.save_metrics("all", result.all_results())`."""
        if self.is_world_process_zero():
            save_results(self.args.output_dir, split, metrics, combined)

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def _save_task(self, index: int, names: list[str], matrices: dict, histograms: dict, run: dict) -> dict:
        """The task's checkpoint, written before its row is evaluated (`evaluated: false` until then)."""
        progress = {"finished_task": index, "task_names": names, "evaluated": False, "steps_done": self._steps_done,
                    "matrices": matrices, "route_histogram": histograms, "diagnostics": self.method.diagnostics(),
                    "run": run}
        if self.is_world_process_zero():
            def write_model(folder):
                self.method.save(folder)
                self.state.save_to_json(str(folder / "trainer_state.json"))

            save_task(task_folder(self.args.output_dir, index, names[index]), write_model, progress)
        self.accelerator.wait_for_everyone()
        return progress
