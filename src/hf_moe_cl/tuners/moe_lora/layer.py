"""Tuner layers: a bank of low-rank experts with one router per task, beside a block's MLP or a Linear."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from .bank import (EXPERT_PARAMS, INDEX_BUFFERS, ROUTER_PARAMS, TRAINABLE, ExpertBank, banks_only, rebuild_after_load,
                   sync_before_save)
from .config import MoELoraConfig
from .gating import TaskRoute, noisy_top_k


NO_MERGE = ("MoE-LoRA routes every sample to its own experts, so it cannot be merged into the base weights; keep the "
            "adapter, or call unload() to get the base model back.")


class MoELoraLayer(ExpertBank, BaseTunerLayer):
    """Stacked experts (expert dimension first) and stacked task routers (task dimension first), stored as
    `bank.ExpertBank` says: what no task froze is trainable, the rest is read in place.

    Routing is an argument of every call (`task_route`), given by the tuner; a layer keeps no routing state.
    """

    adapter_layer_names = tuple(TRAINABLE.values())
    other_param_names = EXPERT_PARAMS + ROUTER_PARAMS + INDEX_BUFFERS + (
        "moe_lora_counts", "moe_lora_expert_task", "moe_lora_frozen_by", "moe_lora_router_frozen",
        "moe_lora_router_list", "moe_lora_visible_list", "moe_lora_selectable_list", "moe_lora_hidden",
        "moe_lora_dropout", "moe_lora_options")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, adapter_name: str,
                 config: MoELoraConfig, num_experts: Optional[int] = None, **kwargs) -> None:
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self._init_banks()
        self.moe_lora_counts = BufferDict(persistent=True)
        self.moe_lora_frozen_by = BufferDict(persistent=True)
        self.moe_lora_router_frozen = BufferDict(persistent=True)
        self.moe_lora_expert_task = BufferDict(persistent=True)  # grown banks only: see add_experts
        self.moe_lora_dropout = nn.ModuleDict()
        self.moe_lora_options: dict[str, MoELoraConfig] = {}
        self.balance_loss: Optional[torch.Tensor] = None
        self.register_state_dict_pre_hook(sync_before_save)
        self.register_state_dict_post_hook(banks_only)
        self.register_load_state_dict_post_hook(rebuild_after_load)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts)

    def update_layer(self, adapter_name: str, config: MoELoraConfig, inference_mode: bool = False,
                     num_experts: Optional[int] = None, **kwargs) -> None:
        """Create the adapter's experts and routers: `num_experts` (default `config.num_experts`; a bank that grew
        records its own count in `config.experts_per_module`)."""
        num_experts = num_experts or config.num_experts
        rank, num_tasks = config.r, config.num_tasks
        bound_a = 1.0 / math.sqrt(self.in_features)
        down = torch.empty(num_experts, rank, self.in_features).uniform_(-bound_a, bound_a)
        up = torch.zeros(num_experts, rank, self.out_features)
        gate = torch.zeros(num_tasks, self.in_features, num_experts)
        if not config.init_weights:
            up.uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
            gate.normal_(0.0, 1.0)
        self.moe_lora_counts[adapter_name] = torch.zeros(num_tasks, num_experts, dtype=torch.long)
        self.moe_lora_frozen_by[adapter_name] = torch.full((num_experts,), -1, dtype=torch.long)
        self.moe_lora_router_frozen[adapter_name] = torch.zeros(num_tasks, dtype=torch.bool)
        if num_experts > config.num_experts:  # a grown bank being loaded: the saved values replace these
            self.moe_lora_expert_task[adapter_name] = torch.zeros(num_experts, dtype=torch.long)
        banks = {"moe_lora_A": down, "moe_lora_B": up, "moe_lora_router_gate": gate,
                 "moe_lora_router_noise": torch.zeros(num_tasks, self.in_features, num_experts)}
        if config.expert_bias:
            banks.update(moe_lora_bias_A=torch.zeros(num_experts, rank),
                         moe_lora_bias_B=torch.zeros(num_experts, self.out_features))
        for name, tensor in banks.items():
            getattr(self, name)[adapter_name] = tensor
        self.moe_lora_options[adapter_name] = config
        self._rebuild(adapter_name)
        self.moe_lora_dropout[adapter_name] = (nn.Dropout(config.expert_dropout) if config.expert_dropout > 0
                                               else nn.Identity())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer):
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            param = next(base_layer.parameters(), None)
            if param is not None:
                device, dtype = param.device, param.dtype
        return device, dtype

    # ----- forward -------------------------------------------------------------------------------------------------
    def _route(self, route: Optional[TaskRoute], batch: int) -> Optional[TaskRoute]:
        if route is None or route.routes_nothing or self.disable_adapters:
            return None
        if route.task_ids is not None and route.task_ids.shape[0] != batch:
            raise ValueError(f"{route.task_ids.shape[0]} task ids were given for a batch of {batch} samples; pass one "
                             "task id per sample of the tower being run (or use set_task() for a whole batch).")
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
        deltas = [self._experts_forward(adapter, x, route.task, task_ids, keep, route.selections)
                  for adapter in self.active_adapters if adapter in self.moe_lora_A]
        total = sum(deltas[1:], deltas[0]) if deltas else None
        if total is None or keep is None:
            return total
        return torch.where(keep.view(-1, *([1] * (total.dim() - 1))), total, total.new_zeros(()))

    def _experts_forward(self, adapter: str, x: torch.Tensor, task: Optional[int], task_ids: Optional[torch.Tensor],
                         keep: Optional[torch.Tensor], selections: Optional[dict] = None) -> torch.Tensor:
        options = self.moe_lora_options[adapter]
        weight_a = self.moe_lora_A[adapter]
        x = x.to(weight_a.dtype)
        tokens = x if x.dim() == 3 else x.unsqueeze(1)
        batch, length, dim = tokens.shape
        index = task if task_ids is None else task_ids
        noisy = options.noisy_gating and (self.training or options.noisy_gating_eval)
        gate = self.router_rows(adapter, "moe_lora_router_gate", index)
        noise = self.router_rows(adapter, "moe_lora_router_noise", index) if noisy else None
        if task_ids is None:  # one task: one product over the experts it may select, as when it trained
            visible = self.visible_experts(adapter, task)
            if visible < gate.shape[-1]:
                gate, noise = (None if w is None else w[:, :visible].contiguous() for w in (gate, noise))
        choice = noisy_top_k(
            tokens[:, 0], gate, noise, top_k=options.top_k, noisy=noisy, noise_epsilon=options.noise_epsilon,
            keep=keep, with_balance_loss=self.training and options.load_balancing_coef > 0,
            hidden=self.hidden_experts(adapter, index), first_experts=None if task_ids is None else options.num_experts)
        if choice.balance_loss is not None:
            loss = options.load_balancing_coef * choice.balance_loss
            self.balance_loss = loss if self.balance_loss is None else self.balance_loss + loss
        experts, mix = choice.experts, choice.weights.to(weight_a.dtype)
        if self.training and not _recomputing():
            self._count(adapter, experts, task, task_ids, keep)
        if selections is not None:
            selections.setdefault(self, []).append(experts.detach())

        # Gather only the chosen experts' weights, one (k*rank)-wide adapter per sample, and run two bmm's with the
        # biases folded in. index_select (not advanced indexing) keeps the backward an index_add, the cheap scatter.
        top_k, rank = experts.shape[1], weight_a.shape[1]
        chosen = experts.flatten()
        down = self.expert_rows(adapter, "moe_lora_A", chosen).view(batch, top_k * rank, dim).transpose(1, 2)
        if adapter in self.moe_lora_bias_A:
            bias_a = self.expert_rows(adapter, "moe_lora_bias_A", chosen).view(batch, 1, top_k * rank)
            hidden = torch.baddbmm(bias_a, tokens, down)
        else:
            hidden = torch.bmm(tokens, down)
        if options.expert_activation is not None:
            hidden = ACT2FN[options.expert_activation](hidden)
        hidden = self.moe_lora_dropout[adapter](hidden)
        if options.expert_scale != 1:
            mix = mix * options.expert_scale
        hidden = (hidden.view(batch, length, top_k, rank) * mix.view(batch, 1, top_k, 1)).view(batch, length, -1)
        up = self.expert_rows(adapter, "moe_lora_B", chosen).view(batch, top_k * rank, self.out_features)
        if adapter in self.moe_lora_bias_B:
            bias_b = self.expert_rows(adapter, "moe_lora_bias_B", chosen).view(batch, top_k, self.out_features)
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
        raise ValueError(NO_MERGE)


def _recomputing() -> bool:
    """True inside autograd's backward, where gradient checkpointing recomputes a forward (a compiled graph never
    reruns Python there)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


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
            raise ValueError(f"MoE-LoRA's block placement needs a pre-LN transformer block with {BLOCK_PARTS} (as "
                             f"CLIP's encoder layers); {type(base_layer).__name__} "
                             + (f"lacks {missing}" if missing else "is already wrapped by another adapter")
                             + ". Target nn.Linear modules instead (target_modules).")
        width = base_layer.layer_norm2.normalized_shape[0]
        MoELoraLayer.__init__(self, base_layer, width, width, adapter_name, config, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args: Any, task_route: Optional[TaskRoute] = None, **kwargs: Any):
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
        return output if delta is None else output + delta.to(output.dtype)

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()


class MoELoraLinear(nn.Module, MoELoraLayer):
    """LoRA-style placement: experts read a Linear's input and add to its output, routed by token 0 of the input."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MoELoraConfig, **kwargs) -> None:
        super().__init__()
        linear = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        MoELoraLayer.__init__(self, base_layer, linear.in_features, linear.out_features, adapter_name, config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, task_route: Optional[TaskRoute] = None, **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        delta = self.moe_delta(x, task_route)
        return result if delta is None else result + delta.to(result.dtype)

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()
