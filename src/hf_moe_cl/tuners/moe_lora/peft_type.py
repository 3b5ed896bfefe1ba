"""The peft type of MoE-LoRA.

peft's `register_peft_method` only accepts names listed in its `PeftType` enum, which third-party methods cannot
extend. peft itself only uses the peft type as a dictionary key, `.value` in error messages and
`str(peft_type).partition(".")[-1]` as its name (`get_model_status`), so a string that answers these like an enum
member is a complete stand-in for one.
"""

from __future__ import annotations

from ...legacy import LEGACY_PEFT_TYPE_NAMES


class ExternalPeftType(str):
    """A peft type defined outside peft's enum; behaves like a `PeftType` member wherever peft uses one."""

    value = name = property(str.__str__)  # the plain string

    def __str__(self) -> str:
        # as str() of a PeftType member ("PeftType.LORA"), which peft splits at the dot
        return f"PeftType.{self.value}"


MOE_LORA = ExternalPeftType("MOE_LORA")
# What hf-moe-cl 0.2 stored as the type; folders saved with it still load.
LEGACY_PEFT_TYPES = tuple(ExternalPeftType(name) for name in LEGACY_PEFT_TYPE_NAMES)
MOE_LORA_PREFIX = "moe_lora_"
# What a user who loads an adapter without the library sees, in the card saved beside every adapter.
IMPORT_HINT = ("This adapter is a MoE-LoRA adapter of hf-moe-cl: `import hf_moe_cl` before loading it with peft "
               "(without it peft raises `KeyError: 'MOE_LORA'`).")
