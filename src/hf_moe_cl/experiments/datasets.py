"""The MTIL datasets as the official code builds them: class names, templates, splits, per-recipe learning rates,
and where each is read from (a parquet copy on the Hub, `DatasetSpec.hub`, with the evidence for it, or the
torchvision folders users of the official code already have, see `hf_moe_cl.data.local`).

Facts are read from the official code (MoE-Adapters4CL and ZSCL for MTIL, ConDU's scripts for its learning rates);
`docs/faithfulness.md` lists each with its source. Class-name tables live in `official_classnames.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Optional, Union

from ..continual.tasks import ContinualTask
from ..data.sources import load_splits
from ..data.splits import few_shot_subset
from ..options import check_option

RECIPES = ("moe-adapters", "moe-adapters-few-shot", "condu-lora", "condu-full", "condu-lora-few-shot",
           "condu-full-few-shot")
# The official re-split: torch.utils.data.random_split of the whole dataset into [int(0.8 * n), n - int(0.8 * n)]
# with torch.Generator().manual_seed(42) (train fraction, seed).
RANDOM_SPLIT = (0.8, 42)


@dataclass(frozen=True)
class HubSource:
    """A parquet copy of a dataset on the Hub and what it holds, as read from its card (`evidence`)."""

    repo_id: str
    splits: Mapping[str, tuple[str, ...]]  # "train"/"test" -> its splits, or "all" -> the splits that are the whole set
    image_column: str
    label_column: str
    num_labels: Optional[int]  # label names its card lists (None: not known, only the mapping checks them)
    label_names: str  # how its ClassLabel names relate to the official classes (they are mapped by name)
    evidence: str
    revision: Optional[str] = None
    order_column: Optional[str] = None  # file names, to put rows in torchvision's order before a random split


@dataclass(frozen=True)
class DatasetSpec:
    """One MTIL dataset as the official code builds it."""

    name: str
    official_name: str
    templates: tuple[str, ...]  # all official templates in order; the first is the training template
    classnames: tuple[str, ...]  # official class names in label order
    fixed_classnames: bool  # True: written out by the official code; False: torchvision's classes, '_' -> ' '
    torchvision_classes: tuple[str, ...]  # the class list torchvision builds (empty for Flowers: it has none)
    number_names_from: Optional[int]  # copies that name classes by number: the number of class 0 (MNIST 0, Flowers 1)
    train_split: Optional[str]  # the torchvision split the official code trains on (None: `split_rule`)
    test_split: Optional[str]
    split_rule: Optional[tuple[float, int]]  # (train fraction, seed) of the official random split of the whole set
    official_sizes: tuple[int, int]  # train and test images of the official split
    learning_rates: Mapping[str, float]  # per recipe (RECIPES)
    hub: HubSource
    local_layout: str  # the torchvision folder under `data_dir`
    excluded_names: tuple[str, ...] = ()  # classes the official code drops (Caltech101's background)
    hub_fallbacks: tuple[HubSource, ...] = ()  # copies read, in order, when `hub` cannot be

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def aliases(self) -> list[tuple[str, ...]]:
        """Every name a source may give each official class: official, torchvision's, its number."""
        first = self.number_names_from
        numbers = [] if first is None else [str(first + index) for index in range(len(self.classnames))]
        return [(official, *self.torchvision_classes[index:index + 1], *numbers[index:index + 1])
                for index, official in enumerate(self.classnames)]


_NAMES = json.loads(resources.files(__package__).joinpath("official_classnames.json").read_text(encoding="utf-8"))

CIFAR_TEMPLATES = tuple(template.replace("@", article) for article in ("a", "the") for template in (
    "a photo of @ {}.", "a blurry photo of @ {}.", "a black and white photo of @ {}.", "a low contrast photo of @ {}.",
    "a high contrast photo of @ {}.", "a bad photo of @ {}.", "a good photo of @ {}.", "a photo of @ small {}.",
    "a photo of @ big {}."))
CALTECH_TEMPLATES = tuple(template.replace("@", article) for article in ("a", "the") for template in (
    "a photo of @ {}.", "a painting of @ {}.", "@ plastic {}.", "a sculpture of @ {}.", "a sketch of @ {}.",
    "a tattoo of @ {}.", "@ toy {}.", "a rendition of @ {}.", "@ embroidered {}.", "@ cartoon {}.",
    "@ {} in a video game.", "@ plushie {}.", "@ origami {}.", "art of @ {}.", "graffiti of @ {}.",
    "a drawing of @ {}.", "a doodle of @ {}."))
DTD_TEMPLATES = tuple(f"a photo of {article} {{}} {kind}." for article in ("a", "the")
                      for kind in ("texture", "pattern", "thing", "object"))
CARS_TEMPLATES = ("a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.", "a photo of my {}.",
                  "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                  "a photo of my old {}.")

# Per dataset, as RECIPES: MoE-Adapters full-shot and few-shot (official Order-I scripts), ConDU LoRA and full
# fine-tuning, full-shot and few-shot (zhangzicong518/ConDU scripts/MTIL_LoRA.sh, MTIL_FT.sh, fewshot_MTIL_LoRA.sh,
# fewshot_MTIL_FT.sh line 8; their 12th entry is unused).
_RATES = {
    "aircraft": (5e-3, 8e-3, 1e-3, 5e-5, 3e-3, 5e-5), "caltech101": (1e-3, 5e-4, 5e-4, 1e-5, 8e-4, 1e-5),
    "cifar100": (5e-3, 2e-4, 2e-3, 1e-5, 1.5e-3, 1e-5), "dtd": (1e-3, 5e-3, 2e-3, 1e-5, 2e-3, 1e-5),
    "eurosat": (1e-4, 1e-3, 1.5e-4, 1e-5, 3e-4, 1e-5), "flowers": (1e-3, 1e-3, 1e-5, 1e-5, 1e-5, 1e-5),
    "food": (1e-3, 1e-2, 2e-3, 1e-5, 2e-3, 1e-5), "mnist": (1e-4, 1e-4, 1e-3, 5e-5, 2.5e-3, 1e-5),
    "oxford_pet": (1e-3, 1e-2, 1.5e-4, 1e-5, 3e-4, 5e-5), "stanford_cars": (1e-3, 1e-2, 2e-3, 1e-5, 2e-3, 1e-5),
    "sun397": (1e-3, 1e-2, 1.5e-3, 1e-5, 2e-3, 1e-5)}


def _spec(name, official_name, templates, hub, layout, sizes, splits=(None, None), number_from=None, excluded=(),
          fallbacks=()):
    fixed = _NAMES["fixed"].get(name)
    torchvision = tuple(_NAMES["torchvision"].get(name, ()))
    classnames = tuple(fixed) if fixed else tuple(n.replace("_", " ") for n in torchvision)
    return DatasetSpec(name, official_name, tuple(templates), classnames, fixed is not None, torchvision, number_from,
                       splits[0], splits[1], None if splits[0] else RANDOM_SPLIT, sizes,
                       dict(zip(RECIPES, _RATES.get(name, ()))), hub, layout, tuple(excluded), tuple(fallbacks))


def hub_copy(repo_id, splits, label_names, evidence, image="image", label="label", num_labels=None, **kwargs):
    roles = {"all": splits} if isinstance(splits, tuple) else splits
    return HubSource(repo_id, roles, image, label, num_labels, label_names,
                     f"https://huggingface.co/datasets/{repo_id} (card and viewer): {evidence}", **kwargs)


_OFFICIAL_SPLITS = {"train": ("train",), "test": ("test",)}

MTIL_DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    _spec("aircraft", "Aircraft", ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
          hub_copy("HuggingFaceM4/FGVC-Aircraft", _OFFICIAL_SPLITS, "variants.txt names",
               "main holds only a loading script (refused by datasets>=4); PR #1 (refs/pr/1: 'Convert dataset to "
               "Parquet', 'Delete loading script') holds data/{train,validation,test}-*.parquet; columns image, "
               "variant, family, manufacturer as in the script's features", label="variant", num_labels=100,
               revision="refs/pr/1"),
          "fgvc-aircraft-2013b/data/{variants.txt,images_variant_{train,test}.txt,images/}", (3334, 3333),
          ("train", "test"),
          fallbacks=[hub_copy("Donghyun99/FGVC-Aircraft", _OFFICIAL_SPLITS, "variant names, mapped by name (unverified)",
                          "parquet, config default, data/{train,val,test}-0000{0,1}-of-00002.parquet, 3.33k rows per "
                          "split (viewer); its columns and label names are unverified, checked at load time",
                          num_labels=100)]),
    _spec("caltech101", "Caltech101", CALTECH_TEMPLATES,
          hub_copy("flwrlabs/caltech101", ("train",), "torchvision folder names lower-cased (faces, leopards, ...)",
               "parquet, one 'train' split (the whole dataset), 'label' ClassLabel of 101 classes (0 accordion, "
               "1 airplanes, 36 faces, ..., 100 yin_yang), no background class", num_labels=101),
          "caltech101/101_ObjectCategories/<class>/image_NNNN.jpg", (6941, 1736),
          excluded=("BACKGROUND_Google",)),
    _spec("cifar100", "CIFAR100", CIFAR_TEMPLATES,
          hub_copy("uoft-cs/cifar100", _OFFICIAL_SPLITS, "torchvision's fine label names (aquarium_fish, ...)",
               "parquet since 'Convert dataset to Parquet (#4)', config cifar100: img, fine_label (100 classes), "
               "coarse_label; train 50,000 / test 10,000", image="img", label="fine_label", num_labels=100),
          "cifar-100-python/{train,test,meta}", (50000, 10000), ("train", "test")),
    _spec("dtd", "DTD", DTD_TEMPLATES,
          hub_copy("mcimpoi/dtd_split_1", _OFFICIAL_SPLITS, "DTD folder names, sorted (banded ... zigzagged)",
               "uploaded by DTD's author; parquet, 'label' ClassLabel banded..zigzagged, train / validation / test "
               "of 1,880 each = partition 1 (tanganke/dtd is not used: its train split of 3,760 adds val1)",
               num_labels=47),
          "dtd/dtd/{images/<class>/,labels/train1.txt,labels/test1.txt}", (1880, 1880), ("train", "test")),
    _spec("eurosat", "EuroSAT", ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                                 "a centered satellite photo of the {}."),
          hub_copy("timm/eurosat-rgb", ("train", "validation", "test"), "torchvision folder names (AnnualCrop ...)",
               "parquet, 'label' ClassLabel AnnualCrop..SeaLake, 'image_id'; train 16,200 + validation 5,400 + "
               "test 5,400 = all 27,000 images", num_labels=10, order_column="image_id"),
          "eurosat/2750/<class>/*.jpg", (21600, 5400)),
    _spec("flowers", "Flowers", ("a photo of a {}, a type of flower.",),
          hub_copy("dpdl-benchmark/oxford_flowers102", _OFFICIAL_SPLITS, "the official class names in the official order",
               "parquet, 'label' ClassLabel '0': pink primrose, '1': hard-leaved pocket orchid, ...; train 1,020 / "
               "validation 1,020 / test 6,149 (setid.mat's trnid / valid / tstid)", num_labels=102),
          "flowers-102/{jpg/,imagelabels.mat,setid.mat}", (1020, 6149), ("train", "test"), number_from=1),
    _spec("food", "Food", ("a photo of a {}, a type of food.",),
          hub_copy("ethz/food101", {"train": ("train",), "test": ("validation",)},
               "Food-101 folder names, cheesecake (16) before cheese_plate (17) unlike torchvision's sorted order",
               "parquet since 'Convert dataset to Parquet (#3)', 'label' ClassLabel apple_pie..waffles; train 75,750 "
               "/ validation 25,250 (the official test split)", num_labels=101),
          "food-101/{meta/train.json,meta/test.json,images/}", (75750, 25250), ("train", "test")),
    _spec("mnist", "MNIST", ('a photo of the number: "{}".',),
          hub_copy("ylecun/mnist", _OFFICIAL_SPLITS, "digits '0'..'9'",
               "parquet since 'Convert dataset to Parquet (#7)', config mnist, 'label' ClassLabel '0'..'9'; train "
               "60,000 / test 10,000", num_labels=10),
          "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", (60000, 10000), ("train", "test"),
          number_from=0),
    _spec("oxford_pet", "OxfordPet", ("a photo of a {}, a type of pet.",),
          hub_copy("timm/oxford-iiit-pet", _OFFICIAL_SPLITS, "breed file prefixes, lower-cased (abyssinian, ...)",
               "parquet, 'label' ClassLabel abyssinian..yorkshire_terrier (standard label ordering), image_id, "
               "label_cat_dog; train 3,680 (= trainval) / test 3,669", num_labels=37),
          "oxford-iiit-pet/{annotations/trainval.txt,annotations/test.txt,images/}", (3680, 3669),
          ("trainval", "test")),
    _spec("stanford_cars", "StanfordCars", CARS_TEMPLATES,
          hub_copy("tanganke/stanford_cars", _OFFICIAL_SPLITS, "devkit class names in devkit order",
               "parquet, 'label' ClassLabel of 196 classes (0 AM General Hummer SUV 2000, 1 Acura RL Sedan 2012, "
               "...); read with splits train / test by tanganke/fusion_bench "
               "config/dataset/image_classification/{train,test}/stanford-cars.yaml", num_labels=196),
          "stanford_cars/{devkit/cars_meta.mat,devkit/cars_train_annos.mat,cars_test_annos_withlabels.mat,"
          "cars_train/,cars_test/}", (8144, 8041), ("train", "test")),
    _spec("sun397", "SUN397", ("a photo of a {}.", "a photo of the {}."),
          hub_copy("1aurent/SUN397", ("train",), "ClassName.txt lines ('/a/abbey', '/a/apartment_building/outdoor', ...)",
               "parquet, one 'train' split of 109k rows (the whole dataset), 'label' ClassLabel '0': /a/abbey, ...; "
               "tanganke/sun397 is not used: it holds partition 1 only (19,850 + 19,850)", num_labels=397),
          "SUN397/{ClassName.txt,<letter>/<class>[/<sub>]/sun_*.jpg}", (87003, 21751)),
)}

# Class-incremental TinyImageNet (the paper's Table 4): continuum's TinyImageNet200 (MoE-Adapters4CL
# cil/continual_clip/datasets.py lines 47-54), labels in wnids.txt order, named by cil/dataset_reqs/tinyimagenet_classes.txt;
# train = train/ (500 per class), test = val/ (50 per class).
TINY_IMAGENET = _spec(
    "tinyimagenet", "TinyImageNet200", ("a bad photo of a {}.",),
    hub_copy("zh-plus/tiny-imagenet", {"train": ("train",), "test": ("valid",)}, "wnids (n01443537, ...), mapped by name",
         "parquet, 'label' ClassLabel of the 200 wnids; train 100,000 / valid 10,000 (the official val/)",
         num_labels=200),
    "tinyimagenet/tiny-imagenet-200/{wnids.txt,train/<wnid>/<wnid>_boxes.txt,train/<wnid>/images/,val/val_annotations.txt,"
    "val/images/}", (100000, 10000), ("train", "val"))
CIL_DATASETS: dict[str, DatasetSpec] = {"cifar100": MTIL_DATASETS["cifar100"], "tinyimagenet": TINY_IMAGENET}

MTIL_ORDER_I = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
                "stanford_cars", "sun397"]
MTIL_ORDER_II = ["stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101",
                 "dtd", "eurosat", "cifar100"]


def hub_source(spec, hub: Union[None, str, HubSource] = None) -> Optional[HubSource]:
    """The copy of `spec`'s dataset the user chose: a `HubSource` as given, or a repo id in place of the default's;
    None (the spec's own copies, tried in order) when none is chosen."""
    if hub is None or hub == spec.hub.repo_id:
        return None
    if isinstance(hub, HubSource):
        return hub
    return dataclasses.replace(spec.hub, repo_id=hub, revision=None, num_labels=None, evidence="given by the user")


def mtil_task(name: str, data_dir: Union[None, str, os.PathLike] = None, hub: Union[None, str, HubSource] = None,
              few_shot: Optional[int] = None, seed: int = 0, cache_dir: Optional[str] = None) -> ContinualTask:
    """One MTIL dataset as the official code builds it: official class names and templates, its split rule, and the
    official learning rates per recipe (with `few_shot`, the few-shot ones under each method's recipe name).
    `few_shot` None or 0 is the whole training split, as the official `args.few_shot > 0` rule.

    Read from torchvision folders under `data_dir` if given, else from the Hub copy `hub` (default: the spec's).
    """
    if name not in MTIL_DATASETS:  # a public function: a caller outside the presets gets the names too
        raise ValueError(f"Unknown MTIL dataset {name!r}; choose one of {', '.join(MTIL_DATASETS)}.")
    check_option("few_shot", few_shot, int, low=0, optional=True)
    spec = MTIL_DATASETS[name]
    train, test = load_splits(spec, data_dir=data_dir, hub=None if data_dir else hub_source(spec, hub),
                              cache_dir=cache_dir)
    rates = dict(spec.learning_rates)
    if few_shot:  # each method's few-shot rates under its own recipe name
        rates.update({recipe: rates[f"{recipe}-few-shot"] for recipe in ("moe-adapters", "condu-lora", "condu-full")})
    return ContinualTask(name=name, train_dataset=few_shot_subset(train, few_shot, seed) if few_shot else train,
                         eval_dataset=test, classnames=list(spec.classnames), templates=list(spec.templates),
                         official_learning_rates=rates, full_train_dataset=train if few_shot else None)
