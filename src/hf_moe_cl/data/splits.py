"""The official ways of cutting a dataset: the random train/test split of the whole set (Caltech101, EuroSAT,
SUN397) and the per-class few-shot subset."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from datasets import Dataset


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


def few_shot_subset(dataset: Dataset, shots: int, seed: int = 0) -> Dataset:
    """`shots` examples of every class, drawn with a fixed seed (the official code keeps the first `shots` of each
    class in one shuffled pass, which is the same draw without a seed)."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(dataset["label"]):
        by_label.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        indices = by_label[label]
        chosen.extend(rng.sample(indices, min(shots, len(indices))))
    return dataset.select(sorted(chosen))
