"""The peft type of MoE-LoRA.

peft's `register_peft_method` only accepts names listed in its `PeftType` enum, which third-party methods cannot
extend. peft itself only ever uses the peft type as a dictionary key (and `.value` in error messages), so a string
that also answers `.value` is a complete stand-in for an enum member.
"""

from __future__ import annotations


class ExternalPeftType(str):
    """A peft type defined outside peft's enum; behaves like a `PeftType` member wherever peft uses one."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


# The name is also the message peft shows when a folder is loaded before `import hf_moe_cl` registered it
# (peft raises KeyError(peft_type)); "MOE_LORA", the name hf-moe-cl 0.1 saved, stays registered as an alias.
MOE_LORA = ExternalPeftType("MOE_LORA (needs `import hf_moe_cl` before loading)")
LEGACY_PEFT_TYPES = (ExternalPeftType("MOE_LORA"),)
MOE_LORA_PREFIX = "moe_lora_"
