"""The `mini-hub` preset's tasks: the six mini-MTIL tasks of the shared assets (`mini`) rebuilt from copies of their
datasets on the Hub, for a machine without the assets. Each task has the assets' class names (task.json), templates
and classes (DTD's first 10, clothing-dataset-small's 10), splits (Caltech101 80/20 with seed 42, DTD train +
validation / test of partition 1) and caps (at most 2,000 training and 1,000 test images, a seeded draw); the images
are the copies' own, at their own size, and the draws are not the assets' (theirs is not recorded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from ..continual.tasks import ContinualTask
from ..data.sources import load_splits
from ..data.splits import seeded_rows
from .datasets import MTIL_DATASETS, RANDOM_SPLIT, HubSource, hub_copy, hub_source

# The base CLIP: OpenAI's smallest, ViT-B/32 (151M parameters, 605 MB), the paper's ViT-B/16 family and pretraining at
# a quarter of its compute per image; transformers' own CLIPModel weights, so nothing is converted.
MINI_HUB_CLIP = "openai/clip-vit-base-patch32"
MINI_TRAIN_IMAGES, MINI_TEST_IMAGES = 2000, 1000  # at most, per task, as in the assets (their README)


@dataclass(frozen=True)
class MiniHubDataset:
    """One mini task as a Hub copy: the assets' class names and templates, and which of the copy's classes they are."""

    name: str
    hub: HubSource
    classnames: tuple[str, ...]  # the assets' names, in their label order
    hub_names: tuple[str, ...]  # the copy's name of each of those classes (matched by `label_key`)
    templates: tuple[str, ...]
    excluded_names: tuple[str, ...] = ()  # the copy's classes the mini task leaves out
    split_rule: Optional[tuple[float, int]] = None
    hub_fallbacks: tuple[HubSource, ...] = ()

    def aliases(self) -> list[tuple[str, ...]]:
        return list(zip(self.classnames, self.hub_names))


_SPLITS = {"train": ("train",), "test": ("test",)}
_CALTECH = MTIL_DATASETS["caltech101"]
_CALTECH_NAMES = {0: "face", 1: "face easy", 24: "cougar body", 25: "cougar face", 29: "crocodile head",
                  42: "flamingo head", 83: "snoopy", 100: "yin yang"}  # where the assets' names are not the official
_DTD = MTIL_DATASETS["dtd"].classnames
_CLOTHING = ("Dress", "Hat", "Longsleeve", "Outwear", "Pants", "Shirt", "Shoes", "Shorts", "Skirt", "T-Shirt")
_FASHION = ("T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Ankle boot")
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MINI_HUB_DATASETS: dict[str, MiniHubDataset] = {spec.name: spec for spec in (
    MiniHubDataset("caltech101", _CALTECH.hub, tuple(_CALTECH_NAMES.get(i, name) for i, name in
                                                     enumerate(_CALTECH.classnames)),
                   _CALTECH.torchvision_classes, ("a photo of a {}.",), split_rule=RANDOM_SPLIT),
    MiniHubDataset("cifar10", hub_copy("uoft-cs/cifar10", _SPLITS, "CIFAR-10's names", "parquet, config plain_text: "
                                       "img, label (10 classes); train 50,000 / test 10,000", image="img",
                                       num_labels=10),
                   _CIFAR10, _CIFAR10, ("a photo of a {}.",)),
    MiniHubDataset("clothing", hub_copy("samokosik/clothes", _SPLITS, "Blazer ... Undershirt", "parquet: image, label "
                                    "(16 classes, the 10 of clothing-dataset-small among them); train 4,283 / test "
                                    "756", num_labels=16),
                   ("dress", "hat", "long sleeve shirt", "outerwear", "pants", "shirt", "shoes", "shorts", "skirt",
                    "t-shirt"), _CLOTHING, ("a photo of a {}, a type of clothing.",),
                   excluded_names=("Blazer", "Blouse", "Hoodie", "Polo", "Top", "Undershirt")),
    MiniHubDataset("dtd", dataclasses.replace(MTIL_DATASETS["dtd"].hub, splits={  # the assets' 80 / 40 per class
        "train": ("train", "validation"), "test": ("test",)}), _DTD[:10], _DTD[:10], ("a photo of a {} texture.",),
                   excluded_names=_DTD[10:]),
    MiniHubDataset("fashion_mnist", hub_copy("zalando-datasets/fashion_mnist", _SPLITS, "'T - shirt / top' ...",
                                         "parquet, config fashion_mnist: image, label; train 60,000 / test 10,000",
                                         num_labels=10),
                   ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                    "ankle boot"), _FASHION, ("a photo of a {}.",)),
    MiniHubDataset("mnist", MTIL_DATASETS["mnist"].hub, tuple("0123456789"), tuple("0123456789"),
                   ('a photo of the number: "{}".',)),
)}


def mini_hub_tasks(names: list[str], hub_ids: Optional[Mapping[str, Union[str, HubSource]]] = None,
                   cache_dir: Optional[str] = None) -> list[ContinualTask]:
    """The mini tasks `names` from their Hub copies (`hub_ids` replaces some: a repo id or a `HubSource`)."""
    tasks = []
    for name in names:
        spec = MINI_HUB_DATASETS[name]
        train, test = load_splits(spec, hub=hub_source(spec, (hub_ids or {}).get(name)), cache_dir=cache_dir)
        tasks.append(ContinualTask(name=name, train_dataset=train.select(seeded_rows(len(train), MINI_TRAIN_IMAGES)),
                                   eval_dataset=test.select(seeded_rows(len(test), MINI_TEST_IMAGES)),
                                   classnames=list(spec.classnames), templates=list(spec.templates)))
    return tasks
