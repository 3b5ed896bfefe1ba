from ...legacy import moved_names
from .config import MoELoraConfig
from .gating import TaskRoute
from .layer import MoELoraBlock, MoELoraLayer, MoELoraLinear
from .model import MoELoraModel, find_moe

__all__ = ["MoELoraBlock", "MoELoraConfig", "MoELoraLayer", "MoELoraLinear", "MoELoraModel", "TaskRoute", "find_moe"]
__getattr__ = moved_names(__name__, {"DistributionSelector": "hf_moe_cl.ddas", "SelectorConfig": "hf_moe_cl.ddas",
                                     "upgrade_adapter_folder": "hf_moe_cl.legacy"})
