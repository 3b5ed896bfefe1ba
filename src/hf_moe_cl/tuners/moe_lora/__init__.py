from .config import MoELoraConfig
from .layer import MoELoraBlock, MoELoraLayer, MoELoraLinear, TaskRoute
from .model import MoELoraModel

__all__ = ["MoELoraBlock", "MoELoraConfig", "MoELoraLayer", "MoELoraLinear", "MoELoraModel", "TaskRoute"]
