"""DDAS (Distribution Discriminative Auto-Selector, MoE-Adapters): which task router serves an image without a task
id. One home for its settings (`settings`), the selector the adapter carries (`selector`), its autoencoder and the
loop that trains it (`autoencoder`), the features it reads (`features`) and its fitting in a continual run
(`fitting`)."""

from .selector import DistributionSelector
from .settings import DDASArguments, SelectorConfig

__all__ = ["DDASArguments", "DistributionSelector", "SelectorConfig"]
