"""A dataset's parquet copy on the Hub (a `presets.HubSource`): its summary from the parquet footers alone (split
sizes, features, label names; no image is downloaded), and its splits as `image` + official `label` datasets."""

from __future__ import annotations

import os
from typing import Optional

import fsspec
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Features, concatenate_datasets, load_dataset, load_dataset_builder

from .labels import LabelMap, map_label_names, relabel
from .summary import SourceError, SourceSummary


def _describe(source) -> str:
    return source.repo_id + (f"@{source.revision}" if source.revision else "")


def _data_files(spec, source, cache_dir: Optional[str]) -> dict[str, list[str]]:
    try:
        builder = load_dataset_builder(source.repo_id, revision=source.revision, cache_dir=cache_dir)
    except Exception as error:  # a loading-script repo, a missing repo, no network: all need the same advice
        raise SourceError(f"{spec.name}: cannot read the Hub dataset {_describe(source)} ({type(error).__name__}: "
                          f"{error}). Fix: check the id and your connection, point this dataset at another parquet "
                          "copy (--dataset_ids), or use the torchvision folders (data_dir).") from None
    files = {split: list(paths) for split, paths in (builder.config.data_files or {}).items()}
    wanted = [split for splits in source.splits.values() for split in splits]
    missing = [split for split in wanted if split not in files]
    if missing:
        raise SourceError(f"{spec.name}: {_describe(source)} has no split(s) {missing}; it has {sorted(files)}. Fix: "
                          "give the HubSource the splits it has, or use another copy or the torchvision folders.")
    return files


def _footer(spec, source, path: str):
    try:
        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.metadata.num_rows, Features.from_arrow_schema(parquet.schema_arrow)
    except Exception as error:
        raise SourceError(f"{spec.name}: {path} of {_describe(source)} is not a readable parquet file ({error}). "
                          "Fix: use a parquet copy of the dataset (no loading script) or the torchvision folders.") \
            from None


def _label_map(spec, source, features: Features) -> LabelMap:
    missing = [column for column in (source.image_column, source.label_column) if column not in features]
    if missing:
        raise SourceError(f"{spec.name}: {_describe(source)} has no column(s) {missing}; it has {list(features)}. "
                          "Fix: set image_column/label_column of its HubSource.")
    feature = features[source.label_column]
    if not isinstance(feature, ClassLabel):
        raise SourceError(f"{spec.name}: the label column {source.label_column!r} of {_describe(source)} has no class "
                          f"names ({feature}); a copy with a ClassLabel column is needed to map labels by name.")
    if source.num_labels is not None and feature.num_classes != source.num_labels:
        raise SourceError(f"{spec.name}: {_describe(source)} has {feature.num_classes} label names, its HubSource "
                          f"expects {source.num_labels}. Fix: check the copy, or correct num_labels.")
    return map_label_names(spec.name, _describe(source), feature.names, spec.aliases(), spec.excluded_names)


def hub_summary(spec, source, cache_dir: Optional[str] = None) -> SourceSummary:
    """Split sizes and the label mapping of a Hub copy, from the parquet footers of its files."""
    files = _data_files(spec, source, cache_dir)
    sizes, features = {}, None
    for role, splits in source.splits.items():
        sizes[role] = 0
        for path in (path for split in splits for path in files[split]):
            rows, features = _footer(spec, source, path)
            sizes[role] += rows
    return SourceSummary(_describe(source), sizes, _label_map(spec, source, features))


def _order(dataset: Dataset, column: Optional[str]) -> list[int]:
    """Rows class by class, as torchvision lists the whole dataset; within a class by file name (ImageFolder sorts
    names; a name without extension gets '.jpg', torchvision's) where the copy keeps file names."""
    labels = list(dataset["label"])
    names = [""] * len(labels)
    if column is not None:
        names = [os.path.basename(str(name)) for name in dataset[column]]
        names = [name if os.path.splitext(name)[1] else f"{name}.jpg" for name in names]
    return sorted(range(len(labels)), key=lambda row: (labels[row], names[row]))


def hub_datasets(spec, source, cache_dir: Optional[str] = None) -> tuple[dict[str, Dataset], Optional[list[int]]]:
    """The copy's datasets per role with `image` and the official `label`, and, for a whole dataset ("all"), the
    row order of the official dataset (for the random split)."""
    summary = hub_summary(spec, source, cache_dir)
    order = None
    prepared = {}
    for role, splits in source.splits.items():
        parts = [load_dataset(source.repo_id, split=split, revision=source.revision, cache_dir=cache_dir)
                 for split in splits]
        data = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        keep = [source.image_column, source.label_column] + ([source.order_column] if source.order_column else [])
        renames = {source.image_column: "image", source.label_column: "label"}
        data = data.select_columns(keep).rename_columns({old: new for old, new in renames.items() if old != new})
        data = relabel(data, summary.label_map, spec.classnames)
        if role == "all":
            order = _order(data, source.order_column)
        prepared[role] = data.select_columns(["image", "label"])
    return prepared, order
