"""Data sources of the official experiments: Hub parquet copies and torchvision folders, label mapping by name, the
official split rules, and `check.check_data` to verify a preset's data before a long run.

`check` is imported as `hf_moe_cl.data.check` (it builds on `hf_moe_cl.presets`, which builds on these modules).
"""

from .hub import hub_datasets, hub_summary
from .labels import LabelMap, LabelMappingError, label_key, map_label_names, relabel
from .local import local_datasets, local_index, local_summary
from .sources import load_splits, summarize
from .splits import few_shot_subset, random_split_indices, split_whole
from .summary import SourceError, SourceSummary

__all__ = ["LabelMap", "LabelMappingError", "SourceError", "SourceSummary", "few_shot_subset", "hub_datasets",
           "hub_summary", "label_key", "load_splits", "local_datasets", "local_index", "local_summary",
           "map_label_names", "random_split_indices", "relabel", "split_whole", "summarize"]
