"""DDAS (Distribution Discriminative Auto-Selector, MoE-Adapters): which task router serves an image without a task
id (its modules: docs/architecture.md)."""

from .selector import DistributionSelector
from .settings import DDASArguments, SelectorConfig

__all__ = ["DDASArguments", "DistributionSelector", "SelectorConfig"]
