"""Where an MTIL dataset's images come from (its torchvision folders or its Hub copy) and how the official code
splits them into the train and test sets of a task."""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Union

from datasets import Dataset

from .hub import hub_datasets, hub_summary
from .local import local_datasets, local_summary
from .splits import split_whole
from .summary import SourceError, SourceSummary

logger = logging.getLogger("hf_moe_cl")


def _first_readable(spec, hub, read: Callable):
    """`read(source)` of the Hub copy `hub`, or of the first of the spec's copies (`spec.hub`, then
    `spec.hub_fallbacks`) that can be read; every copy tried is named when none can."""
    sources = [hub] if hub is not None else [spec.hub, *spec.hub_fallbacks]
    errors = []
    for source in sources:
        try:
            result = read(source)
        except SourceError as error:
            errors.append(str(error))
            continue
        if errors:
            logger.warning("%s: read from %s, the next copy, because: %s", spec.name, source.repo_id, errors[-1])
        return result
    raise SourceError(errors[0] if len(errors) == 1 else f"{spec.name}: none of its {len(errors)} Hub copies can be "
                      "read, tried in order:\n" + "\n".join(f"  {error}" for error in errors))


def summarize(spec, data_dir: Union[None, str, os.PathLike] = None, hub=None,
              cache_dir: Optional[str] = None) -> SourceSummary:
    """Sizes and label mapping of the source `load_splits` would read (`.source` names it), without reading images."""
    if data_dir is not None:
        return local_summary(spec, data_dir)
    return _first_readable(spec, hub, lambda source: hub_summary(spec, source, cache_dir))


def load_splits(spec, data_dir: Union[None, str, os.PathLike] = None, hub=None,
                cache_dir: Optional[str] = None) -> tuple[Dataset, Dataset]:
    """Train and test sets with `image` and official `label`: from the torchvision folders under `data_dir` if
    given, else from the Hub copy `hub` (default: the first of the spec's copies that can be read); the whole
    dataset is split by `spec.split_rule`."""
    # the torchvision folders are in torchvision's order already; a Hub copy gives the order of the whole set
    roles, order = (local_datasets(spec, data_dir), None) if data_dir is not None else \
        _first_readable(spec, hub, lambda source: hub_datasets(spec, source, cache_dir))
    if spec.split_rule is None:
        return roles["train"], roles["test"]
    train_fraction, seed = spec.split_rule
    return split_whole(roles["all"], train_fraction, seed, order=order)
