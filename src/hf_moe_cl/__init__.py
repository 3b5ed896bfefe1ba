"""hf-moe-cl: continual learning of CLIP with task-routed mixture-of-experts adapters, as a peft method.

Importing the package registers the `MOE_LORA` method with peft, so `get_peft_model`, `PeftModel.from_pretrained`
and `PeftConfig.from_pretrained` accept it, and the `task-agnostic-image-classification` pipeline with transformers.
"""

from . import assets
from .continual import ContinualTask, ContinualTrainer, ContinualTrainingArguments
from .ddas import SelectorConfig
from .files import check_safetensors_file
from .inference import TaskAgnosticClassifier
from .legacy import find_moved_modules, upgrade_adapter_folder
from .pipeline import TaskAgnosticImageClassificationPipeline
from .registration import MOE_LORA, register_moe_lora
from .tuners.moe_lora import MoELoraConfig, MoELoraModel

register_moe_lora()
find_moved_modules()

__all__ = ["MOE_LORA", "ContinualTask", "ContinualTrainer", "ContinualTrainingArguments", "MoELoraConfig",
           "MoELoraModel", "SelectorConfig", "TaskAgnosticClassifier", "TaskAgnosticImageClassificationPipeline",
           "assets", "check_safetensors_file", "register_moe_lora", "upgrade_adapter_folder"]
__version__ = "0.3.0"
