"""Which experts each task uses and which are frozen: activate-freeze, expert merging and their bookkeeping.

`ExpertBookkeeping` is a part of `MoELoraModel`: it works on the tuner's layers (`moe_layers()`) and its active
adapter.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layer import EXPERT_PARAMS, ROUTER_PARAMS


class ExpertBookkeeping:
    """Selection counts, freezing and merging over every MoE layer of the tuner."""

    def selection_histogram(self, selections: dict) -> dict[str, torch.Tensor]:
        """Per layer name, how often each expert was chosen in the calls that filled `selections` (`routing(...,
        selections=...)`)."""
        num_experts = self.moe_config.num_experts
        names = {layer: name for name, layer in self.moe_layers().items()}
        return {names[layer]: torch.bincount(torch.cat(chosen).flatten().cpu(), minlength=num_experts)
                for layer, chosen in selections.items()}

    def selection_counts(self, task: Optional[int] = None) -> dict[str, torch.Tensor]:
        """How often each expert was selected in training: (tasks, experts) per layer, or (experts,) for one task."""
        adapter = self._adapter()
        counts = {name: layer.moe_lora_counts[adapter] for name, layer in self.moe_layers().items()}
        if task is None:
            return counts
        self._check_task(task)
        return {name: c[task] for name, c in counts.items()}

    def set_selection_counts(self, task: int, counts: dict[str, torch.Tensor]) -> None:
        """Overwrite one task's counts, e.g. with the sum over data-parallel processes."""
        adapter = self._adapter()
        self._check_task(task)
        for name, layer in self.moe_layers().items():
            layer.moe_lora_counts[adapter][task] = counts[name].to(layer.moe_lora_counts[adapter].device)

    def freeze_covering(self, task: int, histogram: dict[str, torch.Tensor], coverage: float = 1.0
                        ) -> dict[str, list[int]]:
        """Per layer, freeze the most-used experts of `histogram` (e.g. a task's evaluation-time selections) until
        they carry `coverage` of its selections (1.0: every expert it uses), and the task's router."""
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage!r}.")
        adapter = self._adapter()
        task = self._check_task(task)
        newly = {}
        for name, layer in self.moe_layers().items():
            counts = histogram.get(name)
            chosen = []
            if counts is not None and int(counts.sum()) > 0:
                order = torch.sort(counts, descending=True, stable=True).indices.tolist()
                shares = (counts[order].cumsum(0).double() / counts.sum()).tolist()
                for expert, share in zip(order, shares):
                    if counts[expert] == 0:
                        break
                    chosen.append(expert)
                    if share >= coverage:
                        break
            newly[name] = layer.freeze_experts(adapter, chosen, task)
            layer.freeze_router(adapter, task)
        return newly

    def freeze_most_selected(self, task: int, k: Optional[int] = None) -> dict[str, list[int]]:
        """Activate-freeze: per layer, freeze the k experts `task` selected most (default k = top_k) and its router.

        Experts the task never selected are not frozen. Returns the experts newly frozen per layer.
        """
        adapter = self._adapter()
        self._check_task(task)
        k = self.peft_config[adapter].top_k if k is None else k
        if k < 0:
            raise ValueError(f"k must be non-negative, got {k}.")
        newly = {}
        for name, layer in self.moe_layers().items():
            task_counts = layer.moe_lora_counts[adapter][task]
            order = torch.sort(task_counts, descending=True, stable=True).indices[:k].tolist()
            chosen = [e for e in order if task_counts[e] > 0]
            newly[name] = layer.freeze_experts(adapter, chosen, task)
            layer.freeze_router(adapter, task)
        return newly

    def frozen_experts(self) -> dict[str, dict[int, int]]:
        """Per layer, frozen expert -> the task that froze it."""
        adapter = self._adapter()
        result = {}
        for name, layer in self.moe_layers().items():
            frozen_by = layer.moe_lora_frozen_by[adapter].tolist()
            result[name] = {e: t for e, t in enumerate(frozen_by) if t >= 0}
        return result

    def frozen_parameter_count(self) -> int:
        """How many elements of trainable (requires_grad) parameters are frozen slices: frozen experts and routers of
        every adapter, which no optimizer step can change."""
        frozen = 0
        for layer in self.moe_layers().values():
            for adapter in layer.moe_lora_frozen_by:
                rows = {name: layer.moe_lora_frozen_by[adapter] >= 0 for name in EXPERT_PARAMS}
                rows.update({name: layer.moe_lora_router_frozen[adapter] for name in ROUTER_PARAMS})
                for name, frozen_rows in rows.items():
                    param = getattr(layer, name).get(adapter) if adapter in getattr(layer, name) else None
                    if param is not None and param.requires_grad:
                        frozen += int(frozen_rows.sum()) * (param.numel() // param.shape[0])
        return frozen

    def frozen_routers(self) -> list[int]:
        layers = list(self.moe_layers().values())
        if not layers:
            return []
        return torch.nonzero(layers[0].moe_lora_router_frozen[self._adapter()]).flatten().tolist()

    def merge_experts(
        self,
        task: int,
        optimizer: Optional[torch.optim.Optimizer] = None,
        counts: Optional[dict[str, torch.Tensor]] = None,
    ) -> dict[str, tuple]:
        """Expert merging (Park, 2024): per layer, average `task`'s two most-selected experts into its
        least-selected trainable expert and reset that expert's optimizer state. `counts` ({layer: (experts,)})
        replaces the layer's own counts, e.g. with counts summed over processes. Returns {layer: (sources, target)} for the layers where a merge happened."""
        adapter = self._adapter()
        self._check_task(task)
        merged = {}
        for name, layer in self.moe_layers().items():
            task_counts = layer.moe_lora_counts[adapter][task] if counts is None else counts[name]
            result = layer.merge_top_experts(adapter, task_counts, optimizer)
            if result is not None:
                merged[name] = result
        return merged

    def expert_parameters(self, layer_name: str) -> dict[str, torch.Tensor]:
        """The effective (frozen slices from their snapshot) stacked expert tensors of one layer."""
        adapter = self._adapter()
        layer = self.moe_layers()[layer_name]
        return {n: layer.effective(adapter, n).detach() for n in EXPERT_PARAMS if adapter in getattr(layer, n)}

