"""ConDU's LoRA, kept in factor space.

The official fine-tune (zhangzicong518/ConDU, `clip/model_lora.py`) puts a LoRA on both MLP layers of every block
of both towers (`c_fc`, `c_proj`: transformers' `mlp.fc1`, `mlp.fc2`), draws both factors from N(0, 0.01^2) and
scales the branch by 1/sqrt(rank); its task deltas are the trained factors minus the pretrained model's own
(also random) factors, and those factor deltas are what it unifies. Here the factors are peft's: `lora_config`
gives the scale with `use_rslora=True, lora_alpha=1`, and tensors are named as in a saved peft adapter
(`base_model.model.<layer>.lora_A.weight`), so unified factors are a loadable adapter.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .unify import Delta

PEFT_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_config(targets: Sequence[str], rank: int, base_model_name_or_path: Optional[str] = None) -> LoraConfig:
    """The official LoRA as a peft config: rank `rank`, scale 1/sqrt(rank), no dropout, no bias."""
    return LoraConfig(r=rank, lora_alpha=1, use_rslora=True, target_modules=list(targets), lora_dropout=0.0,
                      bias="none", init_lora_weights=False, base_model_name_or_path=base_model_name_or_path)


def lora_scaling(rank: int) -> float:
    return 1.0 / math.sqrt(rank)


def factor_shapes(model: nn.Module, targets: Sequence[str], rank: int) -> dict[str, torch.Size]:
    """Shapes of the factors peft gives `model`'s Linear layers whose last name is in `targets`, by adapter key; a
    target that names no Linear layer is refused (a misspelt one would leave its layers untrained)."""
    shapes, found = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            found.add(name.rsplit(".", 1)[-1])
            shapes[PEFT_PREFIX + name + _A] = torch.Size((rank, module.in_features))
            shapes[PEFT_PREFIX + name + _B] = torch.Size((module.out_features, rank))
    unknown = [target for target in targets if target not in found]
    if unknown:
        raise ValueError(f"No Linear layer of the model is named {unknown} (condu_lora_targets); check the names "
                         "(transformers' CLIP MLP layers are 'fc1,fc2').")
    return shapes


def draw_factors(shapes: dict[str, torch.Size], std: float, seed: int) -> Delta:
    """Factors drawn from N(0, std^2) by a generator of their own, so the draw is the same whatever ran before."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * std for name, shape in shapes.items()}


def lora_layers(names) -> list[str]:
    """The layers (module names of the CLIP model) that the factors named `names` belong to."""
    return [name[len(PEFT_PREFIX):-len(_A)] for name in names if name.endswith(_A)]


def weight_delta(factors: Delta, scaling: float) -> Delta:
    """The change a LoRA with these factors makes to each layer's weight, scaling * B @ A, by parameter name."""
    return {f"{layer}.weight": scaling * (factors[PEFT_PREFIX + layer + _B] @ factors[PEFT_PREFIX + layer + _A])
            for layer in lora_layers(factors)}


def lora_model(model: nn.Module, config: LoraConfig, factors: Delta) -> PeftModel:
    """`model` wrapped in a peft LoRA whose factors start at `factors`."""
    peft_model = get_peft_model(model, config)
    loaded = set_peft_model_state_dict(peft_model, factors)
    if loaded.unexpected_keys:
        raise ValueError(f"The LoRA factors do not fit the model: {loaded.unexpected_keys[:3]} ...")
    return peft_model


def trained_factors(peft_model: PeftModel) -> Delta:
    """The adapter's factors, by adapter key, as float32 on the CPU."""
    return {name: value.detach().float().cpu() for name, value in get_peft_model_state_dict(peft_model).items()}
