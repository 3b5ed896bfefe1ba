"""The paper's experiments as presets (task sequences and their official recipe facts), and the tasks they run on:
MTIL orders and few-shot MTIL from `datasets.MTIL_DATASETS`, class-incremental CIFAR-100 and TinyImageNet, the
offline stand-ins built from the shared assets (`mini`, `mini-long`), and `mini-hub`, the mini tasks from the Hub.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from datasets import ClassLabel, Dataset

from ..assets import MINI_MTIL, assets_dir as resolve_assets
from ..continual.tasks import ContinualTask
from ..data.sources import load_splits
from ..data.splits import seeded_rows
from ..options import check_option
from .datasets import CIL_DATASETS, MTIL_ORDER_I, MTIL_ORDER_II, HubSource, hub_source, mtil_task
from .mini_hub import MINI_HUB_CLIP, mini_hub_tasks

MINI_TASKS = ["caltech101", "cifar10", "clothing", "dtd", "fashion_mnist", "mnist"]


# ----- mini-long: a long task sequence cut from the shared assets ------------------------------------------------
# Each of the six mini-MTIL datasets is cut by classes, in label order, into MINI_LONG_ROUNDS groups of consecutive
# classes, the last group taking the remainder: Caltech101's 101 classes into 20, 20, 20, 20 and 21, each 10-class
# dataset into pairs (labels 0-1, 2-3, ..., 8-9). The 30 tasks run in rounds: round r is the r-th group of every
# dataset in alphabetical order (caltech101-1, cifar10-1, clothing-1, dtd-1, fashion_mnist-1, mnist-1,
# caltech101-2, ...), so every sixth task closes a round. Each task keeps its dataset's templates, its own class
# names, labels renumbered from 0, and at most MINI_LONG_EVAL_IMAGES test images (a seeded draw) so that every cell
# of the 30 x 30 matrix stays cheap on a CPU.
MINI_LONG_ROUNDS = 5
MINI_LONG_STEPS = 100
MINI_LONG_EVAL_IMAGES = 100


def mini_long_names(rounds: int = MINI_LONG_ROUNDS) -> list[str]:
    """The mini-long task names in their order: `<dataset>-<group>`, round by round."""
    check_option("rounds", rounds, int, low=1)
    return [f"{name}-{group}" for group in range(1, rounds + 1) for name in MINI_TASKS]


def class_groups(num_classes: int, groups: int) -> list[range]:
    """`num_classes` labels cut into `groups` runs of consecutive labels, the last taking the remainder."""
    check_option("groups", groups, int, low=1)
    size = num_classes // groups
    if size < 1:
        raise ValueError(f"{num_classes} classes cannot be cut into {groups} groups of at least one class.")
    return [range(g * size, num_classes if g == groups - 1 else (g + 1) * size) for g in range(groups)]


def class_subset_task(task: ContinualTask, classes: range, name: str, eval_images: Optional[int] = None,
                      seed: int = 0) -> ContinualTask:
    """The part of `task` whose labels are in `classes`, relabelled 0.. in that order, with its own class names;
    the test set cut to at most `eval_images` images (a seeded draw)."""
    names = [task.classnames[c] for c in classes]

    def subset(dataset: Dataset, limit: Optional[int] = None) -> Dataset:
        labels = dataset["label"]
        keep = [i for i, label in enumerate(labels) if label in classes]
        keep = [keep[i] for i in seeded_rows(len(keep), limit, seed)]
        # The whole split relabelled first (other classes -1), then the rows picked: an add_column after select, or a
        # cast_column, would write a copy of the images (cache-*.arrow) into the folder the dataset was loaded from.
        relabelled = [label - classes.start if label in classes else -1 for label in labels]
        whole = dataset.remove_columns("label").add_column("label", relabelled, feature=ClassLabel(names=names))
        return whole.select(keep)

    return ContinualTask(name=name, train_dataset=subset(task.train_dataset), eval_dataset=subset(
        task.eval_dataset, eval_images), classnames=names, templates=list(task.templates))


def mini_long_tasks(assets: Union[str, os.PathLike], names: Optional[list[str]] = None,
                    rounds: int = MINI_LONG_ROUNDS, eval_images: Optional[int] = MINI_LONG_EVAL_IMAGES,
                    loaded: Optional[dict[str, ContinualTask]] = None) -> list[ContinualTask]:
    """The mini-long tasks (all, or `names` in that order): the mini-MTIL datasets cut by classes (see above).
    `loaded` keeps the whole mini-MTIL tasks by dataset name between calls (this call adds those it loads), so that
    calls for one task at a time read each dataset once."""
    names = mini_long_names(rounds) if names is None else list(names)
    check_names("mini-long", mini_long_names(rounds), names)
    check_option("eval_images", eval_images, int, low=1, optional=True)
    whole = {} if loaded is None else loaded
    datasets = sorted({name.rsplit("-", 1)[0] for name in names} - set(whole))
    if datasets:  # none when all were loaded (mini_mtil_tasks of no names would load all six)
        whole.update(zip(datasets, mini_mtil_tasks(assets, datasets)))
    tasks = []
    for name in names:
        dataset, group = name.rsplit("-", 1)
        groups = class_groups(len(whole[dataset].classnames), rounds)
        tasks.append(class_subset_task(whole[dataset], groups[int(group) - 1], name, eval_images))
    return tasks


@dataclass(frozen=True)
class MTILPreset:
    """A task sequence and the official per-task recipe facts of MoE-Adapters' MTIL runs."""

    name: str
    tasks: tuple[str, ...]
    steps_per_task: int
    shots: Optional[int] = None  # examples per class (few-shot MTIL: 5)
    batch_size: int = 64
    label_smoothing: float = 0.2
    warmup_steps: int = 100
    ddas: bool = True  # route every evaluation batch through DDAS, as the paper's tables
    ddas_threshold: Optional[float] = 0.0655  # Full_Shot_order1.sh line 10; few-shot: Few_Shot_order1_test.sh line 10
    ddas_learning_rate: float = 0.01  # AutoEncoder.py line 180; few-shot: few_shot_AutoEncoder.py line 211 (0.003)
    eval_batch_size: int = 128
    from_assets: bool = False  # the offline stand-in: mini tasks from the shared assets
    mini_hub: bool = False  # the mini tasks rebuilt from their Hub copies (`mini_hub.MINI_HUB_DATASETS`)
    model: Optional[str] = None  # the base CLIP when it is not the paper's ViT-B/16 (nor the assets' proxy CLIP)
    class_groups: Optional[int] = None  # mini-long: every assets dataset cut by classes into this many tasks
    eval_images: Optional[int] = None  # test images kept per task (a seeded draw), to bound evaluation


# MoE-Adapters4CL cil/class_orders/tinyimagenet.yaml lines 1-17 (ZSCL's is byte-identical)
TINYIMAGENET_ORDER = (
    131, 181, 22, 172, 144, 92, 97, 187, 58, 93, 6, 70, 106, 68, 153, 168, 179, 199, 29, 46, 9, 142, 134, 88, 193, 110,
    26, 32, 117, 112, 17, 39, 166, 13, 94, 138, 109, 147, 51, 101, 59, 188, 116, 5, 170, 99, 100, 167, 180, 146, 65, 1,
    104, 43, 38, 184, 123, 171, 137, 162, 71, 44, 95, 174, 12, 7, 54, 152, 21, 47, 28, 176, 34, 2, 132, 118, 42, 189,
    150, 14, 165, 41, 192, 45, 82, 128, 63, 57, 197, 160, 53, 75, 108, 135, 121, 159, 183, 67, 169, 50, 87, 69, 89, 196,
    115, 19, 148, 96, 86, 11, 8, 60, 33, 173, 78, 4, 119, 105, 182, 127, 177, 30, 186, 40, 49, 178, 76, 157, 161, 73,
    164, 151, 31, 74, 191, 27, 125, 198, 81, 20, 155, 114, 139, 36, 61, 56, 145, 48, 16, 83, 62, 85, 126, 0, 102, 23, 3,
    140, 15, 195, 133, 113, 190, 141, 52, 163, 156, 80, 111, 90, 175, 143, 120, 84, 18, 25, 79, 37, 154, 136, 64, 158,
    24, 185, 72, 35, 129, 55, 149, 91, 122, 77, 103, 124, 130, 66, 10, 107, 194, 98)


@dataclass(frozen=True)
class ClassIncrementalPreset:
    """MoE-Adapters' class-incremental recipe (cil/configs/class, cil/class_orders): CIFAR-100 or TinyImageNet."""

    name: str
    initial_increment: int
    increment: int
    dataset: str = "cifar100"
    class_order: tuple[int, ...] = field(default=(
        87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11,
        4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82,
        53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85,
        2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39))
    epochs_per_step: int = 1
    batch_size: int = 128  # cifar100_{10-10,5-5}-MoE-Adapters.yaml line 20; the 2-2 and TinyImageNet configs: 64
    learning_rate: float = 1e-3
    label_smoothing: float = 0.0
    warmup_steps: int = 30
    weight_decay: float = 0.0
    template: str = "a bad photo of a {}."  # class names are torchvision's, underscores kept
    num_experts: int = 2  # one router shared by all steps, top-2, no freezing
    top_k: int = 2
    noisy_gating_eval: bool = True  # cil/clip/model.py lines 15, 288, 398-422: noise stays on in evaluation

    def __post_init__(self):
        check_increments(len(self.class_order), self.initial_increment, self.increment)

    @property
    def num_steps(self) -> int:
        return check_increments(len(self.class_order), self.initial_increment, self.increment)


def check_increments(num_classes: int, initial_increment: int, increment: int) -> int:
    """The number of steps that `num_classes` classes cut into `initial_increment`, then `increment` per step, make;
    refused as continuum's ClassIncremental (the official CIL code's scenarios) refuses it when the later steps
    would not all have `increment` classes. `initial_increment` equal to `num_classes` is one step, as there."""
    check_option("initial_increment", initial_increment, int, low=1, high=num_classes)
    check_option("increment", increment, int, low=1)
    rest = num_classes - initial_increment
    if rest % increment:
        raise ValueError(f"`increment`={increment} does not divide the {rest} classes left after `initial_increment`="
                         f"{initial_increment} of {num_classes}: the last step would have {rest % increment} "
                         f"(continuum refuses such steps too). Choose an increment that divides {rest}.")
    return 1 + rest // increment


PRESETS: dict[str, Union[MTILPreset, ClassIncrementalPreset]] = {preset.name: preset for preset in (
    *(MTILPreset(f"mtil-order-{n}", tuple(order), 1000) for n, order in ((1, MTIL_ORDER_I), (2, MTIL_ORDER_II))),
    *(MTILPreset(f"fewshot-mtil-order-{n}", tuple(order), 500, shots=5, ddas_threshold=0.06, ddas_learning_rate=0.003)
      for n, order in ((1, MTIL_ORDER_I), (2, MTIL_ORDER_II))),
    ClassIncrementalPreset("cifar100-cil-10", 10, 10),
    ClassIncrementalPreset("cifar100-cil-20", 5, 5),
    ClassIncrementalPreset("cifar100-cil-50", 2, 2, batch_size=64),  # cifar100_2-2-MoE-Adapters.yaml line 20
    # 100 base classes, then N steps: run_experiment_tiny{5,10,20}step.sh line 6 runs tinyimagenet_100-{20,10,5}.yaml
    # (increment 20 / 10 / 5, line 22), each with batch_size 64 (line 20)
    *(ClassIncrementalPreset(f"tinyimagenet-cil-{steps}", 100, 100 // steps, dataset="tinyimagenet",
                             class_order=TINYIMAGENET_ORDER, batch_size=64) for steps in (5, 10, 20)),
    MTILPreset("mini", tuple(MINI_TASKS), 200, ddas=False, ddas_threshold=None, from_assets=True),
    MTILPreset("mini-hub", tuple(MINI_TASKS), 200, ddas=False, ddas_threshold=None, mini_hub=True, model=MINI_HUB_CLIP),
    MTILPreset("mini-long", tuple(mini_long_names()), MINI_LONG_STEPS, warmup_steps=10, ddas=False,
               ddas_threshold=None, from_assets=True, class_groups=MINI_LONG_ROUNDS, eval_images=MINI_LONG_EVAL_IMAGES),
)}


def get_preset(preset: Union[str, MTILPreset, ClassIncrementalPreset]) -> Union[MTILPreset, ClassIncrementalPreset]:
    if not isinstance(preset, str):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[preset]


def mini_mtil_tasks(assets: Union[str, os.PathLike], names: Optional[list[str]] = None) -> list[ContinualTask]:
    """The six real mini-MTIL datasets of the shared assets, alphabetical like Order I; a folder whose task.json
    names another task is refused (it would be trained and reported under that name)."""
    tasks = [ContinualTask.from_disk(Path(assets) / MINI_MTIL / name) for name in (names or MINI_TASKS)]
    for name, task in zip(names or MINI_TASKS, tasks):
        if task.name != name:
            raise ValueError(f"{Path(assets) / MINI_MTIL / name / 'task.json'} names the task {task.name!r}, not "
                             f"{name!r}: the folder holds another task's data or its task.json was edited. Restore "
                             "the assets' folder.")
    return tasks


def class_incremental_tasks(train: Dataset, test: Dataset, classnames: list[str], steps: Optional[int] = None,
                            seed: int = 1993, class_order: Optional[list[int]] = None,
                            initial_increment: Optional[int] = None, increment: Optional[int] = None,
                            templates: Optional[list[str]] = None) -> list[ContinualTask]:
    """Split a dataset's classes into steps: `class_order` (default: shuffled with `seed`, an int), cut into
    `initial_increment` then `increment` classes (both or neither; see `check_increments`), else into `steps` equal
    groups (`steps` with the increments must count the steps they make). Labels become positions in the class
    order, as the official CIL code does; step s trains on its own classes (`train_classes`: its loss covers only
    them) and is evaluated on the test images of every class seen so far, among all those class names."""
    check_option("seed", seed, int)
    order = list(class_order) if class_order is not None else list(range(len(classnames)))
    if class_order is None:
        random.Random(seed).shuffle(order)
    if sorted(order) != list(range(len(classnames))):
        raise ValueError(f"class_order must list each of the {len(classnames)} classes once.")
    if (initial_increment is None) != (increment is None):
        raise ValueError(f"Got `initial_increment`={initial_increment!r} and `increment`={increment!r}: pass both (the "
                         "first step's classes, then each later step's) or neither (`steps` equal steps).")
    if initial_increment is None:
        check_option("steps", steps, int, low=1)
        if len(order) % steps:
            raise ValueError(f"{len(order)} classes cannot be split into {steps} equal steps; pass `steps` that "
                             "divides them, or `initial_increment` and `increment`.")
        initial_increment = increment = len(order) // steps
    count = check_increments(len(order), initial_increment, increment)
    if steps is not None and steps != count:
        raise ValueError(f"`steps`={steps!r} disagrees with `initial_increment`={initial_increment} and `increment`="
                         f"{increment}, which cut the {len(order)} classes into {count} steps: pass `steps` alone "
                         "or the increments alone.")
    bounds = list(range(initial_increment, len(order), increment)) + [len(order)]
    position = {label: index for index, label in enumerate(order)}
    train_labels, test_labels = ([position[int(label)] for label in split["label"]] for split in (train, test))
    train = train.remove_columns("label").add_column("label", train_labels)
    test = test.remove_columns("label").add_column("label", test_labels)
    names = [classnames[label] for label in order]
    tasks, low = [], 0
    for step, high in enumerate(bounds):
        step_train = train.select([i for i, label in enumerate(train_labels) if low <= label < high])
        step_test = test.select([i for i, label in enumerate(test_labels) if label < high])
        tasks.append(ContinualTask(name=f"step{step:02d}", train_dataset=step_train, eval_dataset=step_test,
                                   classnames=names[:high], templates=list(templates or ["a photo of a {}."]),
                                   train_classes=list(range(low, high))))
        low = high
    return tasks


def check_task_names(preset: MTILPreset, names: list[str]) -> None:
    """`names`, a subset/order of the preset's tasks: each known and given once."""
    check_names(f"Preset {preset.name!r}", preset.tasks, names)


def check_names(owner: str, tasks: Sequence[str], names: list[str]) -> None:
    """`names`, a non-empty subset/order of `tasks`: each known and given once; `owner` starts the message."""
    unknown = sorted(set(names) - set(tasks)) or ([] if names else ["(none)"])
    twice = sorted({name for name in names if names.count(name) > 1})
    if unknown or twice:
        raise ValueError(f"{owner} " + (f"has no task(s) {unknown}" if unknown else
                                        f"got the task(s) {twice} twice (give each once)") +
                         f"; its tasks are {', '.join(tasks)}.")


def preset_tasks(preset: Union[str, MTILPreset, ClassIncrementalPreset], data_dir: Union[None, str, os.PathLike] = None,
                 hub_ids: Optional[Mapping[str, Union[str, HubSource]]] = None, tasks: Optional[list[str]] = None,
                 seed: int = 0, cache_dir: Optional[str] = None,
                 assets: Union[None, str, os.PathLike] = None) -> list[ContinualTask]:
    """The tasks of a preset, in its order (or the subset/order `tasks`); data from torchvision folders under
    `data_dir`, else the Hub copies (`hub_ids` replaces some by dataset name), `assets` for the mini preset."""
    preset = get_preset(preset)
    hub_ids = dict(hub_ids or {})
    if isinstance(preset, ClassIncrementalPreset):
        spec = CIL_DATASETS[preset.dataset]
        train, test = load_splits(spec, data_dir=data_dir, hub=None if data_dir else hub_source(
            spec, hub_ids.get(spec.name)), cache_dir=cache_dir)
        # the official names: torchvision's CIFAR-100 classes (underscores kept), TinyImageNet's class list
        names = spec.classnames if spec.fixed_classnames else spec.torchvision_classes
        return class_incremental_tasks(train, test, list(names), class_order=preset.class_order,
                                       initial_increment=preset.initial_increment, increment=preset.increment,
                                       templates=[preset.template])
    names = list(preset.tasks if tasks is None else tasks)
    check_task_names(preset, names)
    if preset.from_assets and preset.class_groups:
        return mini_long_tasks(resolve_assets(assets), names, preset.class_groups, preset.eval_images)
    if preset.from_assets:
        return mini_mtil_tasks(resolve_assets(assets), names)
    if preset.mini_hub:
        return mini_hub_tasks(names, hub_ids, cache_dir)
    return [mtil_task(name, data_dir=data_dir, hub=hub_ids.get(name), few_shot=preset.shots, seed=seed,
                      cache_dir=cache_dir) for name in names]
