"""Task sequences of the MTIL benchmark (Zheng et al., ICCV 2023) and its variants, as `ContinualTask` lists.

Hub dataset ids are defaults that can be overridden per dataset; they are not reachable from machines without the
Hub, where the `mini` preset (real images from the shared assets) stands in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datasets import Dataset, load_dataset

from .continual.tasks import ContinualTask


@dataclass(frozen=True)
class DatasetSpec:
    """Where an MTIL dataset lives on the Hub and how CLIP is prompted for it."""

    hub_id: str
    templates: tuple[str, ...]
    learning_rate: float  # MoE-Adapters' per-task learning rate (official Order-I script)
    train_split: str = "train"
    eval_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"


MTIL_DATASETS: dict[str, DatasetSpec] = {
    "aircraft": DatasetSpec("HuggingFaceM4/FGVC-Aircraft", ("a photo of a {}, a type of aircraft.",), 5e-3,
                            label_column="variant"),
    "caltech101": DatasetSpec("flwrlabs/caltech101", ("a photo of a {}.", "a painting of a {}.",
                                                      "a plastic {}.", "a sculpture of a {}."), 1e-3),
    "cifar100": DatasetSpec("uoft-cs/cifar100", ("a photo of a {}.", "a blurry photo of a {}.",
                                                 "a low contrast photo of a {}."), 5e-3,
                            image_column="img", label_column="fine_label"),
    "dtd": DatasetSpec("tanganke/dtd", ("a photo of a {} texture.", "a photo of a {} pattern.",
                                        "a photo of a {} thing.", "a photo of a {} object."), 1e-3),
    "eurosat": DatasetSpec("tanganke/eurosat", ("a centered satellite photo of {}.",
                                                "a centered satellite photo of a {}."), 1e-4),
    "flowers": DatasetSpec("nelorth/oxford-flowers", ("a photo of a {}, a type of flower.",), 1e-3),
    "food": DatasetSpec("ethz/food101", ("a photo of {}, a type of food.",), 1e-3, eval_split="validation"),
    "mnist": DatasetSpec("ylecun/mnist", ('a photo of the number: "{}".',), 1e-4),
    "oxford_pet": DatasetSpec("timm/oxford-iiit-pet", ("a photo of a {}, a type of pet.",), 1e-3),
    "stanford_cars": DatasetSpec("tanganke/stanford_cars", ("a photo of a {}.", "a photo of my {}.",
                                                            "a photo of the {}, a type of car."), 1e-3),
    "sun397": DatasetSpec("tanganke/sun397", ("a photo of a {}.", "a photo of the {}."), 1e-3),
}

MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
                "stanford_cars", "sun397"]
MTIL_ORDER_II = ["stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101",
                 "dtd", "eurosat", "cifar100"]
MINI_TASKS = ["caltech101", "cifar10", "clothing", "dtd", "fashion_mnist", "mnist"]


def few_shot_subset(dataset: Dataset, shots: int, seed: int = 0) -> Dataset:
    """`shots` examples of every class, drawn with a fixed seed."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(dataset["label"]):
        by_label.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        indices = by_label[label]
        chosen.extend(rng.sample(indices, min(shots, len(indices))))
    return dataset.select(sorted(chosen))


def _clean_classname(name: str) -> str:
    return name.replace("_", " ").strip()


def hub_task(name: str, hub_id: Optional[str] = None, few_shot: Optional[int] = None, seed: int = 0,
             cache_dir: Optional[str] = None) -> ContinualTask:
    """Load one MTIL dataset from the Hub as a task (class names from its ClassLabel feature)."""
    spec = MTIL_DATASETS[name]
    splits = load_dataset(hub_id or spec.hub_id, cache_dir=cache_dir)
    prepared = {}
    for split in (spec.train_split, spec.eval_split):
        data = splits[split]
        if spec.image_column != "image":
            data = data.rename_column(spec.image_column, "image")
        if spec.label_column != "label":
            data = data.rename_column(spec.label_column, "label")
        prepared[split] = data.select_columns(["image", "label"])
    feature = prepared[spec.train_split].features["label"]
    if not hasattr(feature, "names"):
        raise ValueError(f"{hub_id or spec.hub_id}: the label column has no class names; pass a dataset whose "
                         "label is a ClassLabel.")
    train = prepared[spec.train_split]
    if few_shot:
        train = few_shot_subset(train, few_shot, seed)
    return ContinualTask(name=name, train_dataset=train, eval_dataset=prepared[spec.eval_split],
                         classnames=[_clean_classname(n) for n in feature.names], templates=list(spec.templates),
                         official_learning_rates={"moe-adapters": spec.learning_rate})


def mini_mtil_tasks(assets: Path, names: Optional[list[str]] = None) -> list[ContinualTask]:
    """The six real mini-MTIL datasets of the shared assets, alphabetical like Order I."""
    return [ContinualTask.from_disk(assets / "mini-mtil" / name) for name in (names or MINI_TASKS)]


def class_incremental_tasks(train: Dataset, test: Dataset, classnames: list[str], steps: int,
                            seed: int = 1993) -> list[ContinualTask]:
    """Split a dataset's classes into `steps` groups (shuffled with `seed`, as CIL papers do).

    Step s trains on its own classes' images and is evaluated on the test images of every class seen so far; its
    class names are all classes seen so far, so accuracy at step s is over the cumulative label space.
    """
    if len(classnames) % steps:
        raise ValueError(f"{len(classnames)} classes cannot be split into {steps} equal steps.")
    order = list(range(len(classnames)))
    random.Random(seed).shuffle(order)
    per_step = len(classnames) // steps
    tasks = []
    for step in range(steps):
        seen = order[: (step + 1) * per_step]
        current = set(order[step * per_step : (step + 1) * per_step])
        position = {label: i for i, label in enumerate(seen)}

        def relabel(example):
            return {"label": position[int(example["label"])]}

        step_train = train.filter(lambda label: label in current, input_columns="label").map(relabel)
        step_test = test.filter(lambda label: label in position, input_columns="label").map(relabel)
        tasks.append(ContinualTask(name=f"step{step:02d}", train_dataset=step_train, eval_dataset=step_test,
                                   classnames=[classnames[label] for label in seen]))
    return tasks
