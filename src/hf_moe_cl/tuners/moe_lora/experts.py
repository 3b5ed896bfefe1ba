"""Which experts each task uses and which are frozen (activate-freeze, merging, growth): `ExpertBookkeeping`, a part
of `MoELoraModel` that works on the tuner's layers (`moe_layers()`) and its active adapter."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...options import check_option
from .config import check_growth_threshold
from .bank import EXPERT_PARAMS

COVERAGE = dict(low=0.0, high=1.0, low_open=True)  # a share of a task's selections in (0, 1]


class ExpertBookkeeping:
    """Selection counts, freezing and merging over every MoE layer of the tuner."""

    def selection_histogram(self, selections: dict) -> dict[str, torch.Tensor]:
        """Per layer name, how often each expert was chosen in the calls that filled `selections` (`routing(...,
        selections=...)`)."""
        adapter = self._adapter()
        names = {layer: name for name, layer in self.moe_layers().items()}
        return {names[layer]: torch.bincount(torch.cat(chosen).flatten().cpu(), minlength=layer.expert_count(adapter))
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
        self._check_counts("counts", counts, every_layer=True, integer=True)
        for name, layer in self.moe_layers().items():
            layer.moe_lora_counts[adapter][task] = counts[name].to(layer.moe_lora_counts[adapter].device)

    def _check_counts(self, what: str, counts, every_layer: bool, integer: bool) -> None:
        """`counts` ({layer name: (experts,)}) as a per-expert tally of this model's layers: names of `moe_layers()`
        (every one of them when `every_layer`), one non-negative finite value per expert of the layer."""
        adapter, layers = self._adapter(), self.moe_layers()
        if not isinstance(counts, dict):
            raise ValueError(f"{what} must be a dict of layer name -> tensor of per-expert counts (the names of "
                             f"moe_layers()), got {type(counts).__name__}.")
        unknown, missing = sorted(set(counts) - set(layers)), sorted(set(layers) - set(counts)) if every_layer else []
        if unknown or missing:
            raise ValueError(f"{what} must be keyed by this model's MoE layer names (moe_layers()): unknown "
                             f"{unknown[:3]}, missing {missing[:3]}.")
        kinds = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) + (
            () if integer else (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        for name, value in counts.items():
            experts = layers[name].expert_count(adapter)
            if not (isinstance(value, torch.Tensor) and value.shape == (experts,) and value.dtype in kinds
                    and bool(torch.isfinite(value).all()) and not bool((value < 0).any())):
                shown = type(value).__name__
                if isinstance(value, torch.Tensor):
                    shown = f"shape {tuple(value.shape)}, {value.dtype}" + (
                        f", values {value.min().item()} to {value.max().item()}" if value.numel() else "")
                raise ValueError(f"{what}[{name!r}] must be a 1-D tensor of {experts} non-negative "
                                 f"{'integer' if integer else 'finite'} counts (one per expert of the layer), got "
                                 f"{shown}.")

    def freeze_covering(self, task: int, histogram: dict[str, torch.Tensor], coverage: float = 1.0
                        ) -> dict[str, list[int]]:
        """Per layer, freeze the most-used experts of `histogram` (e.g. a task's evaluation-time selections) until
        they carry `coverage` of its selections (1.0: every expert it uses), and the task's router."""
        check_option("coverage", coverage, float, **COVERAGE)
        task = self._check_task(task)
        self._check_counts("histogram", histogram, every_layer=False, integer=False)

        def covering(name: str, layer) -> list[int]:
            counts = histogram.get(name)
            if counts is None or not bool(counts.sum() > 0):
                return []
            order = torch.sort(counts, descending=True, stable=True).indices
            shares = counts[order].cumsum(0).double() / counts.sum()  # the experts up to the first reaching coverage
            return order[:min(int((counts > 0).sum()), int((shares < coverage).sum()) + 1)].tolist()

        return self._freeze(task, covering)

    def freeze_most_selected(self, task: int, k: Optional[int] = None) -> dict[str, list[int]]:
        """Activate-freeze: per layer, freeze the k experts `task` selected most (default k = top_k) and its router.

        Experts the task never selected are not frozen. Returns the experts newly frozen per layer.
        """
        adapter = self._adapter()
        self._check_task(task)
        k = self.peft_config[adapter].top_k if k is None else k
        check_option("k", k, int, low=0)

        def most_selected(name: str, layer) -> list[int]:
            counts = layer.moe_lora_counts[adapter][task]
            return [e for e in torch.sort(counts, descending=True, stable=True).indices[:k].tolist() if counts[e] > 0]

        return self._freeze(task, most_selected)

    def _freeze(self, task: int, choose) -> dict[str, list[int]]:
        """Per layer, freeze the experts `choose(name, layer)` gives for `task`, and its router; returns the experts
        newly frozen per layer."""
        adapter, newly = self._adapter(), {}
        for name, layer in self.moe_layers().items():
            newly[name] = layer.freeze_experts(adapter, choose(name, layer), task)
            layer.freeze_router(adapter, task)
        return newly

    def frozen_experts(self) -> dict[str, dict[int, int]]:
        """Per layer, frozen expert -> the task that froze it."""
        adapter = self._adapter()
        return {name: {e: t for e, t in enumerate(layer.moe_lora_frozen_by[adapter].tolist()) if t >= 0}
                for name, layer in self.moe_layers().items()}

    def frozen_routers(self) -> list[int]:
        layer = next(iter(self.moe_layers().values()), None)
        return [] if layer is None else torch.nonzero(layer.moe_lora_router_frozen[self._adapter()]).flatten().tolist()

    def merge_experts(self, task: int, optimizer: Optional[torch.optim.Optimizer] = None,
                      counts: Optional[dict[str, torch.Tensor]] = None) -> dict[str, tuple]:
        """Expert merging (Park, 2024): per layer, average `task`'s two most-selected experts into its
        least-selected trainable expert and reset that expert's optimizer state. `counts` ({layer: (experts,)})
        replaces the layer's own counts, e.g. with counts summed over processes. Returns {layer: (sources, target)}
        for the layers where a merge happened."""
        adapter = self._adapter()
        self._check_task(task)
        if counts is not None:
            self._check_counts("counts", counts, every_layer=True, integer=True)
        merged = {name: layer.merge_top_experts(adapter, layer.moe_lora_counts[adapter][task] if counts is None
                                                else counts[name], optimizer)
                  for name, layer in self.moe_layers().items()}
        return {name: result for name, result in merged.items() if result is not None}

    # ----- a bank that grows ---------------------------------------------------------------------------------------
    def expert_slots(self) -> dict[str, dict[str, int]]:
        """Per layer, its experts ('total') and those frozen by no task ('trainable')."""
        adapter = self._adapter()
        return {name: {"total": layer.expert_count(adapter),
                       "trainable": int((layer.moe_lora_frozen_by[adapter] < 0).sum())}
                for name, layer in self.moe_layers().items()}

    def grow_experts(self, first_task: int, threshold: Optional[float] = None) -> dict[str, int]:
        """Before task `first_task` trains: every layer with fewer than `threshold` x `num_experts` trainable
        experts (`threshold` defaults to the config's `expert_growth_threshold`) gets the fewest new experts, at
        least top_k, that bring it back to that many; the trainable set, and with it a training step's cost, stays
        bounded however many tasks were learned. New experts change no output, and routers of earlier tasks never
        select them (`MoELoraLayer.add_experts`). Returns the experts added per layer; the counts are recorded in
        the config (`experts_per_module`) so that a saved adapter loads with its grown shapes."""
        config = self.moe_config
        check_growth_threshold("threshold", threshold)
        threshold = config.expert_growth_threshold if threshold is None else threshold
        if threshold is None:
            return {}
        self._check_task(first_task)
        adapter = self._adapter()
        wanted = math.ceil(round(threshold * config.num_experts, 9))
        added = {}
        for name, slots in self.expert_slots().items():
            if slots["trainable"] < wanted:
                count = max(config.top_k, wanted - slots["trainable"])
                self.moe_layers()[name].add_experts(adapter, count, first_task)
                config.experts_per_module[name] = slots["total"] + count
                added[name] = count
        return added

    def grow_to(self, experts_per_module: dict[str, int]) -> None:
        """Give each layer the number of experts a saved adapter has (before loading its weights into this
        model, e.g. resuming from a checkpoint of a grown bank); the loaded state sets their values."""
        adapter = self._adapter()
        layers = self.moe_layers()
        unknown = sorted(set(experts_per_module) - set(layers))
        if unknown:
            raise ValueError(f"The saved adapter grew layers this model does not have: {unknown[:3]}. Load it on "
                             "the base model it was trained on.")
        for name, count in experts_per_module.items():
            current = layers[name].expert_count(adapter)
            if count < current:
                raise ValueError(f"Layer {name!r} has {current} experts here but {count} in the saved adapter: a "
                                 "bank only grows. Load the checkpoint into a model built like the saved one.")
            if count > current:
                layers[name].add_experts(adapter, count - current, first_task=0)
                self.moe_config.experts_per_module[name] = count

    def expert_parameters(self, layer_name: str) -> dict[str, torch.Tensor]:
        """Every expert of one layer, stacked, as the forward pass reads them."""
        adapter = self._adapter()
        layer = self.moe_layers()[layer_name]
        return {n: layer.bank(adapter, n).detach() for n in EXPERT_PARAMS if adapter in getattr(layer, n)}

