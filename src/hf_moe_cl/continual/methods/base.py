"""`ContinualMethod`: what a continual-learning method does around `ContinualTrainer`'s task loop.

The trainer owns the loop (train each task, fill the accuracy matrices, write checkpoints); a method owns the
model: what is trained for a task, what happens before and after it (routers, freezing, delta unification), how
images are classified with a task id and without one, and what a checkpoint holds. Its hooks get a `TaskContext`
(the run's device, seed, tokenizer and ways to read images), never the trainer. Adding a method is one file that
subclasses this and registers itself with `register_method`.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Optional, Sequence, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ...classification import ZERO_SHOT, ImageRoutes
from ...condu.folder import FILES as SAVE_FILES
from ...files import check_safetensors_file
from ...tuners.moe_lora.card import drop_peft_template
from ..run_folder import jsonable

# Adapter-config entries that change during a run (tasks added, selector fitted) or only at load time.
RUN_STATE_CONFIG_KEYS = {"task_info", "selector", "num_tasks", "inference_mode", "revision"}


class ContinualMethod:
    """Base class of the continual methods; the defaults describe one model trained on every task in turn.

    Class attributes a subclass sets:
    - `name`: the registry key (`--method` in the example script);
    - `arguments_class`: the dataclass of its options (None if it has none);
    - `trains`: False for a method that never trains (zero-shot);
    - `mixed_routes`: its model can route each image of one batch differently (see `classification.Router`);
    - `selects_routes`: it can classify without a task id (`select_routes`);
    - `batch_selection`: it can also pick one route for a whole batch (the official DDAS protocol);
    - `task_models_are_final`: a learned task's model never changes later, so its accuracy is measured once;
    - `untouched_is_fixed`: its model for route -1 never changes during a run, so evaluation encodes each test
      image with it once per run.
    """

    name: ClassVar[str] = ""
    arguments_class: ClassVar[Optional[type]] = None
    trains: ClassVar[bool] = True
    mixed_routes: ClassVar[bool] = False
    selects_routes: ClassVar[bool] = False
    batch_selection: ClassVar[bool] = False
    task_models_are_final: ClassVar[bool] = False
    untouched_is_fixed: ClassVar[bool] = False
    # What any method's `save` may write at a folder's top: saving over another save removes those this one did not
    # write, which would be loaded with it (a condu_config.json left over makes the folder a ConDU save).
    save_files: ClassVar[tuple[str, ...]] = SAVE_FILES

    @property
    def recipe(self) -> str:
        """The key of this method's official per-task learning rates (`ContinualTask.official_learning_rates`)."""
        return self.name

    def __init__(self, model: nn.Module, arguments: Any = None):
        self.model = model
        self.arguments = arguments if arguments is not None or self.arguments_class is None else self.arguments_class()
        self.first_route = 0  # tasks a continued model learned before this sequence; its tasks come after them

    @staticmethod
    def pick(options: Sequence, kind: Optional[type]) -> Any:
        """The instance of the dataclass `kind` among `options` (parsed arguments), or its defaults."""
        if kind is None:
            return None
        return next((option for option in options if isinstance(option, kind)), None) or kind()

    @classmethod
    def from_base(cls, base: nn.Module, options: Sequence = (), num_tasks: int = 1, rank: int = 64,
                  reference_images=None) -> "ContinualMethod":
        """The method on a private copy of a pretrained CLIP for `num_tasks` tasks, its options taken from
        `options` (see `pick`); `reference_images` are images of no task, for methods that use them."""
        return cls(copy.deepcopy(base), cls.pick(options, cls.arguments_class))

    # ----- the task loop -------------------------------------------------------------------------------------------
    def begin_sequence(self, context, tasks: list) -> None:
        """Before the first task (and before resuming): check the tasks fit the model, prepare per-task state."""

    def task_seed(self, seed: int, index: int) -> int:
        """The seed task `index` trains with: the run's plus the task's place among every task the model learned,
        so a continued model trains a new task as one uninterrupted run would."""
        return seed + self.first_route + index

    def begin_task(self, context, index: int, task) -> None:
        """Before task `index` trains: route it, reset what it starts from."""

    def training_model(self) -> nn.Module:
        """The module the trainer optimises for the current task."""
        return self.model

    def training_dataset(self, task):
        """What the current task trains on: its training images (or examples with fixed `pixel_values`)."""
        return task.train_dataset

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A loss added to the classification loss of the last training forward (None: nothing)."""
        return None

    def callbacks(self) -> list:
        """`TrainerCallback`s the trainer adds while this method runs."""
        return []

    def end_task(self, context, index: int, task) -> None:
        """After task `index` trained: freeze, fit selectors, unify deltas."""

    # ----- classification ------------------------------------------------------------------------------------------
    def acting_as(self, route: Union[int, torch.Tensor]) -> ContextManager:
        """The model acts as `route`'s model. One model serves every route by default."""
        return nullcontext()

    def routed(self, route: Union[int, torch.Tensor]) -> ContextManager:
        """Deprecated name of `acting_as` (hf-moe-cl 0.2)."""
        warnings.warn("ContinualMethod.routed() is now acting_as(); routed() goes in hf-moe-cl 0.4.", FutureWarning,
                      stacklevel=2)
        return self.acting_as(route)

    def task_route(self, index: int) -> int:
        """The route of the sequence's task `index` once learned."""
        return self.first_route + index

    def unseen_route(self, index: int) -> Optional[int]:
        """The route of a task not learned yet in the task-aware matrix; None: the method's own selection."""
        return ZERO_SHOT

    def cell_route(self, row: int, column: int) -> Optional[int]:
        """The route of task `column`'s cell in the task-aware matrix after learning task `row`."""
        return self.task_route(column) if column <= row else self.unseen_route(row)

    def select_routes(self, classifier, pixels: torch.Tensor) -> tuple[ImageRoutes, Optional[torch.Tensor]]:
        """Routes chosen without a task id, per image, and the untouched CLIP's embeddings of `pixels` when
        computing the routes produced them (reused for zero-shot images). By default `choose_routes`'s."""
        return self.choose_routes(classifier, pixels)

    def choose_routes(self, classifier, pixels: torch.Tensor, untouched: Optional[torch.Tensor] = None,
                      unit: Optional[int] = None) -> tuple[ImageRoutes, Optional[torch.Tensor]]:
        """Evaluation's routes without a task id, from one look at `pixels`: per image, and with `unit` one route
        per `unit` consecutive images (the protocol's decision per test batch). `untouched` are the untouched
        model's embeddings of `pixels` when the caller has them."""
        raise NotImplementedError(f"{type(self).__name__} cannot classify without a task id.")

    def learned_tasks(self) -> dict[int, dict]:
        """Route -> {"name", "classnames", "templates"} of every task the method can pick without a task id."""
        return {}

    def route_count(self, tasks: list) -> int:
        """How many task routes there are while `tasks` run (the width of route histograms, beside route -1)."""
        return self.first_route + len(tasks)

    def fingerprint(self) -> dict:
        """What makes two runs of this method the same run (compared before resuming): its name, options and, for a
        peft model, the adapter's config (sizes and targets, not what grows during the run)."""
        identity = {"method": self.name, "arguments": jsonable(self.arguments)}
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict):
            identity["adapter"] = {name: {k: v for k, v in jsonable(config.to_dict()).items()
                                          if k not in RUN_STATE_CONFIG_KEYS}
                                   for name, config in peft_config.items()}
        return identity

    def diagnostics(self) -> dict:
        """Method-specific results the trainer adds to `ContinualResult.diagnostics` (and to checkpoints)."""
        return {}

    def restore_diagnostics(self, diagnostics: dict) -> None:
        """Take back what `diagnostics` returned, from the checkpoint a run resumes from."""

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write what a task checkpoint holds (resume reads it back with `load`); no peft README template."""
        self.model.save_pretrained(folder)
        drop_peft_template(folder)

    def load(self, folder: Path) -> None:
        """Restore the state saved by `save` (every tensor of the model, no more, no less)."""
        state = {}
        for path in sorted(Path(folder).glob("model*.safetensors")):
            check_safetensors_file(path)
            state.update(load_file(path))
        if not state:
            raise FileNotFoundError(f"No model*.safetensors in {folder} to resume from.")
        result = self.model.load_state_dict(state, strict=False)
        check_loaded(folder, result.missing_keys, result.unexpected_keys)


def check_loaded(folder: Path, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a checkpoint that left tensors of the model unset or had tensors the model lacks."""
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint in {folder} does not fit this model: {len(missing)} of the model's tensors are missing "
            f"from it (e.g. {sorted(missing)[:2]}) and {len(unexpected)} of its tensors have no place in the model "
            f"(e.g. {sorted(unexpected)[:2]}). It was saved by another method or for another model.")
