"""Continual LoRA: one peft LoRA adapter trained on every task in turn."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ...files import check_safetensors_file
from ...options import check_option
from .registry import register_method
from .base import ContinualMethod, check_loaded


@dataclass
class LoRAArguments:
    lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "LoRA baseline: comma-separated modules."})

    def __post_init__(self):
        check_option("lora_targets", self.lora_targets, str)
        if not self.target_list:
            raise ValueError("lora_targets names no module; give e.g. 'q_proj,v_proj'.")

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


@register_method
class ContinualLoRA(ContinualMethod):
    """A peft LoRA adapter (`rank`, `lora_alpha = rank`) shared by all tasks; unseen tasks use the current model."""

    name = "lora"
    arguments_class = LoRAArguments

    @classmethod
    def from_base(cls, base, options=(), num_tasks=1, rank=64, reference_images=None):
        arguments = cls.pick(options, LoRAArguments)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(arguments.target_list))
        return cls(get_peft_model(copy.deepcopy(base), config), arguments)

    def unseen_route(self, index: int) -> int:
        return index

    def load(self, folder: Path) -> None:
        path = Path(folder) / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"No adapter_model.safetensors in {folder} to resume from.")
        check_safetensors_file(path)
        result = set_peft_model_state_dict(self.model, load_file(path))
        check_loaded(folder, [k for k in result.missing_keys if "lora_" in k], result.unexpected_keys)
