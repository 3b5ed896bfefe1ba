"""Where a layer's experts and routers live, so that what learned tasks froze costs nothing in training.

Every expert tensor and every router tensor has a *bank*: a buffer with all of them in their order (experts first
dimension; routers: one per task), saved as the adapter's tensors (`moe_lora_A`, ..., `moe_lora_router_gate`, the
layout every release saved). Only what can still change is a parameter: the experts no task froze and the routers of
tasks not learned yet, in compact `moe_lora_trainable_*` parameters (not saved: the banks hold their values). Frozen
experts and learned routers are outside autograd, the optimizer and gradient buffers, and are read in place:

- an expert gather reads the bank (one `index_select` of the chosen rows), and its backward scatters into the
  trainable parameter only (`_GatherRows`); the trainable rows are copied into the bank before every forward, in
  training and in evaluation alike, so that a value written into a parameter is always the one used (rows that
  can change: not more than the experts still trainable, whatever the tasks learned);
- a router is read from the parameter when its task can still train, else from the bank; with
  `hide_frozen_experts` such a router may select only the trainable experts, and its parameter holds their columns
  alone (the rest of its row is read from the bank).

Freezing, adding a task and growing the bank rebuild the parameters between tasks, never during one.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

EXPERT_PARAMS = ("moe_lora_A", "moe_lora_B", "moe_lora_bias_A", "moe_lora_bias_B")
ROUTER_PARAMS = ("moe_lora_router_gate", "moe_lora_router_noise")
TRAINABLE = {name: name.replace("moe_lora_", "moe_lora_trainable_", 1) for name in EXPERT_PARAMS + ROUTER_PARAMS}
INDEX_BUFFERS = ("moe_lora_expert_rows", "moe_lora_expert_slot", "moe_lora_router_rows", "moe_lora_router_slot")


def is_trainable_key(key: str) -> bool:
    """A state-dict key of a trainable part (not saved: its bank holds its values)."""
    return any(f".{name}." in key or key.endswith(f".{name}") for name in TRAINABLE.values())


class _GatherRows(torch.autograd.Function):
    """`bank[index]` whose gradient goes to the trainable parameter's rows (`slot[index]`, -1 for a frozen row)."""

    @staticmethod
    def forward(ctx, trainable: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, slot: torch.Tensor):
        rows = slot.index_select(0, index)
        ctx.save_for_backward(rows)
        ctx.trainable_shape = trainable.shape
        return bank.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        keep = (rows >= 0).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad.new_zeros(ctx.trainable_shape).index_add_(0, rows.clamp_min(0), grad * keep), None, None, None


class ExpertBank:
    """The storage part of `MoELoraLayer`: banks, trainable parameters and the maps between them, per adapter."""

    def _init_banks(self) -> None:
        for name in EXPERT_PARAMS + ROUTER_PARAMS:
            setattr(self, name, BufferDict(persistent=True))
            setattr(self, TRAINABLE[name], nn.ParameterDict())
        for name in INDEX_BUFFERS:  # rows that can train, and each row's place among them (-1: none)
            setattr(self, name, BufferDict(persistent=False))
        self.moe_lora_hidden = BufferDict(persistent=False)  # per task, the experts its router may not select
        self.moe_lora_router_list: dict[str, list[int]] = {}  # moe_lora_router_slot as Python ints
        self.moe_lora_visible_list: dict[str, list[int]] = {}  # grown banks: per task, the experts it may select
        self.moe_lora_selectable_list: dict[str, list[int]] = {}  # per task, how many experts `moe_lora_hidden` leaves

    @torch.no_grad()
    def sync_banks(self, adapter: Optional[str] = None, names=EXPERT_PARAMS + ROUTER_PARAMS) -> None:
        """Copy the trainable parameters' values into their banks' rows."""
        for adapter in [adapter] if adapter is not None else list(self.moe_lora_router_list):
            for name in names:
                if adapter in getattr(self, name):
                    bank, rows = getattr(self, name)[adapter], self._rows_of(name)[adapter]
                    value, columns = getattr(self, TRAINABLE[name])[adapter], self._router_columns(adapter, name)
                    if columns is not None:
                        value = bank.index_select(0, rows).index_copy_(2, columns, value)
                    bank.index_copy_(0, rows, value)

    def _rows_of(self, name: str) -> BufferDict:
        return self.moe_lora_router_rows if name in ROUTER_PARAMS else self.moe_lora_expert_rows

    def _router_columns(self, adapter: str, name: str) -> Optional[torch.Tensor]:
        """With `hide_frozen_experts`, a router that can still train may select only the trainable experts (no
        earlier task froze the others, and its own task has not frozen any yet): its parameter holds their columns
        only, so the optimizer's state does not grow with the bank. None: the whole row."""
        if name not in ROUTER_PARAMS or not self.moe_lora_options[adapter].hide_frozen_experts:
            return None
        return self.moe_lora_expert_rows[adapter]

    @torch.no_grad()
    def _rebuild(self, adapter: str) -> None:
        """The trainable parameters from the banks and the frozen flags (after a freeze, a new task, a growth or a
        load): one row per expert no task froze, per router of a task not learned."""
        for kind, frozen in (("expert", self.moe_lora_frozen_by[adapter] >= 0),
                             ("router", self.moe_lora_router_frozen[adapter])):
            meta = frozen.device.type == "meta"  # a model being sized, not run: nothing is frozen
            rows = torch.arange(len(frozen), device=frozen.device) if meta else torch.nonzero(~frozen).flatten()
            getattr(self, f"moe_lora_{kind}_rows")[adapter] = rows
            getattr(self, f"moe_lora_{kind}_slot")[adapter] = torch.full_like(frozen, -1, dtype=torch.long).index_put_(
                (rows,), torch.arange(len(rows), device=rows.device))
        # read by Python when a whole batch takes one task: no device sync
        slots = self.moe_lora_router_slot[adapter]
        self.moe_lora_router_list[adapter] = list(range(len(slots))) if slots.is_meta else slots.tolist()
        self._rebuild_hidden(adapter, len(slots), slots.is_meta)
        for name in [name for name in EXPERT_PARAMS + ROUTER_PARAMS if adapter in getattr(self, name)]:
            trainable = getattr(self, TRAINABLE[name])
            grad = trainable[adapter].requires_grad if adapter in trainable else True
            value = getattr(self, name)[adapter].index_select(0, self._rows_of(name)[adapter])
            columns = self._router_columns(adapter, name)
            trainable[adapter] = nn.Parameter(value if columns is None else value.index_select(2, columns),
                                              requires_grad=grad)

    def _rebuild_hidden(self, adapter: str, num_tasks: int, meta: bool) -> None:
        """Per task, the experts its router may not select (`moe_lora_hidden`, (tasks, experts)): those added after
        it trained (a grown bank, whose visible prefix `moe_lora_visible_list` also records) and, with
        `hide_frozen_experts`, those frozen by an earlier task. A task's row never changes once it trained."""
        if adapter in self.moe_lora_hidden:
            del self.moe_lora_hidden[adapter]
        self.moe_lora_selectable_list.pop(adapter, None)
        if meta:
            return
        frozen_by = self.moe_lora_frozen_by[adapter]
        tasks = torch.arange(num_tasks, device=frozen_by.device).unsqueeze(1)
        hidden = None
        if adapter in self.moe_lora_expert_task:
            first_task = self.moe_lora_expert_task[adapter]
            self.moe_lora_visible_list[adapter] = torch.searchsorted(first_task, tasks.flatten(), right=True).tolist()
            hidden = first_task.unsqueeze(0) > tasks
        if self.moe_lora_options[adapter].hide_frozen_experts:
            earlier = (frozen_by.unsqueeze(0) >= 0) & (frozen_by.unsqueeze(0) < tasks)
            hidden = earlier if hidden is None else hidden | earlier
        if hidden is not None:
            self.moe_lora_hidden[adapter] = hidden
            self.moe_lora_selectable_list[adapter] = (~hidden).sum(1).tolist()

    # ----- reading -------------------------------------------------------------------------------------------------
    def expert_rows(self, adapter: str, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of an expert tensor as the forward pass sees them; the bank's trainable rows are refreshed
        first."""
        self.sync_banks(adapter, (name,))
        return _GatherRows.apply(getattr(self, TRAINABLE[name])[adapter], getattr(self, name)[adapter], index,
                                 self.moe_lora_expert_slot[adapter])

    def router_rows(self, adapter: str, name: str, index: Union[int, torch.Tensor]) -> torch.Tensor:
        """Router `index` (a task) or routers per sample (a 1-d tensor of tasks): a task that can still train from
        the parameter, a learned one from the bank."""
        slots, bank = self.moe_lora_router_slot[adapter], getattr(self, name)[adapter]
        trainable, columns = getattr(self, TRAINABLE[name])[adapter], self._router_columns(adapter, name)
        if isinstance(index, int):
            slot = self.moe_lora_router_list[adapter][index]
            if slot < 0:
                return bank[index]
            return trainable[slot] if columns is None else bank[index].index_copy(1, columns, trainable[slot])
        learned = bank.index_select(0, index)
        if trainable.shape[0] == 0:
            return learned
        rows = slots.index_select(0, index)
        current = trainable.index_select(0, rows.clamp_min(0))
        if columns is not None:
            current = learned.index_copy(2, columns, current)
        return torch.where((rows >= 0).view(-1, 1, 1), current, learned)

    def bank(self, adapter: str, name: str) -> torch.Tensor:
        """Every row of a tensor, up to date (frozen rows, and the trainable rows' current values)."""
        self.sync_banks(adapter, (name,))
        return getattr(self, name)[adapter]

    # ----- freezing, tasks, growth ---------------------------------------------------------------------------------
    def freeze_experts(self, adapter: str, experts: list[int], task: int) -> list[int]:
        frozen_by = self.moe_lora_frozen_by[adapter]
        self._check_index("task", task, len(self.moe_lora_router_frozen[adapter]))
        for expert in experts:
            self._check_index("expert", expert, len(frozen_by))
        new = [e for e in experts if int(frozen_by[e]) < 0]
        if new:
            self.sync_banks(adapter)
            frozen_by[torch.tensor(new, device=frozen_by.device)] = task
            self._rebuild(adapter)
        return new

    def freeze_router(self, adapter: str, task: int) -> None:
        self._check_index("task", task, len(self.moe_lora_router_frozen[adapter]))
        self.sync_banks(adapter)
        self.moe_lora_router_frozen[adapter][task] = True
        self._rebuild(adapter)

    @staticmethod
    def _check_index(what: str, value, count: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
            raise ValueError(f"The {what} to freeze must be an int from 0 to {count - 1} (this layer has {count}), got "
                             f"{value!r}.")

    @torch.no_grad()
    def add_task(self, adapter: str) -> None:
        """Append a zero-initialised router (and its bookkeeping rows) for one more task."""
        self.sync_banks(adapter)
        for rows in [getattr(self, n) for n in ROUTER_PARAMS] + [self.moe_lora_counts, self.moe_lora_router_frozen]:
            old = rows[adapter]
            rows[adapter] = torch.cat([old, old.new_zeros(1, *old.shape[1:])])
        self._rebuild(adapter)

    def expert_count(self, adapter: str) -> int:
        return self.moe_lora_A[adapter].shape[0]

    @torch.no_grad()
    def add_experts(self, adapter: str, count: int, first_task: int) -> None:
        """Append `count` experts that change no output: up-projections and biases zero, down-projections drawn as
        at creation, router columns zero for every task. Routers of tasks before `first_task` never select them
        (`moe_lora_expert_task`: per expert, the first task router that may), so a learned task routes exactly
        as before; the new experts are trainable (frozen by no task)."""
        if count < 1:
            raise ValueError(f"count must be a positive number of experts, got {count}.")
        tasks = self.moe_lora_expert_task
        if adapter in tasks and first_task < int(tasks[adapter].max()):
            raise ValueError(f"Experts for task {first_task} cannot follow experts added for task "
                             f"{int(tasks[adapter].max())}: a bank grows in task order (each task's router sees the "
                             "experts before its own).")
        self.sync_banks(adapter)
        for name in EXPERT_PARAMS:
            if adapter in getattr(self, name):
                old = getattr(self, name)[adapter]
                new = old.new_zeros(count, *old.shape[1:])
                if name == "moe_lora_A":
                    bound = 1.0 / math.sqrt(self.in_features)
                    new.uniform_(-bound, bound)
                getattr(self, name)[adapter] = torch.cat([old, new])
        for columns in [getattr(self, name) for name in ROUTER_PARAMS] + [self.moe_lora_counts]:
            old = columns[adapter]
            columns[adapter] = torch.cat([old, old.new_zeros(*old.shape[:-1], count)], dim=-1)
        frozen_by = self.moe_lora_frozen_by[adapter]
        self.moe_lora_frozen_by[adapter] = torch.cat([frozen_by, frozen_by.new_full((count,), -1)])
        first = tasks[adapter] if adapter in tasks else torch.zeros_like(frozen_by)
        self.moe_lora_expert_task[adapter] = torch.cat([first, first.new_full((count,), first_task)])
        self._rebuild(adapter)

    def visible_experts(self, adapter: str, task: int) -> int:
        """How many experts task `task`'s router may select: the first ones, those the bank had when it trained."""
        visible = self.moe_lora_visible_list.get(adapter)
        return self.expert_count(adapter) if visible is None else visible[task]

    def selectable_experts(self, adapter: str, task: int) -> int:
        """How many experts task `task`'s router may select (neither added after it trained nor hidden)."""
        selectable = self.moe_lora_selectable_list.get(adapter)
        return self.expert_count(adapter) if selectable is None else selectable[task]

    def hidden_experts(self, adapter: str, task: Union[int, torch.Tensor]) -> Optional[torch.Tensor]:
        """The experts a router may not select (see `_rebuild_hidden`; None: none): (batch, experts) for per-sample
        task ids; for one task, which is given only its visible prefix of the bank, (visible,) of the experts
        earlier tasks froze (`hide_frozen_experts`)."""
        hidden = self.moe_lora_hidden[adapter] if adapter in self.moe_lora_hidden else None
        if hidden is None or not isinstance(task, int):
            return None if hidden is None else hidden.index_select(0, task.to(hidden.device))
        if not self.moe_lora_options[adapter].hide_frozen_experts:
            return None
        return hidden[task, :self.visible_experts(adapter, task)]

    def merge_top_experts(self, adapter: str, counts: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]):
        """Average the two most-selected experts (by a task's `counts`) into its least-selected trainable one.

        Returns `(sources, target)` or None when the task has no selections yet or no trainable expert is left
        outside the two sources. The target's optimizer state (e.g. Adam moments) is zeroed so stale statistics
        of the overwritten expert do not steer the merged weights.
        """
        counts = counts.to(self.moe_lora_frozen_by[adapter].device)
        if int(counts.sum()) == 0 or counts.numel() < 3:
            return None
        order = torch.sort(counts, descending=True, stable=True).indices
        sources = order[:2].tolist()
        trainable = self.moe_lora_frozen_by[adapter] < 0  # a new tensor
        trainable[sources] = False
        if not bool(trainable.any()):
            return None
        candidates = torch.nonzero(trainable).flatten()
        target = int(candidates[torch.argmin(counts[candidates])])
        row = int(self.moe_lora_expert_slot[adapter][target])
        with torch.no_grad():
            for name in [name for name in EXPERT_PARAMS if adapter in getattr(self, name)]:
                value = self.bank(adapter, name)
                param = getattr(self, TRAINABLE[name])[adapter]
                param.data[row] = (value[sources[0]] + value[sources[1]]) / 2
                for tensor in (optimizer.state.get(param, {}) if optimizer is not None else {}).values():
                    if torch.is_tensor(tensor) and tensor.shape == param.shape:
                        tensor[row] = 0
        return sources, target


def sync_before_save(module: ExpertBank, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: the banks hold the trainable rows' current values when saved."""
    module.sync_banks()


def banks_only(module: ExpertBank, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: a state dict holds the banks, never the trainable parts (whose shapes depend on what is
    frozen), so that it loads into a model frozen otherwise."""
    for key in [key for key in state_dict if key.startswith(prefix) and is_trainable_key(key)]:
        del state_dict[key]


def rebuild_after_load(module: ExpertBank, incompatible_keys) -> None:
    """Load post-hook: the loaded banks and frozen flags give the trainable parameters (which a state dict does not
    hold: not missing)."""
    for adapter in list(module.moe_lora_router_list):
        module._rebuild(adapter)
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not is_trainable_key(key)]
