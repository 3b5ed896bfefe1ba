"""Registration of the MoE-LoRA method in peft's lookup tables (see `tuners/moe_lora/peft_type.py`)."""

from __future__ import annotations

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .tuners.moe_lora import MoELoraConfig, MoELoraModel, find_moe
from .tuners.moe_lora.peft_type import LEGACY_PEFT_TYPES, MOE_LORA, MOE_LORA_PREFIX


def register_moe_lora() -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know MoE-LoRA.

    Idempotent: calling it again (re-import, reload) leaves the tables as they are. A different method already
    registered under the same name or prefix is an error rather than being overwritten.
    """
    wanted = {
        id(PEFT_TYPE_TO_CONFIG_MAPPING): MoELoraConfig,
        id(PEFT_TYPE_TO_TUNER_MAPPING): MoELoraModel,
        id(PEFT_TYPE_TO_PREFIX_MAPPING): MOE_LORA_PREFIX,
    }
    for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        present = table.get(MOE_LORA)
        expected = wanted[id(table)]
        if present is not None and getattr(present, "__qualname__", present) != getattr(
            expected, "__qualname__", expected
        ):
            raise KeyError(
                f"peft already has a method registered as {MOE_LORA!r} ({present!r}); "
                "uninstall the other package that registers it."
            )
    ours = (MOE_LORA, *LEGACY_PEFT_TYPES)
    other = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == MOE_LORA_PREFIX and t not in ours]
    if other:
        raise KeyError(f"peft method {other[0]!r} already uses the prefix {MOE_LORA_PREFIX!r}.")
    for peft_type in ours:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = MoELoraConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MoELoraModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = MOE_LORA_PREFIX
    count_only_changeable_parameters()


def _count_what_can_change(count):
    """`PeftModel.get_nb_trainable_parameters` (used by `print_trainable_parameters` and `get_model_status`) without
    the frozen experts and routers of a MoE-LoRA model: they are slices of trainable tensors that never change."""

    @functools.wraps(count)
    def counted(self) -> tuple[int, int]:
        trainable, total = count(self)
        moe = find_moe(self)
        return (trainable - moe.frozen_parameter_count(), total) if moe is not None else (trainable, total)

    counted.counts_moe_lora_frozen_slices = True
    return counted


def count_only_changeable_parameters() -> None:
    """Make peft's parameter counts of MoE-LoRA models exclude frozen slices (idempotent; other methods unchanged)."""
    if not getattr(PeftModel.get_nb_trainable_parameters, "counts_moe_lora_frozen_slices", False):
        PeftModel.get_nb_trainable_parameters = _count_what_can_change(PeftModel.get_nb_trainable_parameters)
