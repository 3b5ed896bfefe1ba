"""The continual methods, one module each, found by name in the registry (`registry.py`)."""

from __future__ import annotations

from peft import PeftModel

from ...ddas.settings import DDASArguments
from ...tuners.moe_lora.model import find_moe
from .base import ContinualMethod
from .condu import ConDU, ConDUArguments
from .finetune import ContinualFineTune
from .individual import IndividualFineTune
from .lora import ContinualLoRA, LoRAArguments
from .moe_adapters import ExpertMergingCallback, MoEAdapters, MoEAdaptersArguments
from .registry import METHODS, get_method, register_method
from .zero_shot import ZeroShot

__all__ = ["METHODS", "ConDU", "ConDUArguments", "ContinualFineTune", "ContinualLoRA", "ContinualMethod",
           "DDASArguments", "ExpertMergingCallback", "IndividualFineTune", "LoRAArguments", "MoEAdapters",
           "MoEAdaptersArguments", "ZeroShot", "get_method", "method_for_model", "register_method"]


def method_for_model(model) -> ContinualMethod:
    """The method a bare model implies: MoE-LoRA -> MoE-Adapters, peft LoRA -> continual LoRA, else fine-tuning."""
    if find_moe(model) is not None:
        return MoEAdapters(model)
    if isinstance(model, PeftModel):
        return ContinualLoRA(model)
    return ContinualFineTune(model)
