"""Where an MTIL dataset's images come from (its torchvision folders or its Hub copy) and how the official code
splits them into the train and test sets of a task."""

from __future__ import annotations

import os
from typing import Optional, Union

from datasets import Dataset

from .hub import hub_datasets, hub_summary
from .local import local_datasets, local_summary
from .splits import split_whole
from .summary import SourceSummary


def summarize(spec, data_dir: Union[None, str, os.PathLike] = None, hub=None,
              cache_dir: Optional[str] = None) -> SourceSummary:
    """Sizes and label mapping of the source `load_splits` would read, without reading images."""
    if data_dir is not None:
        return local_summary(spec, data_dir)
    return hub_summary(spec, hub or spec.hub, cache_dir)


def load_splits(spec, data_dir: Union[None, str, os.PathLike] = None, hub=None,
                cache_dir: Optional[str] = None) -> tuple[Dataset, Dataset]:
    """Train and test sets with `image` and official `label`: from the torchvision folders under `data_dir` if
    given, else from the Hub copy `hub` (default `spec.hub`); the whole dataset is split by `spec.split_rule`."""
    order = None
    if data_dir is not None:
        roles = local_datasets(spec, data_dir)  # already in torchvision's order
    else:
        roles, order = hub_datasets(spec, hub or spec.hub, cache_dir)
    if spec.split_rule is None:
        return roles["train"], roles["test"]
    train_fraction, seed = spec.split_rule
    return split_whole(roles["all"], train_fraction, seed, order=order)
