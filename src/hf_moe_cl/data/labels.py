"""A source's label names mapped to official class indices by name: copies order and spell classes differently (the
Hub's Food-101 swaps two classes, Caltech101 copies lower-case the folders), so position alone is never trusted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from datasets import ClassLabel, Dataset


def label_key(name: str) -> str:
    """A class name without case, camel case, punctuation or SUN397's '/a/' prefix: 'AnnualCrop', 'annual_crop' and
    'Annual Crop' agree, 'F-16A/B' and 'F/A-18' stay apart."""
    name = re.sub(r"^/[a-z]/", "", str(name).strip())
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(re.findall(r"[0-9a-z]+", name.lower()))


class LabelMappingError(ValueError):
    """A source's labels do not map one-to-one onto the official classes."""


@dataclass(frozen=True)
class LabelMap:
    """`indices[i]`: the official class of the source's label `i` (None: a class the official code drops)."""

    indices: tuple[Optional[int], ...]
    source_names: tuple[str, ...]

    @property
    def moved(self) -> int:
        """How many source labels land on another index than their own."""
        return sum(1 for source, official in enumerate(self.indices) if official is not None and official != source)


def map_label_names(dataset: str, source: str, names: Sequence[str], aliases: Sequence[Sequence[str]],
                    excluded: Sequence[str] = ()) -> LabelMap:
    """Map each of a source's label `names` to the official class whose `aliases` (official name, torchvision's name,
    number...) it matches by `label_key`; fail naming the dataset, the source and the names that do not fit."""
    table: dict[str, int] = {}
    for index, names_of_class in enumerate(aliases):
        for alias in names_of_class:
            table.setdefault(label_key(alias), index)
    dropped = {label_key(name) for name in excluded}
    indices = [None if label_key(name) in dropped else table.get(label_key(name)) for name in names]
    unknown = [name for name, index in zip(names, indices) if index is None and label_key(name) not in dropped]
    fix = ("Use a copy whose class names are the official or torchvision ones (see MTIL_DATASETS[name].classnames and "
           ".torchvision_classes), or the torchvision folders (data_dir).")
    if unknown:
        raise LabelMappingError(f"{dataset}: {len(unknown)} label name(s) of {source} match no official class: "
                                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. {fix}")
    kept = [index for index in indices if index is not None]
    doubled = sorted({aliases[index][0] for index in kept if kept.count(index) > 1})
    missing = [aliases[index][0] for index in range(len(aliases)) if index not in set(kept)]
    if doubled or missing:
        raise LabelMappingError(
            f"{dataset}: {source} has {len(kept)} classes, the official dataset {len(aliases)}"
            + (f"; several labels fall on {doubled[:5]}" if doubled else "")
            + (f"; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "") + f". {fix}")
    return LabelMap(tuple(indices), tuple(str(name) for name in names))


def relabel(dataset: Dataset, label_map: LabelMap, classnames: Sequence[str]) -> Dataset:
    """`dataset` (an integer `label` column of source labels) with official labels, rows of dropped classes removed.
    The label column is replaced, not rewritten through `map`, so the images are not copied."""
    official = [label_map.indices[label] for label in dataset["label"]]
    keep = [row for row, label in enumerate(official) if label is not None]
    relabelled = dataset.remove_columns("label").add_column(
        "label", [label if label is not None else -1 for label in official], feature=ClassLabel(names=list(classnames)))
    return relabelled if len(keep) == len(official) else relabelled.select(keep)
