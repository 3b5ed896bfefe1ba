"""The torchvision folder layouts users of the official code already have under its `--data-location`, read as
torchvision reads them (same files, classes and row order) without importing torchvision."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from datasets import Dataset, Features, Image, Value

from .labels import map_label_names, relabel
from .summary import SourceError, SourceSummary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


@dataclass
class LocalIndex:
    """Where each image of a dataset is and its label, without opening any image."""

    folder: Path
    names: list[str]  # the dataset's own class names; labels index them
    roles: dict[str, tuple[list, list[int]]] = field(default_factory=dict)  # role -> (image paths or rows, labels)
    arrays: Optional[Callable[[str], np.ndarray]] = None  # role -> all images, for the binary formats


class _Reader:
    def __init__(self, spec, data_dir: Path):
        self.spec, self.data_dir = spec, data_dir

    def need(self, path: Path) -> Path:
        if not path.exists():
            raise SourceError(f"{self.spec.name}: {path} is missing. The torchvision layout is "
                              f"{self.data_dir}/{self.spec.local_layout}. Fix: put the dataset there (torchvision's "
                              "download=True writes it so), or drop data_dir to use its Hub copy.")
        return path

    def lines(self, path: Path) -> list[str]:
        return self.need(path).read_text(encoding="utf-8").splitlines()

    def loadmat(self, path: Path):
        try:
            from scipy.io import loadmat
        except ImportError:
            raise SourceError(f"{self.spec.name}: reading {path.name} needs scipy. Fix: pip install scipy") from None
        return loadmat(self.need(path), squeeze_me=True)

    def splits(self) -> list[tuple[str, str]]:
        return [("train", self.spec.train_split), ("test", self.spec.test_split)]


def _aircraft(read: _Reader, root: Path) -> LocalIndex:
    base = root / "fgvc-aircraft-2013b" / "data"
    index = LocalIndex(base, [line.strip() for line in read.lines(base / "variants.txt")])
    position = {name: label for label, name in enumerate(index.names)}
    for role, split in read.splits():
        pairs = [line.strip().split(" ", 1) for line in read.lines(base / f"images_variant_{split}.txt")]
        index.roles[role] = ([base / "images" / f"{image}.jpg" for image, _ in pairs],
                             [position[name] for _, name in pairs])
    return index


def _caltech101(read: _Reader, root: Path) -> LocalIndex:
    base = read.need(root / "caltech101" / "101_ObjectCategories")
    names = sorted(name for name in os.listdir(base) if name != "BACKGROUND_Google")
    paths, labels = [], []
    for label, name in enumerate(names):  # torchvision: image_0001.jpg ... image_<number of files>.jpg per class
        count = len(os.listdir(base / name))
        paths += [base / name / f"image_{number:04d}.jpg" for number in range(1, count + 1)]
        labels += [label] * count
    return LocalIndex(base, names, {"all": (paths, labels)})


def _cifar100(read: _Reader, root: Path) -> LocalIndex:
    base = root / "cifar-100-python"

    def unpickle(name: str) -> dict:
        with open(read.need(base / name), "rb") as handle:
            return pickle.load(handle, encoding="latin1")

    index = LocalIndex(base, list(unpickle("meta")["fine_label_names"]))
    for role in ("train", "test"):
        labels = list(unpickle(role)["fine_labels"])
        index.roles[role] = (list(range(len(labels))), labels)
    index.arrays = lambda role: unpickle(role)["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return index


def _dtd(read: _Reader, root: Path) -> LocalIndex:
    base = root / "dtd" / "dtd"
    entries = {role: [line.strip().split("/") for line in read.lines(base / "labels" / f"{split}1.txt")]
               for role, split in read.splits()}  # partition 1, torchvision's default
    index = LocalIndex(base, sorted({name for rows in entries.values() for name, _ in rows}))
    position = {name: label for label, name in enumerate(index.names)}
    for role, rows in entries.items():
        index.roles[role] = ([base / "images" / name / file for name, file in rows], [position[n] for n, _ in rows])
    return index


def _eurosat(read: _Reader, root: Path) -> LocalIndex:
    base = read.need(root / "eurosat" / "2750")
    names = sorted(entry.name for entry in os.scandir(base) if entry.is_dir())
    paths, labels = [], []
    for label, name in enumerate(names):  # ImageFolder: sorted walk, sorted file names
        for folder, _, files in sorted(os.walk(base / name, followlinks=True)):
            chosen = [file for file in sorted(files) if file.lower().endswith(IMAGE_EXTENSIONS)]
            paths += [Path(folder) / file for file in chosen]
            labels += [label] * len(chosen)
    return LocalIndex(base, names, {"all": (paths, labels)})


def _flowers(read: _Reader, root: Path) -> LocalIndex:
    base = root / "flowers-102"
    set_ids = read.loadmat(base / "setid.mat")
    image_labels = dict(enumerate(read.loadmat(base / "imagelabels.mat")["labels"].tolist(), 1))  # 1-based ids
    index = LocalIndex(base, [str(number) for number in range(1, 103)])
    for role, split in read.splits():
        ids = np.atleast_1d(set_ids[{"train": "trnid", "val": "valid", "test": "tstid"}[split]]).tolist()
        index.roles[role] = ([base / "jpg" / f"image_{i:05d}.jpg" for i in ids], [image_labels[i] - 1 for i in ids])
    return index


def _food(read: _Reader, root: Path) -> LocalIndex:
    base = root / "food-101"
    metadata = {role: json.loads(read.need(base / "meta" / f"{split}.json").read_text(encoding="utf-8"))
                for role, split in read.splits()}
    index = LocalIndex(base, sorted(metadata["train"]))
    position = {name: label for label, name in enumerate(index.names)}
    for role, classes in metadata.items():
        rows = [(relative, name) for name, relatives in classes.items() for relative in relatives]
        index.roles[role] = ([base / "images" / f"{relative}.jpg" for relative, _ in rows],
                             [position[name] for _, name in rows])
    return index


def _idx(read: _Reader, path: Path) -> np.ndarray:
    """An MNIST idx file (optionally gzipped): big-endian header of its dimensions, then uint8 values."""
    path = path if path.exists() else read.need(path.with_name(path.name + ".gz"))
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist(read: _Reader, root: Path) -> LocalIndex:
    base = root / "MNIST" / "raw"
    prefixes = {"train": "train", "test": "t10k"}
    index = LocalIndex(base, list(read.spec.torchvision_classes))
    for role, prefix in prefixes.items():
        labels = _idx(read, base / f"{prefix}-labels-idx1-ubyte").tolist()
        index.roles[role] = (list(range(len(labels))), labels)
    index.arrays = lambda role: _idx(read, base / f"{prefixes[role]}-images-idx3-ubyte")
    return index


def _oxford_pet(read: _Reader, root: Path) -> LocalIndex:
    base = root / "oxford-iiit-pet"
    entries = {role: [line.strip().split()[:2] for line in read.lines(base / "annotations" / f"{split}.txt")]
               for role, split in read.splits()}
    names = {int(label) - 1: " ".join(part.title() for part in image.rsplit("_", 1)[0].split("_"))
             for rows in entries.values() for image, label in rows}  # torchvision's classes, by label id
    index = LocalIndex(base, [names[label] for label in sorted(names)])
    for role, rows in entries.items():
        index.roles[role] = ([base / "images" / f"{image}.jpg" for image, _ in rows], [int(l) - 1 for _, l in rows])
    return index


def _stanford_cars(read: _Reader, root: Path) -> LocalIndex:
    base = root / "stanford_cars"
    index = LocalIndex(base, [str(name) for name in read.loadmat(base / "devkit" / "cars_meta.mat")["class_names"]])
    files = {"train": (base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
             "test": (base / "cars_test_annos_withlabels.mat", base / "cars_test")}
    for role, (annotation_file, images) in files.items():
        rows = np.atleast_1d(read.loadmat(annotation_file)["annotations"])
        index.roles[role] = ([images / str(row["fname"]) for row in rows], [int(row["class"]) - 1 for row in rows])
    return index


def _sun397(read: _Reader, root: Path) -> LocalIndex:
    base = root / "SUN397"
    names = [line[3:].strip() for line in read.lines(base / "ClassName.txt")]
    position = {name: label for label, name in enumerate(names)}
    # torchvision lists rglob's (file-system) order; sorted paths make the split the same on every machine.
    paths = sorted(base.rglob("sun_*.jpg"))
    labels = ["/".join(path.relative_to(base).parts[1:-1]) for path in paths]
    unknown = sorted(set(labels) - set(position))
    if unknown:
        raise SourceError(f"sun397: folders {unknown[:3]} are not in {base / 'ClassName.txt'}. Fix: use the "
                          "original SUN397 archive.")
    return LocalIndex(base, names, {"all": (paths, [position[label] for label in labels])})


def _tinyimagenet(read: _Reader, root: Path) -> LocalIndex:
    base = root / "tinyimagenet" / "tiny-imagenet-200"  # continuum's TinyImageNet200 under <dataset_root>/tinyimagenet
    index = LocalIndex(base, [line.strip() for line in read.lines(base / "wnids.txt")])  # labels in this order
    rows = [(base / "train" / wnid / "images" / line.split("\t")[0], label) for label, wnid in enumerate(index.names)
            for line in read.lines(base / "train" / wnid / f"{wnid}_boxes.txt")]
    index.roles["train"] = ([path for path, _ in rows], [label for _, label in rows])
    position = {wnid: label for label, wnid in enumerate(index.names)}
    rows = [line.split("\t")[:2] for line in read.lines(base / "val" / "val_annotations.txt")]
    index.roles["test"] = ([base / "val" / "images" / file for file, _ in rows], [position[w] for _, w in rows])
    return index


READERS: dict[str, Callable[[_Reader, Path], LocalIndex]] = {
    "aircraft": _aircraft, "caltech101": _caltech101, "cifar100": _cifar100, "dtd": _dtd, "eurosat": _eurosat,
    "flowers": _flowers, "food": _food, "mnist": _mnist, "oxford_pet": _oxford_pet, "stanford_cars": _stanford_cars,
    "sun397": _sun397, "tinyimagenet": _tinyimagenet}


def local_index(spec, data_dir: Union[str, os.PathLike]) -> LocalIndex:
    """The dataset's images and labels under `data_dir`, in torchvision's order."""
    root = Path(data_dir)
    if not root.is_dir():
        raise SourceError(f"{spec.name}: the data folder {root} does not exist. Fix: pass the folder holding the "
                          "torchvision datasets (the official code's --data-location).")
    return READERS[spec.name](_Reader(spec, root), root)


def local_summary(spec, data_dir: Union[str, os.PathLike]) -> SourceSummary:
    """Sizes per role and the label mapping of the torchvision folders, without opening an image."""
    index = local_index(spec, data_dir)
    label_map = map_label_names(spec.name, str(index.folder), index.names, spec.aliases(), spec.excluded_names)
    return SourceSummary(str(index.folder), {role: len(refs) for role, (refs, _) in index.roles.items()}, label_map)


def local_datasets(spec, data_dir: Union[str, os.PathLike]) -> dict[str, Dataset]:
    """The torchvision folders as `image` + official `label` datasets per role; images stay files until read."""
    index = local_index(spec, data_dir)
    label_map = map_label_names(spec.name, str(index.folder), index.names, spec.aliases(), spec.excluded_names)
    features = Features({"image": Image(), "label": Value("int64")})
    prepared = {}
    for role, (refs, labels) in index.roles.items():
        images = list(index.arrays(role)[refs]) if index.arrays else [str(path) for path in refs]
        data = Dataset.from_dict({"image": images, "label": labels}, features=features)
        prepared[role] = relabel(data, label_map, spec.classnames)
    return prepared
