"""Registration of the MoE-LoRA method in peft's lookup tables (see `tuners/moe_lora/peft_type.py`)."""

from __future__ import annotations

from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .files import check_json_file
from .tuners.moe_lora import MoELoraConfig, MoELoraModel
from .tuners.moe_lora.peft_type import LEGACY_PEFT_TYPES, MOE_LORA, MOE_LORA_PREFIX


def register_moe_lora() -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know MoE-LoRA.

    peft reads `adapter_config.json` (`PeftConfigMixin.from_json_file`, before it knows the method) through
    `check_json_file`, so a damaged file is named with its cause and the fix, not a bare JSONDecodeError.
    Idempotent: calling it again (re-import, reload) leaves the tables as they are. A different method already
    registered under the same name or prefix is an error rather than being overwritten.
    """
    tables = ((PEFT_TYPE_TO_CONFIG_MAPPING, MoELoraConfig), (PEFT_TYPE_TO_TUNER_MAPPING, MoELoraModel),
              (PEFT_TYPE_TO_PREFIX_MAPPING, MOE_LORA_PREFIX))
    for table, expected in tables:
        present = table.get(MOE_LORA, expected)
        if getattr(present, "__qualname__", present) != getattr(expected, "__qualname__", expected):
            raise KeyError(f"peft already has a method registered as {MOE_LORA!r} ({present!r}); uninstall the other "
                           "package that registers it.")
    ours = (MOE_LORA, *LEGACY_PEFT_TYPES)
    other = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == MOE_LORA_PREFIX and t not in ours]
    if other:
        raise KeyError(f"peft method {other[0]!r} already uses the prefix {MOE_LORA_PREFIX!r}.")
    for table, value in tables:
        table.update(dict.fromkeys(ours, value))
    reader = PeftConfigMixin.from_json_file.__func__
    if not getattr(reader, "checks_json", False):
        def from_json_file(cls, path_json_file, **kwargs):
            check_json_file(path_json_file)
            return reader(cls, path_json_file, **kwargs)

        from_json_file.checks_json = True
        PeftConfigMixin.from_json_file = classmethod(from_json_file)
