"""Reading the sources of the official experiments: Hub parquet copies and torchvision folders, label mapping by
name, the official split rules. The experiments themselves (presets, the data check) are in `hf_moe_cl.experiments`.
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
