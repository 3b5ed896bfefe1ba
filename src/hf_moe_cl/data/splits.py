"""The official ways of cutting a dataset: the random train/test split of the whole set (Caltech101, EuroSAT,
SUN397) and the per-class few-shot subset."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from datasets import Dataset

from ..options import check_option


def random_split_indices(num_examples: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The indices `torch.utils.data.random_split(range(n), [int(f * n), n - int(f * n)], generator=
    torch.Generator().manual_seed(seed))` puts in train and test: one `randperm` cut at `int(f * n)`."""
    train_size = int(train_fraction * num_examples)
    permutation = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return permutation[:train_size], permutation[train_size:]


def split_whole(dataset: Dataset, train_fraction: float, seed: int,
                order: Optional[Sequence[int]] = None) -> tuple[Dataset, Dataset]:
    """Train and test sets of the whole `dataset` by the official random split; `order` first puts its rows in the
    order the official (torchvision) dataset lists them, without which the same indices pick other images."""
    if order is not None:
        dataset = dataset.select(order)
    train, test = random_split_indices(len(dataset), train_fraction, seed)
    return dataset.select(train), dataset.select(test)


def seeded_rows(count: int, limit: Optional[int], seed: int = 0) -> list[int]:
    """At most `limit` of `count` row indices, a seeded draw kept in row order (all rows when there are no more)."""
    if limit is None or count <= limit:
        return list(range(count))
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def few_shot_subset(dataset: Dataset, shots: int, seed: int = 0) -> Dataset:
    """The first `shots` examples of every class met in one pass of a seeded shuffle, as the official code keeps the
    first `shots` per class of one pass of its shuffled training loader after `seed_all(42)` (finetune.py lines
    39-50). The draw has the same law; the images differ, as torch's DataLoader shuffle cannot be replayed here."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"`shots` must be a positive integer (examples per class), got {shots!r}.")
    check_option("seed", seed, int)
    labels = dataset["label"]
    counts: dict[int, int] = {}
    chosen = []
    for index in torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist():
        label = int(labels[index])
        if counts.get(label, 0) < shots:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(index)
    return dataset.select(sorted(chosen))
