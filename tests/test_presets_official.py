"""The presets against the facts read from the official code (../shared/reference) and ConDU's scripts."""

import json

import pytest
import torch
from torch.utils.data import random_split

from hf_moe_cl.assets import REPO_ROOT
from hf_moe_cl.data.labels import label_key
from hf_moe_cl.data.splits import random_split_indices
from hf_moe_cl.experiments.datasets import MTIL_DATASETS, MTIL_ORDER_I, MTIL_ORDER_II
from hf_moe_cl.experiments.presets import PRESETS, ClassIncrementalPreset, MTILPreset

REFERENCE = REPO_ROOT.parent / "shared" / "reference"
OFFICIAL_NAMES = {"aircraft": "Aircraft", "caltech101": "Caltech101", "cifar100": "CIFAR100", "dtd": "DTD",
                  "eurosat": "EuroSAT", "flowers": "Flowers", "food": "Food", "mnist": "MNIST",
                  "oxford_pet": "OxfordPet", "stanford_cars": "StanfordCars", "sun397": "SUN397"}


def reference(name):
    path = REFERENCE / name
    if not path.is_file():  # a clone without ../shared: the facts are not here to compare with
        pytest.skip(f"{path} is absent: the official facts live in ../shared/reference beside the repo")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def mtil():
    return reference("mtil-official.json")


@pytest.fixture(scope="module")
def recipes():
    return reference("moe-adapters-recipes.json")


@pytest.mark.parametrize("name", sorted(OFFICIAL_NAMES))
def test_class_names_and_templates_are_the_official_ones(name, mtil):
    spec, official = MTIL_DATASETS[name], mtil[OFFICIAL_NAMES[name]]
    assert spec.official_name == OFFICIAL_NAMES[name]
    assert list(spec.templates) == official["templates"]
    if "classnames" in official:  # written out by the official code
        assert spec.fixed_classnames and list(spec.classnames) == official["classnames"]
    else:  # torchvision's classes with '_' replaced by ' ', as the official rule says
        assert "'_' replaced by ' '" in official["classnames_rule"] and not spec.fixed_classnames
        assert list(spec.classnames) == [name.replace("_", " ") for name in spec.torchvision_classes]
    keys = [label_key(alias) for aliases in spec.aliases() for alias in set(aliases)]
    owners = {}
    for index, aliases in enumerate(spec.aliases()):
        for alias in aliases:
            assert owners.setdefault(label_key(alias), index) == index, f"{name}: {alias!r} names two classes"
    assert len(spec.classnames) == spec.hub.num_labels and keys


def test_rule_based_class_lists_have_the_torchvision_sizes_and_orders():
    sizes = {"aircraft": 100, "cifar100": 100, "dtd": 47, "food": 101, "oxford_pet": 37, "stanford_cars": 196,
             "sun397": 397}
    for name, size in sizes.items():
        assert len(MTIL_DATASETS[name].torchvision_classes) == size
    food = MTIL_DATASETS["food"].torchvision_classes  # torchvision sorts the meta keys: cheese_plate < cheesecake
    assert food.index("cheese_plate") == 16 and food.index("cheesecake") == 17
    assert "apartment_building/outdoor" in MTIL_DATASETS["sun397"].torchvision_classes
    assert MTIL_DATASETS["oxford_pet"].classnames[:2] == ("Abyssinian", "American Bulldog")
    assert MTIL_DATASETS["stanford_cars"].classnames[:3] == ("AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                                                             "Acura TL Sedan 2012")


def test_orders_and_learning_rates_are_the_official_scripts(recipes):
    by_official = {official: name for name, official in OFFICIAL_NAMES.items()}
    official = recipes["mtil"]
    assert MTIL_ORDER_I == [by_official[name] for name in official["order_I"]]
    assert MTIL_ORDER_II == [by_official[name] for name in official["order_II"]]
    rates = lambda recipe: [MTIL_DATASETS[name].learning_rates[recipe] for name in MTIL_ORDER_I]  # noqa: E731
    assert rates("moe-adapters") == official["full_shot_lr_order_I"]
    assert rates("moe-adapters-few-shot") == official["few_shot_lr_order_I"]
    # zhangzicong518/ConDU scripts/MTIL_LoRA.sh and scripts/MTIL_FT.sh, datasets in Order I
    assert rates("condu-lora") == [1e-3, 5e-4, 2e-3, 2e-3, 1.5e-4, 1e-5, 2e-3, 1e-3, 1.5e-4, 2e-3, 1.5e-3]
    assert rates("condu-full") == [5e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 5e-5, 1e-5, 1e-5, 1e-5]
    # scripts/fewshot_MTIL_LoRA.sh and scripts/fewshot_MTIL_FT.sh line 8
    assert rates("condu-lora-few-shot") == [3e-3, 8e-4, 1.5e-3, 2e-3, 3e-4, 1e-5, 2e-3, 2.5e-3, 3e-4, 2e-3, 2e-3]
    assert rates("condu-full-few-shot") == [5e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 5e-5, 1e-5, 1e-5]


def test_mtil_presets_are_the_official_runs(recipes):
    official = recipes["mtil"]
    for name, tasks, steps, shots, threshold in (
            ("mtil-order-1", MTIL_ORDER_I, 1000, None, 0.0655), ("mtil-order-2", MTIL_ORDER_II, 1000, None, 0.0655),
            ("fewshot-mtil-order-1", MTIL_ORDER_I, 500, 5, 0.06),
            ("fewshot-mtil-order-2", MTIL_ORDER_II, 500, 5, 0.06)):
        preset = PRESETS[name]
        assert isinstance(preset, MTILPreset) and list(preset.tasks) == tasks
        assert preset.steps_per_task == official["iterations_per_task"]["few_shot" if shots else "full_shot"] == steps
        assert (preset.shots, preset.ddas, preset.ddas_threshold) == (shots, True, threshold)
        assert (preset.batch_size, preset.label_smoothing) == (official["batch_size"], official["label_smoothing"])
        assert (preset.warmup_steps, preset.eval_batch_size) == (100, 128)
    assert PRESETS["mini"].from_assets and not PRESETS["mini"].ddas


def test_cifar100_class_incremental_presets_are_the_official_recipe(recipes):
    official = recipes["cil_cifar100"]
    for name, increment, steps in (("cifar100-cil-10", 10, 10), ("cifar100-cil-20", 5, 20),
                                   ("cifar100-cil-50", 2, 50)):
        preset = PRESETS[name]
        assert isinstance(preset, ClassIncrementalPreset)
        assert list(preset.class_order) == official["class_order"]
        assert preset.initial_increment == preset.increment == increment in official["initial_increment_and_increment"]
        assert preset.num_steps == steps
        assert (preset.epochs_per_step, preset.batch_size, preset.learning_rate) == (
            official["epochs_per_step"], official["batch_size_by_increment"][str(increment)], official["lr"])
        assert preset.batch_size == (64 if increment == 2 else 128)  # cifar100_2-2-MoE-Adapters.yaml line 20
        assert preset.noisy_gating_eval  # cil/clip/model.py lines 15, 288, 422
        assert (preset.label_smoothing, preset.warmup_steps, preset.weight_decay, preset.template) == (
            official["label_smoothing"], official["warmup_iterations"], official["weight_decay"],
            official["prompt_template"])


def test_random_split_is_torch_random_split_with_seed_42():
    # torch.randperm(10, generator=torch.Generator().manual_seed(42)), computed once by hand
    assert random_split_indices(10, 0.8, 42) == ([2, 6, 1, 8, 4, 5, 0, 9], [3, 7])
    for n in (7, 8677):
        lengths = [int(0.8 * n), n - int(0.8 * n)]
        train, test = random_split(range(n), lengths, generator=torch.Generator().manual_seed(42))
        assert random_split_indices(n, 0.8, 42) == (list(train.indices), list(test.indices))


@pytest.mark.parametrize("name,whole", [("caltech101", 8677), ("eurosat", 27000), ("sun397", 108754)])
def test_random_split_datasets_reproduce_the_official_sizes(name, whole, mtil):
    spec = MTIL_DATASETS[name]
    assert "80 % train / 20 % test, generator seed 42" in mtil[OFFICIAL_NAMES[name]]["split"]
    assert spec.split_rule == (0.8, 42) and spec.train_split is None
    train, test = random_split_indices(whole, *spec.split_rule)
    assert (len(train), len(test)) == spec.official_sizes
    assert sorted(train + test) == list(range(whole))


def test_official_splits_are_the_ones_the_official_code_loads(mtil):
    for name, official in OFFICIAL_NAMES.items():
        spec, facts = MTIL_DATASETS[name], mtil[official]
        if "train" in facts:
            assert (spec.train_split, spec.test_split) == (
                facts["train"].get("split", "train"), facts["test"].get("split", "test")), name
            assert spec.split_rule is None
    assert MTIL_DATASETS["oxford_pet"].train_split == "trainval" and MTIL_DATASETS["flowers"].train_split == "train"


# MoE-Adapters4CL cil/configs/class/tinyimagenet_100-{20,10,5}.yaml (lines 18-22, 26, 31-32; 5, 10 and 20 steps after
# the 100 base classes) and cil/class_orders/tinyimagenet.yaml; epochs and warmup as for CIFAR-100 (the same main code).
TINYIMAGENET_OFFICIAL = {"prompt_template": "a bad photo of a {}.", "batch_size": 64, "initial_increment": 100,
                         "weight_decay": 0.0, "lr": 1e-3, "ls": 0.0, "epochs": 1, "warmup": 30}
TINYIMAGENET_CLASS_ORDER = [
    131, 181, 22, 172, 144, 92, 97, 187, 58, 93, 6, 70, 106, 68, 153, 168, 179, 199, 29, 46, 9, 142, 134, 88, 193, 110,
    26, 32, 117, 112, 17, 39, 166, 13, 94, 138, 109, 147, 51, 101, 59, 188, 116, 5, 170, 99, 100, 167, 180, 146, 65, 1,
    104, 43, 38, 184, 123, 171, 137, 162, 71, 44, 95, 174, 12, 7, 54, 152, 21, 47, 28, 176, 34, 2, 132, 118, 42, 189,
    150, 14, 165, 41, 192, 45, 82, 128, 63, 57, 197, 160, 53, 75, 108, 135, 121, 159, 183, 67, 169, 50, 87, 69, 89, 196,
    115, 19, 148, 96, 86, 11, 8, 60, 33, 173, 78, 4, 119, 105, 182, 127, 177, 30, 186, 40, 49, 178, 76, 157, 161, 73,
    164, 151, 31, 74, 191, 27, 125, 198, 81, 20, 155, 114, 139, 36, 61, 56, 145, 48, 16, 83, 62, 85, 126, 0, 102, 23, 3,
    140, 15, 195, 133, 113, 190, 141, 52, 163, 156, 80, 111, 90, 175, 143, 120, 84, 18, 25, 79, 37, 154, 136, 64, 158,
    24, 185, 72, 35, 129, 55, 149, 91, 122, 77, 103, 124, 130, 66, 10, 107, 194, 98]


@pytest.mark.parametrize("name, increment", [("tinyimagenet-cil-5", 20), ("tinyimagenet-cil-10", 10),
                                             ("tinyimagenet-cil-20", 5)])
def test_tinyimagenet_class_incremental_presets_print_the_official_recipe(name, increment, capsys, tmp_path):
    from test_experiment import load_example

    official = TINYIMAGENET_OFFICIAL
    load_example().main(["--preset", name, "--print_recipe", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    recipe = json.loads(out[out.index("{"):])
    assert {key: recipe[key] for key in ("per_device_train_batch_size", "learning_rate", "weight_decay",
                                         "label_smoothing_factor", "num_train_epochs", "max_steps", "warmup_steps")} == {
        "per_device_train_batch_size": official["batch_size"], "learning_rate": official["lr"],
        "weight_decay": official["weight_decay"], "label_smoothing_factor": official["ls"],
        "num_train_epochs": official["epochs"], "max_steps": -1, "warmup_steps": official["warmup"]}
    assert (recipe["num_experts"], recipe["top_k"], recipe["noisy_gating_eval"], recipe["ddas"]) == (2, 2, True, False)
    preset = PRESETS[name]
    assert (preset.dataset, list(preset.class_order), preset.initial_increment, preset.increment, preset.template) == (
        "tinyimagenet", TINYIMAGENET_CLASS_ORDER, official["initial_increment"], increment, official["prompt_template"])
    assert preset.num_steps == 1 + 100 // increment  # the base task, then 5, 10 or 20 steps


@pytest.mark.parametrize("initial_increment, increment, match", [
    (200, 10, r"`initial_increment` must be an integer in \[1, 100\], got 200"),
    (0, 10, r"`initial_increment` must be an integer in \[1, 100\], got 0"),
    (10, -5, r"`increment` must be an integer >= 1, got -5"),
    (10, 0, r"`increment` must be an integer >= 1, got 0"),
    (10, 7, r"`increment`=7 does not divide the 90 classes"),
])
def test_a_class_incremental_preset_of_uneven_or_no_steps_is_refused_when_made(initial_increment, increment, match):
    with pytest.raises(ValueError, match=match):
        ClassIncrementalPreset("custom", initial_increment, increment)
