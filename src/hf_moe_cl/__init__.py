"""hf-moe-cl: continual learning of CLIP with task-routed mixture-of-experts adapters, as a peft method.

Importing the package registers the `MOE_LORA` method with peft, so `get_peft_model`, `PeftModel.from_pretrained`
and `PeftConfig.from_pretrained` accept it.
"""

from .registration import MOE_LORA, register_moe_lora
from .safetensors_files import check_safetensors_file
from .tuners.moe_lora import MoELoraConfig, MoELoraModel

register_moe_lora()

__all__ = ["MOE_LORA", "MoELoraConfig", "MoELoraModel", "check_safetensors_file", "register_moe_lora"]
__version__ = "0.1.0"
