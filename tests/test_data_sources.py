"""Data sources on offline fixtures with each source's schema: Hub parquet copies (as local parquet folders in the Hub
layout) and torchvision folder trees with 4x4 images; label mapping by name, split rules, check_data, CIL steps."""

import dataclasses
import gzip
import json
import pickle
import random

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from hf_moe_cl.assets import assets_dir
from hf_moe_cl.data import LabelMappingError, SourceError, load_splits, local_datasets, map_label_names, summarize
from hf_moe_cl.experiments.data_check import DataCheckError, check_data
from hf_moe_cl.data.splits import random_split_indices
from hf_moe_cl.experiments.datasets import MTIL_DATASETS, HubSource
from hf_moe_cl.experiments.presets import PRESETS, mini_mtil_tasks, preset_tasks

SPEC = MTIL_DATASETS


def picture(value=0):
    return PILImage.new("RGB", (4, 4), (value, 0, 0))


def save_picture(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(value).save(path, format="PNG")  # PIL reads the content, whatever the suffix


def write_hub(root, splits, names, image_column="image", label_column="label", extra=None, config=None):
    """A parquet dataset in the Hub layout (data/<split>-00000-of-00001.parquet, or <config>/<split>-... with a card
    naming that config, as uoft-cs/cifar10 or ylecun/mnist): rows of (label, pixel value)."""
    features = {image_column: Image(), label_column: ClassLabel(names=names)}
    features.update({name: Value("string") for name in extra or {}})
    for split, rows in splits.items():
        columns = {image_column: [picture(value) for _, value in rows], label_column: [label for label, _ in rows]}
        columns.update({name: values[split] for name, values in (extra or {}).items()})
        Dataset.from_dict(columns, features=Features(features)).to_parquet(
            str(root / (config or "data") / f"{split}-00000-of-00001.parquet"))
    if config:
        (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n" + "".join(
            f"  - split: {split}\n    path: {config}/{split}-*\n" for split in splits) + "---\n")
    return str(root)


def red(dataset):
    return [np.asarray(image)[0, 0, 0].item() for image in dataset["image"]]


# ----- Hub copies --------------------------------------------------------------------------------------------------
def test_hub_copy_with_another_label_order_is_mapped_by_name(tmp_path):
    names = list(SPEC["food"].torchvision_classes)
    names[16], names[17] = names[17], names[16]  # ethz/food101: cheesecake (16) before cheese_plate (17)
    hub = HubSource(write_hub(tmp_path, {"train": [(16, 1), (17, 2), (0, 3)], "validation": [(17, 4)]}, names),
                    {"train": ("train",), "test": ("validation",)}, "image", "label", 101, "", "fixture")
    train, test = load_splits(SPEC["food"], hub=hub)
    official = SPEC["food"].classnames
    assert [official[label] for label in train["label"]] == ["cheesecake", "cheese plate", "apple pie"]
    assert red(train) == [1, 2, 3] and test["label"] == [16] and train.features["label"].names == list(official)
    check = check_data("mtil-order-1", hub_ids={"food": hub}, tasks=["food"])
    row = check.rows[0]
    assert row["labels"] == "by name, 2 moved"
    assert (row["train"], row["test"]) == ("3 (official 75,750)", "1 (official 25,250)")
    assert row["classes"] == "101/101" and row["first classes"] == "apple pie, baby back ribs, baklava"


def test_hub_whole_dataset_is_put_in_torchvision_order_before_the_80_20_split(tmp_path):
    classes = SPEC["eurosat"].torchvision_classes
    rows = []  # pixel value = the row's position in torchvision's order (classes, then sorted file names)
    for label, name in enumerate(classes):
        for position, number in enumerate((1, 10, 2)):  # AnnualCrop_1.jpg < AnnualCrop_10.jpg < AnnualCrop_2.jpg
            rows.append((label, 3 * label + position, f"{name}_{number}"))
    random.Random(0).shuffle(rows)
    parts = {"train": rows[:18], "validation": rows[18:24], "test": rows[24:]}
    root = write_hub(tmp_path, {split: [(label, value) for label, value, _ in part] for split, part in parts.items()},
                     list(classes), extra={"image_id": {split: [i for *_, i in part] for split, part in parts.items()}})
    hub = HubSource(root, {"all": ("train", "validation", "test")}, "image", "label", 10, "", "fixture",
                    order_column="image_id")
    train, test = load_splits(SPEC["eurosat"], hub=hub)
    expected_train, expected_test = random_split_indices(30, 0.8, 42)
    assert red(train) == expected_train and red(test) == expected_test
    assert train["label"] == [value // 3 for value in expected_train]


def test_hub_rows_of_a_class_the_official_code_drops_are_removed(tmp_path):
    names = ["BACKGROUND_Google"] + list(SPEC["caltech101"].torchvision_classes)  # as Donghyun99/Caltech-101
    rows = [(0, 0), (1, 1), (0, 2), (101, 3), (2, 4)]
    hub = HubSource(write_hub(tmp_path, {"train": rows}, names), {"all": ("train",)}, "image", "label", 102, "", "")
    train, test = load_splits(SPEC["caltech101"], hub=hub)
    assert sorted(red(train) + red(test)) == [1, 3, 4] and len(train) == int(0.8 * 3)
    assert sorted(list(train["label"]) + list(test["label"])) == [0, 1, 100]


def test_label_names_that_do_not_fit_fail_with_the_dataset_and_the_names():
    spec = SPEC["caltech101"]
    names = ["BACKGROUND_Google"] + list(spec.torchvision_classes)  # a copy keeping torchvision's background class
    label_map = map_label_names("caltech101", "copy", names, spec.aliases(), spec.excluded_names)
    assert label_map.indices[0] is None and label_map.indices[1:] == tuple(range(101))
    lower = [name.lower() for name in spec.torchvision_classes]  # flwrlabs/caltech101 lower-cases the folders
    assert map_label_names("caltech101", "copy", lower, spec.aliases()).indices == tuple(range(101))
    with pytest.raises(LabelMappingError, match=r"caltech101: 1 label name\(s\) of copy match no official class: "
                                                r"\['unicorn'\]"):
        map_label_names("caltech101", "copy", lower[:-1] + ["unicorn"], spec.aliases())
    with pytest.raises(LabelMappingError, match="copy has 100 classes, the official dataset 101; missing"):
        map_label_names("caltech101", "copy", lower[:-1], spec.aliases())


def test_check_data_names_each_bad_hub_copy_and_its_fix(tmp_path):
    flowers = HubSource(write_hub(tmp_path / "flowers", {"train": [(0, 0)]}, list(SPEC["flowers"].classnames)),
                        {"train": ("train",), "test": ("test",)}, "image", "label", 102, "", "fixture")
    short = list(SPEC["dtd"].classnames)[:-1]
    dtd = HubSource(write_hub(tmp_path / "dtd", {"train": [(0, 0)], "test": [(1, 0)]}, short),
                    {"train": ("train",), "test": ("test",)}, "image", "label", 46, "", "fixture")
    mnist = HubSource(write_hub(tmp_path / "mnist", {"train": [(0, 0)], "test": [(1, 0)]},
                                [str(digit) for digit in range(10)], image_column="picture"),
                      {"train": ("train",), "test": ("test",)}, "image", "label", 10, "", "fixture")
    with pytest.raises(DataCheckError) as raised:
        check_data("mtil-order-1", hub_ids={"flowers": flowers, "dtd": dtd, "mnist": mnist},
                   tasks=["flowers", "dtd", "mnist"])
    problems = raised.value.check.problems
    assert "flowers:" in problems[0] and "has no split(s) ['test']; it has ['train']" in problems[0]
    assert "dtd:" in problems[1] and "has 46 classes, the official dataset 47; missing ['zigzagged']" in problems[1]
    assert "mnist:" in problems[2] and "has no column(s) ['image']" in problems[2] and "Fix" in problems[2]
    assert "| flowers | FAILED |" in str(raised.value)


# ----- torchvision folders -----------------------------------------------------------------------------------------
def build_aircraft(root):
    base, names = root / "fgvc-aircraft-2013b" / "data", SPEC["aircraft"].torchvision_classes
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(names) + "\n")
    (base / "images_variant_train.txt").write_text(f"0000001 {names[30]}\n0000002 {names[75]}\n")
    (base / "images_variant_test.txt").write_text(f"0000003 {names[0]}\n")
    for image in ("0000001", "0000002", "0000003"):
        save_picture(base / "images" / f"{image}.jpg")
    return {"train": [30, 75], "test": [0]}


def build_caltech101(root, counts=None):
    base = root / "caltech101" / "101_ObjectCategories"
    for label, name in enumerate(("BACKGROUND_Google",) + SPEC["caltech101"].torchvision_classes):
        for number in range(1, (counts[label - 1] if counts and label else 1) + 1):
            save_picture(base / name / f"image_{number:04d}.jpg", value=label)
    return {"all": [label for label in range(101) for _ in range(counts[label] if counts else 1)]}


def build_cifar100(root, per_class=(1, 1)):
    base, names = root / "cifar-100-python", list(SPEC["cifar100"].torchvision_classes)
    base.mkdir(parents=True)
    expected = {}
    for split, count in zip(("train", "test"), per_class):
        labels = [label for label in range(100) for _ in range(count)] if count else [5, 99]
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        (base / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels}))
        expected[split] = labels
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    return expected


def build_dtd(root):
    base, names = root / "dtd" / "dtd", SPEC["dtd"].torchvision_classes
    for split in ("train", "test"):
        rows = [f"{name}/{name}_{split}.jpg" for name in reversed(names)]
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            save_picture(base / "images" / row)
    return {"train": list(range(46, -1, -1)), "test": list(range(46, -1, -1))}


def build_eurosat(root):
    base = root / "eurosat" / "2750"
    for name in SPEC["eurosat"].torchvision_classes:
        for number in (10, 1):
            save_picture(base / name / f"{name}_{number}.jpg")
        (base / name / "notes.txt").write_text("not an image")
    return {"all": [label for label in range(10) for _ in range(2)]}


def build_food(root):
    base, names = root / "food-101", list(SPEC["food"].torchvision_classes)
    hub_order = names[:16] + [names[17], names[16]] + names[18:]
    meta = {name: [f"{name}/1"] for name in hub_order}
    (base / "meta").mkdir(parents=True)
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    for name in names:
        save_picture(base / "images" / name / "1.jpg")
    order = [names.index(name) for name in hub_order]
    return {"train": order, "test": order}


def build_mnist(root):
    base = root / "MNIST" / "raw"
    base.mkdir(parents=True)
    for prefix, labels, packed in (("train", [3, 1], False), ("t10k", [7], True)):
        images = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (len(labels), 28, 28)) + \
            bytes(len(labels) * 784)
        values = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + bytes(labels)
        for kind, data in (("images-idx3", images), ("labels-idx1", values)):
            path = base / f"{prefix}-{kind}-ubyte"
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(data)) if packed else path.write_bytes(data)
    return {"train": [3, 1], "test": [7]}


def build_oxford_pet(root):
    base, names = root / "oxford-iiit-pet", SPEC["oxford_pet"].torchvision_classes
    (base / "annotations").mkdir(parents=True)
    for split, numbers in (("trainval", (1, 2)), ("test", (3,))):
        rows = [(f"{name.replace(' ', '_')}_{number}", label) for label, name in enumerate(names) for number in numbers]
        lines = "".join(f"{image} {label + 1} 1 1\n" for image, label in rows)
        (base / "annotations" / f"{split}.txt").write_text(lines)
        for image, _ in rows:
            save_picture(base / "images" / f"{image}.jpg")
    return {"train": [label for label in range(37) for _ in range(2)], "test": list(range(37))}


def build_sun397(root):
    base, names = root / "SUN397", SPEC["sun397"].torchvision_classes
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"/{name[0]}/{name}\n" for name in names))
    for name in ("badlands", "apartment_building/outdoor", "abbey"):
        save_picture(base / name[0] / name / "sun_aaaa.jpg")
    return {"all": [0, 8, 24]}


BUILDERS = {"aircraft": build_aircraft, "caltech101": build_caltech101, "cifar100": build_cifar100, "dtd": build_dtd,
            "eurosat": build_eurosat, "food": build_food, "mnist": build_mnist, "oxford_pet": build_oxford_pet,
            "sun397": build_sun397}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_torchvision_layouts_load_with_official_labels(name, tmp_path):
    expected = BUILDERS[name](tmp_path)
    roles = local_datasets(SPEC[name], tmp_path)
    assert {role: list(data["label"]) for role, data in roles.items()} == expected
    assert next(iter(roles.values()))[0]["image"].size[0] in (4, 28, 32)


def test_scipy_layouts_need_scipy_or_load(tmp_path):
    try:
        from scipy.io import savemat
    except ImportError:
        for name in ("flowers", "stanford_cars"):
            (tmp_path / {"flowers": "flowers-102", "stanford_cars": "stanford_cars"}[name]).mkdir()
            with pytest.raises(SourceError, match=f"{name}: reading .*needs scipy. Fix: pip install scipy"):
                local_datasets(SPEC[name], tmp_path)
        return
    base = tmp_path / "flowers-102"
    base.mkdir()
    savemat(base / "imagelabels.mat", {"labels": np.array([5, 1, 102])})  # 1-based class ids of images 1, 2, 3
    savemat(base / "setid.mat", {"trnid": np.array([1, 3]), "valid": np.array([2]), "tstid": np.array([2])})
    for image in (1, 2, 3):
        save_picture(base / "jpg" / f"image_{image:05d}.jpg")
    assert {role: list(data["label"]) for role, data in local_datasets(SPEC["flowers"], tmp_path).items()} == {
        "train": [4, 101], "test": [0]}
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat",
            {"class_names": np.array(SPEC["stanford_cars"].torchvision_classes, dtype=object)})
    annotations = lambda *rows: np.array(list(rows), dtype=[("fname", object), ("class", object)])  # noqa: E731
    savemat(base / "devkit" / "cars_train_annos.mat",
            {"annotations": annotations(("00001.jpg", 196), ("00002.jpg", 1))})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations(("00001.jpg", 23),)})
    for folder in ("cars_train", "cars_test"):
        save_picture(base / folder / "00001.jpg")
    roles = local_datasets(SPEC["stanford_cars"], tmp_path)
    assert {role: list(data["label"]) for role, data in roles.items()} == {"train": [195, 0], "test": [22]}


def test_local_random_split_picks_the_official_indices(tmp_path):
    counts = [1 + label % 3 for label in range(101)]
    build_caltech101(tmp_path, counts)
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    names = SPEC["caltech101"].torchvision_classes
    ordered = [str(base / names[label] / f"image_{number:04d}.jpg")
               for label in range(101) for number in range(1, counts[label] + 1)]
    train, test = load_splits(SPEC["caltech101"], data_dir=tmp_path)
    expected_train, expected_test = random_split_indices(len(ordered), 0.8, 42)
    paths = lambda data: [image["path"] for image in data.cast_column("image", Image(decode=False))["image"]]  # noqa
    assert paths(train) == [ordered[i] for i in expected_train] and paths(test) == [ordered[i] for i in expected_test]
    assert len(train) == int(0.8 * len(ordered))


def test_check_data_on_torchvision_folders(tmp_path):
    build_aircraft(tmp_path)
    build_sun397(tmp_path)
    check = check_data("mtil-order-1", data_dir=tmp_path, tasks=["aircraft", "sun397"])
    aircraft, sun = check.rows
    assert (aircraft["train"], aircraft["test"], aircraft["classes"]) == ("2 (official 3,334)", "1 (official 3,333)",
                                                                          "100/100")
    assert aircraft["split"] == "train / test" and aircraft["first classes"] == "707-320, 727-200, 737-200"
    assert sun["split"] == "80% / 20% of all 3, seed 42" and sun["classes"] == "397/397"
    assert "| aircraft |" in check.markdown() and check.ok
    with pytest.raises(DataCheckError) as raised:
        check_data("mtil-order-1", data_dir=tmp_path, tasks=["aircraft", "food"])
    assert raised.value.check.rows[0]["classes"] == "100/100"
    problem = raised.value.check.problems[0]
    assert problem.startswith("food: ") and "meta/train.json is missing" in problem
    assert "food-101/{meta/train.json,meta/test.json,images/}" in problem and "Fix" in problem
    with pytest.raises(ValueError, match="has no task"):
        check_data("mtil-order-1", tasks=["imagenet"])


# ----- a dataset's copies, tried in order ----------------------------------------------------------------------------
def test_a_dataset_is_read_from_its_next_copy_when_the_first_cannot_be(tmp_path, monkeypatch, caplog):
    import logging

    names = list(SPEC["aircraft"].torchvision_classes)
    splits = {"train": ("train",), "test": ("test",)}
    gone = write_hub(tmp_path / "gone", {"validation": [(0, 0)]}, names, label_column="variant")  # its data is gone
    second = write_hub(tmp_path / "second", {"train": [(1, 1), (2, 2)], "test": [(3, 3)]}, names, label_column="variant")
    copy = {path: HubSource(path, splits, "image", "variant", 100, "", "fixture") for path in (gone, second)}
    assert [source.repo_id for source in SPEC["aircraft"].hub_fallbacks] == ["Donghyun99/FGVC-Aircraft"]
    monkeypatch.setitem(SPEC, "aircraft", dataclasses.replace(SPEC["aircraft"], hub=copy[gone],
                                                             hub_fallbacks=(copy[second],)))
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        train, test = load_splits(SPEC["aircraft"])
    assert (red(train), train["label"], red(test)) == ([1, 2], [1, 2], [3])
    assert f"aircraft: read from {second}, the next copy, because: aircraft: {gone} has no split(s) ['train', " \
           "'test']; it has ['validation']" in caplog.text
    row = check_data("mtil-order-1", tasks=["aircraft"]).rows[0]  # --check_data names the copy it reads
    assert (row["source"], row["train"], row["classes"]) == (second, "2 (official 3,334)", "100/100")
    monkeypatch.setitem(SPEC, "aircraft", dataclasses.replace(SPEC["aircraft"], hub_fallbacks=(copy[gone],)))
    with pytest.raises(SourceError, match=r"aircraft: none of its 2 Hub copies can be read, tried in order:\n  "
                                          r"aircraft: .*gone has no split"):
        load_splits(SPEC["aircraft"])


# ----- Hub copies offline: read from the caches an earlier load filled -----------------------------------------------
@pytest.fixture
def go_offline(monkeypatch, tmp_path):
    """Switches datasets and huggingface_hub to offline mode (as HF_HUB_OFFLINE=1 at import does); the Hub cache is
    tmp_path/hub."""
    import datasets
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def go():
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return go


def test_a_hub_copy_loaded_once_is_read_offline_from_the_datasets_cache(tmp_path, monkeypatch, go_offline):
    """The first load is of a local parquet folder named like a Hub id without namespace: datasets prepares it where
    its offline `cache` builder looks for that id (<cache_dir>/tiny_mnist/default/0.0.0/<hash>)."""
    write_hub(tmp_path / "tiny_mnist", {"train": [(3, 1), (0, 2), (9, 3)], "test": [(5, 4), (1, 5)]},
              [str(digit) for digit in range(10)])
    cache = str(tmp_path / "cache")
    hub = HubSource("tiny_mnist", {"train": ("train",), "test": ("test",)}, "image", "label", 10, "", "fixture")
    monkeypatch.chdir(tmp_path)  # online: "tiny_mnist" is the local folder, prepared into the datasets cache
    online = load_splits(SPEC["mnist"], hub=hub, cache_dir=cache)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no such folder here: "tiny_mnist" is a Hub id again
    go_offline()
    assert summarize(SPEC["mnist"], hub=hub, cache_dir=cache).sizes == {"train": 3, "test": 2}
    train, test = load_splits(SPEC["mnist"], hub=hub, cache_dir=cache)
    assert (red(train), train["label"], red(test), test["label"]) == ([1, 2, 3], [3, 0, 9], [4, 5], [5, 1])
    assert (red(train), red(test)) == (red(online[0]), red(online[1]))
    wrong = HubSource("tiny_mnist", {"train": ("train",), "test": ("validation",)}, "image", "label", 10, "", "")
    with pytest.raises(SourceError, match=r"has no split\(s\) \['validation'\]; it has \['test', 'train'\]"):
        summarize(SPEC["mnist"], hub=wrong, cache_dir=cache)
    ref = tmp_path / "hub" / "datasets--tiny_mnist" / "refs" / "main"  # the Hub cache records another commit of main
    ref.parent.mkdir(parents=True)
    ref.write_text("0" * 40)
    with pytest.raises(SourceError, match=f"its copy in the datasets cache is commit [0-9a-f]+, not {'0' * 40}"):
        summarize(SPEC["mnist"], hub=hub, cache_dir=cache)


def test_a_hub_copy_downloaded_with_hf_download_is_read_offline(tmp_path, monkeypatch, go_offline):
    """`hf download org/tiny --repo-type dataset` leaves the repo's files in the Hub cache (snapshots/<commit>,
    refs/main): offline, that folder is read as a local parquet copy, with its card's configs."""
    repo = tmp_path / "hub" / "datasets--org--tiny"
    write_hub(repo / "snapshots" / ("a" * 40), {"train": [(3, 1)], "test": [(5, 2), (1, 3)]},
              [str(digit) for digit in range(10)], config="mnist")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.chdir(tmp_path)
    go_offline()
    hub = HubSource("org/tiny", {"train": ("train",), "test": ("test",)}, "image", "label", 10, "", "fixture")
    train, test = load_splits(SPEC["mnist"], hub=hub, cache_dir=str(tmp_path / "cache"))
    assert (red(train), train["label"], red(test), test["label"]) == ([1], [3], [2, 3], [5, 1])
    missing = dataclasses.replace(hub, repo_id="org/not-cached", revision="refs/pr/1")
    with pytest.raises(SourceError) as raised:
        load_splits(SPEC["mnist"], hub=missing, cache_dir=str(tmp_path / "cache"))
    assert "HF_HUB_OFFLINE is set" in str(raised.value) and "in neither the datasets cache" in str(raised.value)
    assert "`hf download org/not-cached --repo-type dataset --revision refs/pr/1`" in str(raised.value)


# ----- tasks of presets --------------------------------------------------------------------------------------------
def test_preset_tasks_carry_the_official_learning_rates(tmp_path):
    build_dtd(tmp_path)
    full, = preset_tasks("mtil-order-1", data_dir=tmp_path, tasks=["dtd"])
    few, = preset_tasks("fewshot-mtil-order-1", data_dir=tmp_path, tasks=["dtd"])
    assert full.official_learning_rates["moe-adapters"] == 1e-3 and few.official_learning_rates["moe-adapters"] == 5e-3
    assert few.official_learning_rates["condu-lora"] == 2e-3 and few.official_learning_rates["condu-full"] == 1e-5
    assert full.learning_rate is None and full.templates[0] == "a photo of a {} texture." and len(full.templates) == 8
    assert len(full.train_dataset) == len(few.train_dataset) == 47  # one image per class: 5-shot keeps all
    full.validate()


def test_cifar100_class_incremental_steps_follow_the_official_order(tmp_path):
    build_cifar100(tmp_path, per_class=(2, 1))
    order = PRESETS["cifar100-cil-10"].class_order
    names = SPEC["cifar100"].torchvision_classes
    steps = preset_tasks("cifar100-cil-10", data_dir=tmp_path)
    assert len(steps) == 10 and steps[0].classnames == [names[c] for c in order[:10]]
    assert "aquarium_fish" in steps[-1].classnames  # the official CIL code keeps torchvision's underscores
    for index, step in enumerate(steps):
        assert set(step.train_dataset["label"]) == set(range(10 * index, 10 * index + 10))
        assert len(step.train_dataset) == 20 and len(step.eval_dataset) == 10 * (index + 1)
        assert step.templates == ["a bad photo of a {}."]
    steps = preset_tasks("cifar100-cil-50", data_dir=tmp_path)
    assert len(steps) == 50 and [len(step.classnames) for step in steps[:3]] == [2, 4, 6]
    steps[-1].validate()


CLOTHES = ["Blazer", "Blouse", "Dress", "Hat", "Hoodie", "Longsleeve", "Outwear", "Pants", "Polo", "Shirt", "Shoes",
           "Shorts", "Skirt", "T-Shirt", "Top", "Undershirt"]  # samokosik/clothes' card


def mini_hub_copies(root):
    """The six Hub copies `mini-hub` reads, each with its repository's layout, columns and label names."""
    digits = [str(digit) for digit in range(10)]
    fashion = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    caltech = [name.lower() for name in SPEC["caltech101"].torchvision_classes]  # flwrlabs/caltech101
    return {
        "caltech101": write_hub(root / "caltech101", {"train": [(label, label) for label in range(101)]}, caltech),
        "cifar10": write_hub(root / "cifar10", {"train": [(9, 1), (0, 2)], "test": [(3, 3)]}, cifar10,
                             image_column="img", config="plain_text"),
        "clothing": write_hub(root / "clothes", {"train": [(0, 1), (2, 2), (13, 3), (15, 4)], "test": [(5, 5)]},
                              CLOTHES),
        "dtd": write_hub(root / "dtd", {"train": [(0, 1), (46, 2)], "validation": [(9, 3)], "test": [(1, 4), (10, 5)]},
                         list(SPEC["dtd"].classnames)),
        "fashion_mnist": write_hub(root / "fashion", {"train": [(0, 1), (9, 2)], "test": [(3, 3)]}, fashion,
                                   config="fashion_mnist"),
        "mnist": write_hub(root / "mnist", {"train": [(7, 1), (1, 2)], "test": [(0, 3)]}, digits, config="mnist"),
    }


def test_mini_hub_builds_the_six_mini_tasks_from_hub_copies(tmp_path, monkeypatch):
    from hf_moe_cl.experiments import mini_hub

    monkeypatch.setattr(mini_hub, "MINI_TRAIN_IMAGES", 5)  # the cap (2,000 in the preset), a seeded draw
    copies = mini_hub_copies(tmp_path)
    tasks = {task.name: task for task in preset_tasks("mini-hub", hub_ids=copies)}
    assert list(tasks) == ["caltech101", "cifar10", "clothing", "dtd", "fashion_mnist", "mnist"]
    for task in tasks.values():
        task.validate()
        assert task.classnames == list(mini_hub.MINI_HUB_DATASETS[task.name].classnames)
    caltech = tasks["caltech101"]  # the assets' names; 80 / 21 of 101 images (seed 42), then 5 of the 80 kept
    assert caltech.classnames[:2] == ["face", "face easy"] and caltech.classnames[19] == "side of a car"
    assert len(caltech.train_dataset) == 5 and len(caltech.eval_dataset) == 21
    assert red(caltech.train_dataset) == caltech.train_dataset["label"]  # pixel value = label: mapped by name
    clothing = tasks["clothing"]  # Blazer and Undershirt are not in clothing-dataset-small: dropped
    assert (clothing.train_dataset["label"], red(clothing.train_dataset)) == ([0, 9], [2, 3])
    assert clothing.classnames[2] == "long sleeve shirt" and clothing.eval_dataset["label"] == [2]
    assert clothing.templates == ["a photo of a {}, a type of clothing."]
    dtd = tasks["dtd"]  # DTD's first 10 classes; train = train + validation
    assert (dtd.train_dataset["label"], red(dtd.train_dataset), dtd.eval_dataset["label"]) == ([0, 9], [1, 3], [1])
    assert (tasks["fashion_mnist"].train_dataset["label"], tasks["fashion_mnist"].classnames[0]) == ([0, 9], "t-shirt")
    assert (tasks["cifar10"].train_dataset["label"], red(tasks["cifar10"].eval_dataset)) == ([9, 0], [3])
    assert tasks["mnist"].templates == ['a photo of the number: "{}".'] and tasks["mnist"].eval_dataset["label"] == [0]
    rows = {row["dataset"]: row for row in check_data("mini-hub", hub_ids=copies).rows}
    assert (rows["caltech101"]["source"], rows["caltech101"]["train"]) == (copies["caltech101"], "80")
    assert (rows["dtd"]["split"], rows["dtd"]["classes"], rows["dtd"]["labels"]) == \
        ("train+validation / test", "10/10", "by name, 37 dropped")


def test_mini_tasks_accept_a_string_path():
    tasks = mini_mtil_tasks(str(assets_dir()), ["mnist"])
    assert tasks[0].name == "mnist" and len(tasks[0].classnames) == 10


def test_a_mini_task_folder_whose_task_json_names_another_task_is_refused(tmp_path):
    """The run would train and report DTD's images as cifar10 (task.json's name), not the task asked for."""
    from datasets import DatasetDict

    folder = tmp_path / "mini-mtil" / "dtd"
    data = Dataset.from_dict({"image": [picture(), picture(1)], "label": [0, 1]},
                             features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))
    DatasetDict({"train": data, "test": data}).save_to_disk(str(folder))
    (folder / "task.json").write_text(json.dumps({"name": "cifar10", "classnames": ["a", "b"]}))
    for load in (lambda: mini_mtil_tasks(tmp_path, ["dtd"]), lambda: check_data("mini", assets=tmp_path, tasks=["dtd"])):
        with pytest.raises(ValueError, match=r"task.json names the task 'cifar10', not 'dtd': the folder holds another "
                                             r"task's data or its task.json was edited"):
            load()


# ----- what else a run downloads -----------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty caches and no network: every host refuses at once; counts the requests; the Hub's own calls fail."""
    import urllib.error

    import datasets
    import torch
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hf_constants

    from hf_moe_cl.experiments import data_check as check_module

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    requests = []

    def refuse(request, timeout):
        requests.append((request.full_url, request.get_method(), timeout))
        raise urllib.error.URLError("Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("an unreachable host was asked again")

    monkeypatch.setattr(check_module.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(HfApi, "model_info", never)
    monkeypatch.setattr(HfApi, "dataset_info", never)
    monkeypatch.setattr("hf_moe_cl.data.hub.load_dataset_builder", never)
    return requests


def test_check_data_offline_asks_each_host_once_and_names_every_missing_item(no_network, monkeypatch):
    from huggingface_hub import constants as hf_constants

    from hf_moe_cl.tuners.moe_lora.features import ALEXNET_URL

    with pytest.raises(DataCheckError) as raised:
        check_data("mtil-order-1", tasks=["dtd", "mnist"], model="openai/clip-vit-base-patch16",
                   ddas_reference="zh-plus/tiny-imagenet", alexnet_weights=ALEXNET_URL)
    # one HEAD per host, short timeout, no retry: four Hub items ask the Hub once
    assert no_network == [("https://huggingface.co", "HEAD", 5.0), ("https://download.pytorch.org", "HEAD", 5.0)]
    problems = raised.value.check.problems
    assert len(problems) == 5 and all("\n" not in problem and "Fix:" in problem for problem in problems)
    assert problems[0].startswith("dtd: the Hub copy ") and "HF_HUB_OFFLINE=1" in problems[0]
    assert problems[1].startswith("mnist: the Hub copy ") and "--data_dir" in problems[1]
    assert problems[2].startswith("CLIP weights (openai/clip-vit-base-patch16): not in the Hugging Face cache and "
                                  "https://huggingface.co is unreachable")
    assert "`hf download openai/clip-vit-base-patch16`" in problems[2] and "--model_name_or_path" in problems[2]
    assert "`hf download zh-plus/tiny-imagenet --repo-type dataset`" in problems[3]
    assert problems[4].startswith(f"AlexNet weights ({ALEXNET_URL}): not in torch's hub cache")
    assert "curl -L -o" in problems[4] and "--ddas_alexnet_weights" in problems[4]
    statuses = {row["item"]: row["status"] for row in raised.value.check.downloads}
    assert set(statuses.values()) == {"MISSING"} and len(statuses) == 3
    text = str(raised.value)
    assert "| CLIP weights | openai/clip-vit-base-patch16 | MISSING |" in text and "| dtd | FAILED |" in text

    no_network.clear()  # HF_HUB_OFFLINE: the Hub is not even asked; datasets reads only its cache
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def offline_builder(*args, **kwargs):
        raise ConnectionError("offline mode and not in the cache")

    monkeypatch.setattr("hf_moe_cl.data.hub.load_dataset_builder", offline_builder)
    check = check_data("mtil-order-1", tasks=["dtd"], model="openai/clip-vit-base-patch16", raise_on_error=False)
    assert no_network == [] and len(check.problems) == 2
    assert "cannot read the Hub dataset" in check.problems[0] and "HF_HUB_OFFLINE is set" in check.problems[1]


def test_check_data_passes_local_and_cached_items_without_network(no_network, tmp_path):
    import torch
    from huggingface_hub import constants as hf_constants

    from hf_moe_cl.tuners.moe_lora.features import ALEXNET_URL

    assets = assets_dir()
    weights = tmp_path / "alexnet.pth"
    torch.save({}, weights)
    check = check_data("mini", tasks=["mnist"], assets=assets, model=str(assets / "proxy-clip"),
                       ddas_reference=str(assets / "reference" / "tinyimagenet-ref"), alexnet_weights=str(weights))
    assert check.ok and no_network == []
    assert [row["status"] for row in check.downloads] == ["local folder", "local saved dataset", "local file"]
    # a cached Hub model and dataset, and cached AlexNet weights
    snapshot = tmp_path / "hub" / "models--org--clip" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"0")
    (tmp_path / "hub" / "models--org--clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--clip" / "refs" / "main").write_text("abc")
    dataset = tmp_path / "hub" / "datasets--org--ref" / "snapshots" / "abc" / "data"
    dataset.mkdir(parents=True)
    (dataset / "train-00000-of-00001.parquet").write_bytes(b"0")
    alexnet = tmp_path / "torch" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    alexnet.parent.mkdir(parents=True)
    alexnet.write_bytes(b"0")
    assert hf_constants.HF_HUB_CACHE == str(tmp_path / "hub")
    check = check_data("mini", tasks=["mnist"], assets=assets, model="org/clip", ddas_reference="org/ref",
                       alexnet_weights=ALEXNET_URL)
    assert check.ok and no_network == []
    assert [row["status"] for row in check.downloads] == ["in the Hugging Face cache"] * 2 + ["in torch's hub cache"]
    with pytest.raises(DataCheckError, match=r"AlexNet weights \(.*missing.pth\): no such file. Fix:"):
        check_data("mini", tasks=["mnist"], assets=assets, alexnet_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(DataCheckError, match=r"DDAS reference images \(/no/such/ref\): no such folder, and not a "
                                             r"Hub id\. Fix: give --ddas_reference an existing folder"):
        check_data("mini", tasks=["mnist"], assets=assets, ddas_reference="/no/such/ref")
    splits = assets / "mini-mtil" / "dtd"
    with pytest.raises(DataCheckError, match=r"the folder holds splits \(test, train\)\. Fix: give --ddas_reference "
                                             r"the folder of one split, e\.g\. .*dtd/test"):
        check_data("mini", tasks=["mnist"], assets=assets, ddas_reference=str(splits))


def test_tasks_write_no_cache_files_into_the_folder_their_data_is_read_from(tmp_path):
    """A dataset saved by the user (or the assets) is only read: cutting it into class-incremental steps after a
    selection keeps the rows in memory, where datasets would write a cache-*.arrow copy beside the files."""
    from datasets import load_from_disk

    from hf_moe_cl.experiments.presets import class_incremental_tasks

    names = [f"class {i}" for i in range(4)]
    Dataset.from_dict({"image": [picture(i) for i in range(8)], "label": [i % 4 for i in range(8)]},
                      features=Features({"image": Image(), "label": ClassLabel(names=names)})).save_to_disk(
        str(tmp_path / "data"))
    before = sorted(path.name for path in (tmp_path / "data").iterdir())
    whole = load_from_disk(str(tmp_path / "data"))
    train, test = whole.select(range(6)), whole.select(range(6, 8))  # picked rows: an indices mapping
    steps = class_incremental_tasks(train, test, names, class_order=[3, 2, 1, 0], initial_increment=2, increment=2,
                                    templates=["a photo of a {}."])
    assert [step.train_dataset["label"] for step in steps] == [[1, 0], [3, 2, 3, 2]]
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == before
