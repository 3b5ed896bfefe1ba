from .config import MoELoraConfig
from .gating import TaskRoute
from .layer import MoELoraBlock, MoELoraLayer, MoELoraLinear
from .model import MoELoraModel, find_moe
from .selector import DistributionSelector, SelectorConfig
from .upgrade import upgrade_adapter_folder

__all__ = ["DistributionSelector", "MoELoraBlock", "MoELoraConfig", "MoELoraLayer", "MoELoraLinear", "MoELoraModel",
           "SelectorConfig", "TaskRoute", "find_moe", "upgrade_adapter_folder"]
