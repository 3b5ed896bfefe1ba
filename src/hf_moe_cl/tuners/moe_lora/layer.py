"""Tuner layers: a bank of low-rank experts with one router per task, beside a block's MLP or a Linear."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from .config import MoELoraConfig
from .gating import TaskRoute, noisy_top_k

EXPERT_PARAMS = ("moe_lora_A", "moe_lora_B", "moe_lora_bias_A", "moe_lora_bias_B")
ROUTER_PARAMS = ("moe_lora_router_gate", "moe_lora_router_noise")


class MoELoraLayer(BaseTunerLayer):
    """Stacked experts (expert dimension first) and stacked task routers (task dimension first).

    Activate-freeze is enforced per slice: a frozen expert or router is read from a snapshot taken when it was
    frozen, so no optimizer (momentum, weight decay) can move it, and the parameter slice itself is rewritten from
    the snapshot before every `state_dict()`.

    Routing is an argument of every call (`task_route`), given by the tuner; a layer keeps no routing state.
    """

    adapter_layer_names = EXPERT_PARAMS + ROUTER_PARAMS
    other_param_names = (
        "moe_lora_counts",
        "moe_lora_expert_task",
        "moe_lora_frozen_by",
        "moe_lora_router_frozen",
        "moe_lora_snapshot",
        "moe_lora_dropout",
        "moe_lora_options",
    )

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, **kwargs) -> None:
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        for name in EXPERT_PARAMS + ROUTER_PARAMS:
            setattr(self, name, nn.ParameterDict())
        self.moe_lora_counts = BufferDict(persistent=True)
        self.moe_lora_frozen_by = BufferDict(persistent=True)
        self.moe_lora_router_frozen = BufferDict(persistent=True)
        self.moe_lora_expert_task = BufferDict(persistent=True)  # grown banks only: see add_experts
        self.moe_lora_expert_groups: dict[str, tuple[int, ...]] = {}  # grown banks: experts added together
        self.moe_lora_snapshot = nn.ModuleDict()
        self.moe_lora_dropout = nn.ModuleDict()
        self.moe_lora_options: dict[str, MoELoraConfig] = {}
        self.balance_loss: Optional[torch.Tensor] = None
        self.kwargs = kwargs
        self.register_state_dict_pre_hook(_write_frozen_slices_before_save)
        self.register_load_state_dict_post_hook(_snapshot_frozen_slices_after_load)
        self.register_load_state_dict_post_hook(_expert_groups_after_load)

    def update_layer(self, adapter_name: str, config: MoELoraConfig, inference_mode: bool = False,
                     num_experts: Optional[int] = None, **kwargs) -> None:
        """Create the adapter's experts and routers: `num_experts` (default `config.num_experts`; a bank that grew
        records its own count in `config.experts_per_module`)."""
        num_experts = num_experts or config.num_experts
        rank, num_tasks = config.r, config.num_tasks
        bound_a = 1.0 / math.sqrt(self.in_features)
        self.moe_lora_A[adapter_name] = nn.Parameter(
            torch.empty(num_experts, rank, self.in_features).uniform_(-bound_a, bound_a)
        )
        up = torch.zeros(num_experts, rank, self.out_features)
        gate = torch.zeros(num_tasks, self.in_features, num_experts)
        if not config.init_weights:
            up.uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
            gate.normal_(0.0, 1.0)
        self.moe_lora_B[adapter_name] = nn.Parameter(up)
        if config.expert_bias:
            self.moe_lora_bias_A[adapter_name] = nn.Parameter(torch.zeros(num_experts, rank))
            self.moe_lora_bias_B[adapter_name] = nn.Parameter(torch.zeros(num_experts, self.out_features))
        self.moe_lora_router_gate[adapter_name] = nn.Parameter(gate)
        self.moe_lora_router_noise[adapter_name] = nn.Parameter(torch.zeros(num_tasks, self.in_features, num_experts))
        self.moe_lora_counts[adapter_name] = torch.zeros(num_tasks, num_experts, dtype=torch.long)
        self.moe_lora_frozen_by[adapter_name] = torch.full((num_experts,), -1, dtype=torch.long)
        self.moe_lora_router_frozen[adapter_name] = torch.zeros(num_tasks, dtype=torch.bool)
        if num_experts > config.num_experts:  # a grown bank being loaded: the saved values replace these
            self.moe_lora_expert_task[adapter_name] = torch.zeros(num_experts, dtype=torch.long)
        self.moe_lora_snapshot[adapter_name] = BufferDict(persistent=False)
        self.moe_lora_dropout[adapter_name] = (
            nn.Dropout(config.expert_dropout) if config.expert_dropout > 0 else nn.Identity()
        )
        self.moe_lora_options[adapter_name] = config
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer):
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            param = next(base_layer.parameters(), None)
            if param is not None:
                device, dtype = param.device, param.dtype
        return device, dtype

    # ----- frozen slices -------------------------------------------------------------------------------------------
    def _frozen_rows(self, adapter: str, name: str) -> torch.Tensor:
        if name in ROUTER_PARAMS:
            return self.moe_lora_router_frozen[adapter]
        return self.moe_lora_frozen_by[adapter] >= 0

    def effective(self, adapter: str, name: str) -> torch.Tensor:
        """The parameter as the forward pass sees it: frozen slices come from their snapshot."""
        param = getattr(self, name)[adapter]
        snapshots = self.moe_lora_snapshot[adapter]
        if name not in snapshots:
            return param
        rows = self._frozen_rows(adapter, name).view(-1, *([1] * (param.dim() - 1)))
        return torch.where(rows, snapshots[name], param)

    def _snapshot_rows(self, adapter: str, name: str, rows: torch.Tensor) -> None:
        param = getattr(self, name)[adapter].detach()
        snapshots = self.moe_lora_snapshot[adapter]
        if name not in snapshots:
            snapshots[name] = param.clone()
        else:
            snapshots[name][rows] = param[rows]

    def write_frozen_slices(self) -> None:
        """Copy every snapshot back into its parameter, undoing what an optimizer did to frozen slices."""
        with torch.no_grad():
            for adapter in self.moe_lora_snapshot:
                for name in self.moe_lora_snapshot[adapter].keys():
                    getattr(self, name)[adapter].data.copy_(self.effective(adapter, name))

    def freeze_experts(self, adapter: str, experts: list[int], task: int) -> list[int]:
        frozen_by = self.moe_lora_frozen_by[adapter]
        new = [e for e in experts if int(frozen_by[e]) < 0]
        if not new:
            return []
        rows = torch.tensor(new, device=frozen_by.device)
        with torch.no_grad():
            frozen_by[rows] = task
            for name in EXPERT_PARAMS:
                if adapter in getattr(self, name):
                    self._snapshot_rows(adapter, name, rows)
        return new

    def freeze_router(self, adapter: str, task: int) -> None:
        with torch.no_grad():
            self.moe_lora_router_frozen[adapter][task] = True
            rows = torch.tensor([task], device=self.moe_lora_router_frozen[adapter].device)
            for name in ROUTER_PARAMS:
                self._snapshot_rows(adapter, name, rows)

    def add_task(self, adapter: str) -> None:
        """Append a zero-initialised router (and its bookkeeping rows) for one more task."""
        with torch.no_grad():
            for name in ROUTER_PARAMS:
                old = getattr(self, name)[adapter]
                grown = torch.cat([old.detach(), old.new_zeros(1, *old.shape[1:])])
                getattr(self, name)[adapter] = nn.Parameter(grown, requires_grad=old.requires_grad)
                snapshots = self.moe_lora_snapshot[adapter]
                if name in snapshots:
                    snapshots[name] = torch.cat([snapshots[name], grown[-1:].clone()])
            counts = self.moe_lora_counts[adapter]
            self.moe_lora_counts[adapter] = torch.cat([counts, counts.new_zeros(1, counts.shape[1])])
            frozen = self.moe_lora_router_frozen[adapter]
            self.moe_lora_router_frozen[adapter] = torch.cat([frozen, frozen.new_zeros(1)])

    def expert_count(self, adapter: str) -> int:
        return self.moe_lora_A[adapter].shape[0]

    def add_experts(self, adapter: str, count: int, first_task: int) -> None:
        """Append `count` experts that change no output: up-projections and biases zero, down-projections drawn as
        at creation, router columns zero for every task. Routers of tasks before `first_task` never select them
        (`moe_lora_expert_task`: per expert, the first task router that may), so a learned task routes exactly
        as before; the new experts are trainable (frozen by no task)."""
        if count < 1:
            raise ValueError(f"count must be a positive number of experts, got {count}.")
        old_count = self.expert_count(adapter)
        with torch.no_grad():
            for name in EXPERT_PARAMS:
                if adapter not in getattr(self, name):
                    continue
                old = getattr(self, name)[adapter]
                new = old.new_zeros(count, *old.shape[1:])
                if name == "moe_lora_A":
                    bound = 1.0 / math.sqrt(self.in_features)
                    new.uniform_(-bound, bound)
                getattr(self, name)[adapter] = nn.Parameter(torch.cat([old.detach(), new]),
                                                            requires_grad=old.requires_grad)
                snapshots = self.moe_lora_snapshot[adapter]
                if name in snapshots:
                    snapshots[name] = torch.cat([snapshots[name], new.clone()])
            for name in ROUTER_PARAMS:
                old = getattr(self, name)[adapter]
                columns = old.new_zeros(*old.shape[:-1], count)
                getattr(self, name)[adapter] = nn.Parameter(torch.cat([old.detach(), columns], dim=-1),
                                                            requires_grad=old.requires_grad)
                snapshots = self.moe_lora_snapshot[adapter]
                if name in snapshots:
                    snapshots[name] = torch.cat([snapshots[name], columns.clone()], dim=-1)
            counts = self.moe_lora_counts[adapter]
            self.moe_lora_counts[adapter] = torch.cat([counts, counts.new_zeros(counts.shape[0], count)], dim=1)
            frozen_by = self.moe_lora_frozen_by[adapter]
            self.moe_lora_frozen_by[adapter] = torch.cat([frozen_by, frozen_by.new_full((count,), -1)])
            tasks = self.moe_lora_expert_task
            first = tasks[adapter] if adapter in tasks else frozen_by.new_zeros(old_count)
            self.moe_lora_expert_task[adapter] = torch.cat([first, first.new_full((count,), first_task)])
        self.moe_lora_expert_groups[adapter] = self.moe_lora_expert_groups.get(adapter, (old_count,)) + (count,)

    def _expert_groups_from_tasks(self) -> None:
        """The groups of experts added together, from `moe_lora_expert_task` (runs of one first task)."""
        for adapter in self.moe_lora_expert_task:
            groups = torch.unique_consecutive(self.moe_lora_expert_task[adapter], return_counts=True)[1]
            self.moe_lora_expert_groups[adapter] = tuple(groups.tolist())

    def hidden_experts(self, adapter: str, index: Union[int, torch.Tensor]) -> Optional[torch.Tensor]:
        """Experts the routers `index` (a task, or one per sample) may not select: those added after they were
        trained (None for a bank that never grew). (experts,) for a task, (batch, experts) per sample."""
        if adapter not in self.moe_lora_expert_task:
            return None
        first = self.moe_lora_expert_task[adapter]
        if isinstance(index, int):
            return first > index
        return first.unsqueeze(0) > index.to(first.device).unsqueeze(1)

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
        trainable = (self.moe_lora_frozen_by[adapter] < 0).clone()
        trainable[sources] = False
        if not bool(trainable.any()):
            return None
        candidates = torch.nonzero(trainable).flatten()
        target = int(candidates[torch.argmin(counts[candidates])])
        with torch.no_grad():
            for name in EXPERT_PARAMS:
                if adapter not in getattr(self, name):
                    continue
                param = getattr(self, name)[adapter]
                value = self.effective(adapter, name)
                param.data[target] = (value[sources[0]] + value[sources[1]]) / 2
                state = optimizer.state.get(param, {}) if optimizer is not None else {}
                for tensor in state.values():
                    if torch.is_tensor(tensor) and tensor.shape == param.shape:
                        tensor[target] = 0
        return sources, target

    # ----- forward -------------------------------------------------------------------------------------------------
    def _route(self, route: Optional[TaskRoute], batch: int) -> Optional[TaskRoute]:
        if route is None or route.routes_nothing or self.disable_adapters:
            return None
        if route.task_ids is not None and route.task_ids.shape[0] != batch:
            raise ValueError(
                f"{route.task_ids.shape[0]} task ids were given for a batch of {batch} samples; pass one task id "
                "per sample of the tower being run (or use set_task() for a whole batch)."
            )
        return route

    def moe_delta(self, x: torch.Tensor, route: Optional[TaskRoute]) -> Optional[torch.Tensor]:
        """Sum over the active adapters of the routed experts' output for `x` (batch, [tokens,] in_features).

        In training the selections are counted (for activate-freeze and merging), but not when gradient
        checkpointing recomputes the forward in backward. Samples routed to -1 get no expert output.
        """
        self.balance_loss = None
        route = self._route(route, x.shape[0])
        if route is None:
            return None
        keep = None
        task_ids = route.task_ids
        if task_ids is not None:
            task_ids = task_ids.to(x.device)
            keep = task_ids >= 0
            task_ids = task_ids.clamp_min(0)
        total = None
        for adapter in self.active_adapters:
            if adapter not in self.moe_lora_A:
                continue
            delta = self._experts_forward(adapter, x, route.task, task_ids, keep, route.selections)
            total = delta if total is None else total + delta
        if total is None or keep is None:
            return total
        return torch.where(keep.view(-1, *([1] * (total.dim() - 1))), total, total.new_zeros(()))

    def _rows(self, adapter: str, name: str, index: Union[int, torch.Tensor],
              frozen: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows `index` (an int, or a 1-d index tensor) of a parameter as the forward pass sees it: frozen rows from
        their snapshot. Only the rows used are read, never the whole bank; `frozen` is the rows' frozen mask when
        the caller has it already."""
        param = getattr(self, name)[adapter]
        snapshots = self.moe_lora_snapshot[adapter]
        pick = (lambda t: t[index]) if isinstance(index, int) else (lambda t: t.index_select(0, index))
        if name not in snapshots:
            return pick(param)
        if frozen is None:
            frozen = pick(self._frozen_rows(adapter, name))
        return torch.where(frozen.view(*frozen.shape, *([1] * (param.dim() - 1))), pick(snapshots[name]),
                           pick(param))

    def _experts_forward(
        self, adapter: str, x: torch.Tensor, task: Optional[int], task_ids: Optional[torch.Tensor],
        keep: Optional[torch.Tensor], selections: Optional[dict] = None,
    ) -> torch.Tensor:
        options = self.moe_lora_options[adapter]
        weight_a = self.moe_lora_A[adapter]
        if x.dtype != weight_a.dtype:
            x = x.to(weight_a.dtype)
        tokens = x if x.dim() == 3 else x.unsqueeze(1)
        batch, length, dim = tokens.shape
        index = task if task_ids is None else task_ids
        noisy = options.noisy_gating and (self.training or options.noisy_gating_eval)
        choice = noisy_top_k(
            tokens[:, 0],
            self._rows(adapter, "moe_lora_router_gate", index),
            self._rows(adapter, "moe_lora_router_noise", index) if noisy else None,
            top_k=options.top_k,
            noisy=noisy,
            noise_epsilon=options.noise_epsilon,
            with_balance_loss=self.training and options.load_balancing_coef > 0,
            keep=keep,
            hidden=self.hidden_experts(adapter, index),
            expert_groups=self.moe_lora_expert_groups.get(adapter),
        )
        if choice.balance_loss is not None:
            loss = options.load_balancing_coef * choice.balance_loss
            self.balance_loss = loss if self.balance_loss is None else self.balance_loss + loss
        experts, mix = choice.experts, choice.weights
        if mix.dtype != weight_a.dtype:
            mix = mix.to(weight_a.dtype)
        if self.training and not _recomputing():
            self._count(adapter, experts, task, task_ids, keep)
        if selections is not None:
            selections.setdefault(self, []).append(experts.detach())

        # Gather only the chosen experts' weights, one (k*rank)-wide adapter per sample, and run two bmm's with the
        # biases folded in. index_select (not advanced indexing) keeps the backward an index_add, the cheap scatter.
        top_k, rank = experts.shape[1], weight_a.shape[1]
        chosen = experts.flatten()
        frozen = None
        if "moe_lora_A" in self.moe_lora_snapshot[adapter]:
            frozen = self._frozen_rows(adapter, "moe_lora_A").index_select(0, chosen)
        down = self._rows(adapter, "moe_lora_A", chosen, frozen).view(batch, top_k * rank, dim).transpose(1, 2)
        if adapter in self.moe_lora_bias_A:
            bias_a = self._rows(adapter, "moe_lora_bias_A", chosen, frozen).view(batch, 1, top_k * rank)
            hidden = torch.baddbmm(bias_a, tokens, down)
        else:
            hidden = torch.bmm(tokens, down)
        if options.expert_activation is not None:
            hidden = ACT2FN[options.expert_activation](hidden)
        hidden = self.moe_lora_dropout[adapter](hidden)
        if options.expert_scale != 1:
            mix = mix * options.expert_scale
        hidden = (hidden.view(batch, length, top_k, rank) * mix.view(batch, 1, top_k, 1)).view(batch, length, -1)
        up = self._rows(adapter, "moe_lora_B", chosen, frozen).view(batch, top_k * rank, self.out_features)
        if adapter in self.moe_lora_bias_B:
            bias_b = self._rows(adapter, "moe_lora_bias_B", chosen, frozen).view(batch, top_k, self.out_features)
            out = torch.baddbmm(torch.bmm(mix.unsqueeze(1), bias_b), hidden, up)
        else:
            out = torch.bmm(hidden, up)
        return out if x.dim() == 3 else out.squeeze(1)

    def _count(self, adapter: str, experts: torch.Tensor, task: Optional[int], task_ids: Optional[torch.Tensor],
               keep: Optional[torch.Tensor]):
        with torch.no_grad():
            counts = self.moe_lora_counts[adapter]
            flat = experts.flatten()
            if task_ids is None:
                counts[task].index_add_(0, flat, torch.ones_like(flat))
            else:
                rows = task_ids.repeat_interleave(experts.shape[1])
                ones = keep.repeat_interleave(experts.shape[1]).to(flat.dtype)
                counts.index_put_((rows, flat), ones, accumulate=True)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "MoE-LoRA routes every sample to its own experts, so it cannot be merged into the base weights; "
            "keep the adapter, or call unload() to get the base model back."
        )


def _recomputing() -> bool:
    """True inside autograd's backward, where gradient checkpointing recomputes a forward (a compiled graph never
    reruns Python there)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _write_frozen_slices_before_save(module: MoELoraLayer, prefix: str, keep_vars: bool) -> None:
    module.write_frozen_slices()


def _snapshot_frozen_slices_after_load(module: MoELoraLayer, incompatible_keys) -> None:
    """Loaded parameters hold the frozen values: rebuild the snapshots from them."""
    with torch.no_grad():
        for adapter in module.moe_lora_snapshot:
            snapshots = module.moe_lora_snapshot[adapter]
            for name in EXPERT_PARAMS + ROUTER_PARAMS:
                params = getattr(module, name)
                if adapter in params and bool(module._frozen_rows(adapter, name).any()):
                    snapshots[name] = params[adapter].detach().clone()
                elif name in snapshots:
                    del snapshots[name]


def _expert_groups_after_load(module: MoELoraLayer, incompatible_keys) -> None:
    module._expert_groups_from_tasks()


BLOCK_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


class MoELoraBlock(nn.Module, MoELoraLayer):
    """Expert bank beside a pre-LN transformer block's MLP, as in MoE-Adapters.

    The experts read the post-attention residual stream (the input of `layer_norm2`) and their output is added to
    the block's output: block(x) + experts(h_mid), routed by token 0 of h_mid (CLS for images, SOT for text). The
    adapted block is computed from the block's own parts (attention, the two layer norms, the MLP), so h_mid is a
    value of the forward, not something a hook captures: the layer traces into one graph under `torch.compile`.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoELoraConfig, **kwargs) -> None:
        super().__init__()
        missing = [part for part in BLOCK_PARTS if not isinstance(getattr(base_layer, part, None), nn.Module)]
        if missing or isinstance(base_layer, BaseTunerLayer):
            raise ValueError(
                f"MoE-LoRA's block placement needs a pre-LN transformer block with {BLOCK_PARTS} (as CLIP's "
                f"encoder layers); {type(base_layer).__name__} " + (f"lacks {missing}" if missing else
                "is already wrapped by another adapter") + ". Target nn.Linear modules instead (target_modules)."
            )
        width = base_layer.layer_norm2.normalized_shape[0]
        num_experts = kwargs.pop("num_experts", None)
        MoELoraLayer.__init__(self, base_layer, width, width, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts)

    def forward(self, hidden_states: torch.Tensor, *args: Any, task_route: Optional[TaskRoute] = None,
                **kwargs: Any):
        route = self._route(task_route, hidden_states.shape[0])
        if route is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        base = self.base_layer
        if getattr(base, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            # Checkpoint the block and its experts together, the route bound to the call: the recomputation in
            # backward routes exactly as the forward did, whatever the caller's routing is by then.
            function = partial(self._adapted_forward, route=route, **kwargs)
            return base._gradient_checkpointing_func(function, hidden_states, *args)
        return self._adapted_forward(hidden_states, *args, route=route, **kwargs)

    def _adapted_forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                         route: TaskRoute, **kwargs: Any):
        """The block (as CLIPEncoderLayer computes it) plus its experts on the post-attention stream."""
        block = self.base_layer
        attended = block.self_attn(hidden_states=block.layer_norm1(hidden_states), attention_mask=attention_mask,
                                   **kwargs)[0]
        middle = hidden_states + attended
        output = middle + block.mlp(block.layer_norm2(middle))
        delta = self.moe_delta(middle, route)
        if delta is None:
            return output
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()


class MoELoraLinear(nn.Module, MoELoraLayer):
    """LoRA-style placement: experts read a Linear's input and add to its output, routed by token 0 of the input."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MoELoraConfig, **kwargs) -> None:
        super().__init__()
        linear = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        num_experts = kwargs.pop("num_experts", None)
        MoELoraLayer.__init__(self, base_layer, linear.in_features, linear.out_features, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts)

    def forward(self, x: torch.Tensor, *args: Any, task_route: Optional[TaskRoute] = None, **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        delta = self.moe_delta(x, task_route)
        if delta is None:
            return result
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype))

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()
