"""The registry of continual methods: `register_method` adds a `ContinualMethod` subclass under its `name`."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register_method(cls):
    """Class decorator: make a `ContinualMethod` available by its `name` (e.g. to `examples/mtil.py --method`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered.")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise KeyError(f"A continual method is already registered as {cls.name!r} ({METHODS[cls.name].__name__}).")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


from .base import ContinualMethod  # noqa: E402
from .condu import ConDU, ConDUArguments  # noqa: E402
from .finetune import ContinualFineTune  # noqa: E402
from .individual import IndividualFineTune  # noqa: E402
from .lora import ContinualLoRA, LoRAArguments  # noqa: E402
from .ddas import DDASArguments  # noqa: E402
from .moe_adapters import ExpertMergingCallback, MoEAdapters, MoEAdaptersArguments  # noqa: E402
from .zero_shot import ZeroShot  # noqa: E402

__all__ = ["METHODS", "ConDU", "ConDUArguments", "ContinualFineTune", "ContinualLoRA", "ContinualMethod",
           "DDASArguments", "ExpertMergingCallback", "IndividualFineTune", "LoRAArguments", "MoEAdapters",
           "MoEAdaptersArguments", "ZeroShot", "get_method", "method_for_model", "register_method"]


def method_for_model(model) -> ContinualMethod:
    """The method a bare model implies: MoE-LoRA -> MoE-Adapters, peft LoRA -> continual LoRA, else fine-tuning."""
    from peft import PeftModel

    from ...tuners.moe_lora.model import find_moe

    if find_moe(model) is not None:
        return MoEAdapters(model)
    if isinstance(model, PeftModel):
        return ContinualLoRA(model)
    return ContinualFineTune(model)
