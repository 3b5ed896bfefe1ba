"""Which task router each call of a MoE-LoRA model uses. The route is an argument of every layer's forward
(`task_route`), handed over by a pre-hook; no layer stores one. Where it comes from, most specific first:
1. a per-call route: `routing(task_ids)`, or `model(..., task_ids=...)` (`RoutedForward`);
2. the session's route: `set_task(t)` (`set_task(None)`: the untouched base model, chosen explicitly);
3. the adapter's trained DDAS selector: each image goes where `DistributionSelector.choose` sends it (as in
   `TaskAgnosticClassifier`), and the text of a CLIP call follows its images.
A model with several task routers and none of these refuses to run. The hooks are registered once, at injection,
never per call, so a compiled model traces them with its graph.
"""

from __future__ import annotations

import inspect
import operator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Optional, Union

import torch
from torch import nn

from .gating import NO_ROUTE, TaskRoute
from .layer import MoELoraLinear

TaskIds = Union[None, int, torch.Tensor]
MIXED = "mixed"  # the selector sent a CLIP call's images to different tasks
TOWERS = ("vision_model", "text_model")


class RoutedForward:
    """The wrapped model's `forward`, with a `task_ids` argument that routes the call: its signature names
    `task_ids`, so the plain `Trainer` keeps a `task_ids` column instead of dropping it (and training every row on
    one task)."""

    def __init__(self, tuner: "TaskRouting"):
        self.tuner = tuner

    @property
    def __signature__(self) -> inspect.Signature:
        original = inspect.signature(type(self.tuner.model).forward)
        parameters = list(original.parameters.values())[1:]  # without self
        at = next((i for i, p in enumerate(parameters) if p.kind == p.VAR_KEYWORD), len(parameters))
        task_ids = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        return original.replace(parameters=parameters[:at] + [task_ids] + parameters[at:])

    def __call__(self, *args, task_ids=None, **kwargs):
        model = self.tuner.model
        with self.tuner.routing(task_ids) if task_ids is not None else nullcontext():
            return type(model).forward(model, *args, **kwargs)


class TaskRouting:
    """The routing part of `MoELoraModel`: the session's route, a stack of per-call routes and the selector's."""

    def _start_routing(self, num_tasks: int) -> None:
        self._session_route: Optional[TaskRoute] = TaskRoute(task=0) if num_tasks == 1 else None  # None: unchosen
        self._call_routes: list[tuple[str, TaskRoute]] = []  # (who pushed it: "call" or a tower, route)
        self._clip_call = False  # inside a forward of the whole CLIP model (both towers)
        self._images_route: Union[None, int, str] = None  # in a CLIP call, where the selector sent its images
        for layer in self.moe_layers().values():
            if getattr(layer, "_route_hook", None) is None:
                layer._route_hook = layer.register_forward_pre_hook(self._inject_route, with_kwargs=True)
        if getattr(self, "_model_hooks", None) is None:
            self.model.forward = RoutedForward(self)
            self._model_hooks = [self.model.register_forward_pre_hook(partial(self._mark_call, True), with_kwargs=True),
                                 self.model.register_forward_hook(partial(self._mark_call, False))]
            for tower, begin in zip(TOWERS, (self._route_images, self._route_text)):
                module = getattr(self.model, tower, None)
                if isinstance(module, nn.Module):
                    self._model_hooks += [module.register_forward_pre_hook(begin, with_kwargs=True),
                                          module.register_forward_hook(partial(self._end_tower, tower))]

    def _stop_routing(self) -> None:
        for handle in getattr(self, "_model_hooks", None) or []:
            handle.remove()
        self._model_hooks = None
        if isinstance(self.model.__dict__.get("forward"), RoutedForward):
            del self.model.forward

    # ----- choosing a route ----------------------------------------------------------------------------------------
    def set_task(self, task: Optional[int]) -> None:
        """Route every later call through `task`'s router; None or -1 gives the unadapted base model."""
        self._session_route = self._make_route(None if task is None else self._as_task_id(task))

    @property
    def active_task(self) -> Optional[int]:
        """The task `set_task` routes every sample to (None: zero-shot, per-sample routing or none chosen)."""
        return None if self._session_route is None else self._session_route.task

    @contextmanager
    def routing(self, task_ids: TaskIds, selections: Optional[dict] = None):
        """Route the calls inside the block with an int task or per-sample ids (length batch, -1 for zero-shot).

        With `selections` (a dict), every layer adds the experts it chose (count them with `selection_histogram`).
        """
        route = self._make_route(task_ids, selections)
        self._check_checkpointed_linear_routing()
        self._call_routes.append(("call", route))
        try:
            yield
        finally:
            self._call_routes.pop()

    # ----- hooks ---------------------------------------------------------------------------------------------------
    def _inject_route(self, module, args, kwargs):
        """Forward pre-hook of every MoE layer: the call's route is an argument of the layer's forward."""
        if "task_route" not in kwargs:
            kwargs["task_route"] = self._call_routes[-1][1] if self._call_routes else self._session_or_refuse()
        return args, kwargs

    def _session_or_refuse(self) -> TaskRoute:
        if self._session_route is not None:
            return self._session_route
        hint = (" (its DDAS selector picks the task)" if getattr(self.selector, "has_reference", False) else
                " (with a DDAS selector: ContinualTrainer with DDASArguments(ddas=True))")
        raise ValueError(f"This MoE-LoRA adapter has {self.num_tasks} task routers and no route was chosen for this "
                         "call, so it would run as the untouched base model: pass task_ids=<one task id per sample> to "
                         f"the model, call set_task(t), or classify images with TaskAgnosticClassifier{hint}. "
                         "set_task(None) runs the untouched base model on purpose. With the plain Trainer, keep the "
                         "`task_ids` column (remove_unused_columns=False).")

    def _mark_call(self, inside: bool, *hook_arguments):
        """Hooks of the whole CLIP: a call of both towers begins or ends (the selector's choice for its images may
        route its text)."""
        self._clip_call, self._images_route = inside, None

    def _route_images(self, module, args, kwargs):
        """Pre-hook of the vision tower: without a chosen route, the trained selector routes each image."""
        selector = self.selector
        if self._call_routes or self._session_route is not None or selector is None or not selector.has_reference:
            return None
        pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        routes = selector.choose(self.model, pixels, lambda: self.routing(None))[0]
        if self._clip_call:  # the text follows the images' route (a device sync only in a whole-CLIP call)
            chosen = routes.unique().tolist()
            self._images_route = chosen[0] if len(chosen) == 1 else MIXED
        self._call_routes.append(("vision_model", self._make_route(routes)))
        return None

    def _route_text(self, module, args, kwargs):
        """Pre-hook of the text tower: in a CLIP call whose images the selector routed, the text goes through their
        task; images of several tasks in one call cannot share text features."""
        if self._images_route is None or self._call_routes:
            return None
        if self._images_route == MIXED:
            raise ValueError("The DDAS selector sent this batch's images to different tasks, and one CLIP call has one "
                             "set of text features: classify them with TaskAgnosticClassifier (text per task), or pass "
                             "task_ids.")
        self._call_routes.append(("text_model", self._make_route(self._images_route)))
        return None

    def _end_tower(self, tower: str, module, args, output):
        """Forward hook of a tower: the route its pre-hook gave the call ends with it."""
        if self._call_routes and self._call_routes[-1][0] == tower:
            self._call_routes.pop()

    # ----- task ids ------------------------------------------------------------------------------------------------
    def _make_route(self, task_ids: TaskIds, selections: Optional[dict] = None) -> TaskRoute:
        if selections is not None and not isinstance(selections, dict):
            raise ValueError(f"selections must be a dict (each layer adds the experts it chose), or None; got "
                             f"{type(selections).__name__}.")
        if task_ids is None:
            return NO_ROUTE
        if isinstance(task_ids, torch.Tensor) and task_ids.dim() > 0:
            if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
                raise ValueError(f"task_ids must be an integer tensor (one task id per sample), got {task_ids.dtype}.")
            if task_ids.dim() != 1 or task_ids.numel() == 0 or task_ids.device.type == "meta":
                raise ValueError(f"task_ids must be a non-empty 1-D tensor with values (one task id per sample), got "
                                 f"shape {tuple(task_ids.shape)} on {task_ids.device}; use task_ids.flatten() only if "
                                 "that is the order of the samples.")
            ids = task_ids.long().flatten()
            if torch.compiler.is_compiling():  # checking the values would read them back from the device
                return TaskRoute.per_sample(ids, selections)
            if int(ids.min()) < -1 or int(ids.max()) >= self.num_tasks:
                raise ValueError(f"task_ids must lie in [-1, {self.num_tasks - 1}] (-1 is the zero-shot base model); "
                                 f"got values from {int(ids.min())} to {int(ids.max())}.")
            if not bool((ids >= 0).any()):
                return NO_ROUTE
            self.check_selectable(ids)
            return TaskRoute.per_sample(ids, selections)
        task = self._as_task_id(task_ids)
        if task == -1:
            return NO_ROUTE
        task = self._check_task(task)
        if not torch.compiler.is_compiling():
            self.check_selectable(task)
        return TaskRoute(task=task, selections=selections)

    def check_selectable(self, tasks: Union[int, torch.Tensor]) -> None:
        """With `hide_frozen_experts`, every layer leaves the router of each task in `tasks` (a task id, or per-sample
        ids, -1 for zero-shot) top_k experts that no earlier task froze: checked for every route chosen, so a task
        left fewer is refused before it trains or runs (it would mix fewer experts, or give NaN with none)."""
        config, adapter = self.moe_config, self._adapter()
        if not config.hide_frozen_experts:
            return
        wanted = [tasks] if isinstance(tasks, int) else sorted(set(tasks[tasks >= 0].tolist()))
        layers = self.moe_layers()
        for task in map(self._check_task, wanted):
            short = {name: count for name, layer in layers.items()
                     if (count := layer.selectable_experts(adapter, task)) < config.top_k}
            if short:
                name, count = next(iter(short.items()))
                raise ValueError(f"With hide_frozen_experts, task router {task} could select only {count} expert(s) "
                                 f"in {name} ({len(short)} layer(s) in all), fewer than top_k={config.top_k}: earlier "
                                 "tasks froze the others. Grow the bank (`expert_growth_threshold` of at least top_k "
                                 "/ num_experts) before it trains, or set hide_frozen_experts=False.")

    @staticmethod
    def _as_task_id(value) -> int:
        """An int task id from an int, a numpy integer or a 0-d integer tensor; floats and bools are errors."""
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise ValueError(f"A task id must be an integer, got the boolean {value!r}.")
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise ValueError("A task id must have a value; got a tensor on the meta device. Pass an int.")
        if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
            raise ValueError(f"A task id must be one integer, got {value!r}; per-sample task ids go to routing() or "
                             "`task_ids` as a 1-D integer tensor (torch.tensor(ids)), one id per sample.")
        try:
            return operator.index(value)
        except TypeError:
            raise ValueError(f"A task id must be an integer (or -1 / None for the zero-shot base model), got {value!r} "
                             f"of type {type(value).__name__}; pass int(task) if you mean a whole number.") from None

    def _check_task(self, task: int) -> int:
        """`task` as a task id of this adapter (0 to num_tasks - 1)."""
        task = self._as_task_id(task)
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task!r} is out of range: this adapter has {self.num_tasks} task routers (ids 0 "
                             f"to {self.num_tasks - 1}; -1 or None is the zero-shot base model). Use add_task() to add "
                             "one.")
        return task

    def _check_checkpointed_linear_routing(self) -> None:
        """Linear experts inside a checkpointed block are recomputed in backward, after a per-call route ended."""
        if self.training and any(getattr(module, "gradient_checkpointing", False) and any(
                isinstance(m, MoELoraLinear) for m in module.modules()) for module in self.model.modules()):
            raise ValueError("Per-call routing (task_ids / routing()) in training with gradient checkpointing needs "
                             "the block placement of MoE-LoRA (the default target_modules); with Linear targets use "
                             "set_task(), or disable gradient checkpointing.")
