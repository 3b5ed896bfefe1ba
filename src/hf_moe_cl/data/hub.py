"""A dataset's parquet copy on the Hub (a `presets.HubSource`): its summary from the parquet footers alone (split
sizes, features, label names; no image is downloaded), and its splits as `image` + official `label` datasets.

Offline (HF_HUB_OFFLINE=1, or the Hub unreachable) a copy is read from the caches an earlier load filled: the copy
`datasets` prepared (its summary from the split sizes and features recorded with it), else the repository's files in
the Hugging Face Hub cache (`hf download <repo> --repo-type dataset`), read as a local parquet folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import datasets
import fsspec
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetBuilder, Features, concatenate_datasets, load_dataset_builder
from datasets.utils.info_utils import is_small_dataset
from huggingface_hub import constants as hf_constants, snapshot_download
from huggingface_hub.file_download import repo_folder_name

from .labels import LabelMap, map_label_names, relabel
from .summary import SourceError, SourceSummary


def _describe(source) -> str:
    return source.repo_id + (f"@{source.revision}" if source.revision else "")


def _offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _recorded_commit(source) -> Optional[str]:
    """The commit the Hub cache records for the source's revision (a download of that revision wrote it), if any."""
    revision = source.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = Path(hf_constants.HF_HUB_CACHE, repo_folder_name(repo_id=source.repo_id, repo_type="dataset"), "refs",
               *revision.split("/"))
    return ref.read_text().strip() if ref.is_file() else None


def _builder(spec, source, cache_dir: Optional[str]) -> DatasetBuilder:
    """The copy's builder: online the repo's parquet builder (`config.data_files` on the Hub); offline datasets'
    `cache` builder over the copy an earlier load prepared (no data files), else a parquet builder over the repo's
    files in the Hub cache."""
    try:
        builder = load_dataset_builder(source.repo_id, revision=source.revision, cache_dir=cache_dir)
    except Exception as error:  # a loading-script repo, a missing repo, no network: all need the same advice
        if not (_offline() or isinstance(error, ConnectionError)):
            raise SourceError(f"{spec.name}: cannot read the Hub dataset {_describe(source)} ({type(error).__name__}: "
                              f"{error}). Fix: check the id and your connection, point this dataset at another "
                              "parquet copy (--dataset_ids), or use the torchvision folders (data_dir).") from None
        try:
            folder = snapshot_download(source.repo_id, repo_type="dataset", revision=source.revision,
                                       local_files_only=True)
        except Exception:  # not in the Hub cache (or only partly)
            why = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub cannot be reached: {error}"
            revision = f" --revision {source.revision}" if source.revision else ""
            raise SourceError(
                f"{spec.name}: cannot read the Hub dataset {_describe(source)} ({why}), and it is in neither the "
                f"datasets cache ({cache_dir or datasets.config.HF_DATASETS_CACHE}) nor the Hugging Face Hub cache "
                f"({hf_constants.HF_HUB_CACHE}). Fix: where there is network, with the same HF_HOME, run `hf download "
                f"{source.repo_id} --repo-type dataset{revision}` (or run the preset once), then set HF_HUB_OFFLINE=1 "
                "here; or use the torchvision folders (data_dir).") from None
        return load_dataset_builder(folder, cache_dir=cache_dir)
    commit = _recorded_commit(source) if builder.config.data_files is None else None
    if commit is not None and builder.hash != commit:  # datasets' cache builder took the newest copy, of any revision
        raise SourceError(f"{spec.name}: the Hub did not serve {_describe(source)} (offline, unreachable, or refused: "
                          f"see datasets' warning), and its copy in the datasets cache is commit {builder.hash}, not "
                          f"{commit}. Fix: load {_describe(source)} once where there is network (same HF_HOME and "
                          "cache_dir), or correct the HubSource's revision.")
    return builder


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


def _summary(spec, source, builder: DatasetBuilder) -> SourceSummary:
    """Split sizes and label mapping: from the parquet footers of the builder's data files, or, for a cached copy
    (no data files), from the split sizes and features `datasets` recorded when it prepared it."""
    files = builder.config.data_files
    available = sorted(files if files is not None else builder.info.splits or {})
    missing = [split for splits in source.splits.values() for split in splits if split not in available]
    if missing:
        raise SourceError(f"{spec.name}: {_describe(source)} has no split(s) {missing}; it has {available}. Fix: "
                          "give the HubSource the splits it has, or use another copy or the torchvision folders.")
    sizes, features = {}, builder.info.features
    for role, splits in source.splits.items():
        if files is None:
            sizes[role] = sum(builder.info.splits[split].num_examples for split in splits)
            continue
        sizes[role] = 0
        for path in (path for split in splits for path in files[split]):
            try:
                with fsspec.open(path, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    rows, features = parquet.metadata.num_rows, Features.from_arrow_schema(parquet.schema_arrow)
            except Exception as error:
                raise SourceError(f"{spec.name}: {path} of {_describe(source)} is not a readable parquet file "
                                  f"({error}). Fix: use a parquet copy of the dataset (no loading script) or the "
                                  "torchvision folders.") from None
            sizes[role] += rows
    return SourceSummary(_describe(source), sizes, _label_map(spec, source, features))


def hub_summary(spec, source, cache_dir: Optional[str] = None) -> SourceSummary:
    """Split sizes and the label mapping of a Hub copy, from the parquet footers of its files (offline: from the
    copy in the datasets cache or the Hub cache)."""
    return _summary(spec, source, _builder(spec, source, cache_dir))


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
    builder = _builder(spec, source, cache_dir)  # one resolution: the summary and the rows come from the same copy
    summary = _summary(spec, source, builder)
    builder.download_and_prepare()  # as load_dataset does; nothing to do for a copy already prepared
    in_memory = is_small_dataset(builder.info.dataset_size)  # load_dataset's default
    order, prepared = None, {}
    for role, splits in source.splits.items():
        parts = [builder.as_dataset(split=split, in_memory=in_memory) for split in splits]
        data = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        keep = [source.image_column, source.label_column] + ([source.order_column] if source.order_column else [])
        renames = {source.image_column: "image", source.label_column: "label"}
        data = data.select_columns(keep).rename_columns({old: new for old, new in renames.items() if old != new})
        data = relabel(data, summary.label_map, spec.classnames)
        if role == "all":
            order = _order(data, source.order_column)
        prepared[role] = data.select_columns(["image", "label"])
    return prepared, order
