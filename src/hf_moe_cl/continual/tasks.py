"""A continual-learning task: datasets plus the class names and prompt templates that make CLIP a classifier."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import ClassLabel, Dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image
from tqdm.auto import tqdm

INTEGER_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def check_images_decode(dataset: Dataset, where: str, progress: bool = False, batch_size: int = 256) -> None:
    """Decode every image of `dataset`; a ValueError names the first undecodable one and how many there are."""
    if isinstance(dataset.features.get("image"), ImageFeature):
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    bad: list[tuple[int, str]] = []
    bar = tqdm(total=len(dataset), desc=f"checking images ({where})", disable=not progress, leave=False)
    for start, batch in enumerate(dataset.select_columns(["image"]).iter(batch_size=batch_size)):
        for offset, image in enumerate(batch["image"]):
            try:
                _open_image(image).load()
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
                bad.append((start * batch_size + offset, f"{type(error).__name__}: {error}"))
        bar.update(len(batch["image"]))
    bar.close()
    if bad:
        index, error = bad[0]
        raise ValueError(f"{where}: {len(bad)} image(s) cannot be decoded, the first at index {index} ({error}). "
                         "Remove or replace them before training (e.g. dataset.select of the good indices).")


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # datasets' undecoded image: {"bytes": ..., "path": ...}
        return Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    return Image.fromarray(image)


@dataclass
class ContinualTask:
    """One task of a sequence. Datasets have an `image` column (PIL, any mode) and an integer `label` column.

    `learning_rate` fixes this task's rate for every method; `official_learning_rates` holds the rate each
    method's official recipe uses for it (keyed by `ContinualMethod.recipe`, filled by the presets).
    `train_classes` restricts the training loss to some classes (evaluation always uses all `classnames`).
    `full_train_dataset` is the whole training split when `train_dataset` is a few-shot draw from it (the official
    code uses it for ConDU's prototypes and for the epochs of DDAS's learning-rate decay).
    """

    name: str
    train_dataset: Optional[Dataset]
    eval_dataset: Dataset
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    learning_rate: Optional[float] = None
    official_learning_rates: dict[str, float] = field(default_factory=dict)
    train_classes: Optional[list[int]] = None
    full_train_dataset: Optional[Dataset] = None  # the whole training split a few-shot train_dataset was drawn from

    def prompts(self, template: str) -> list[str]:
        """The training prompts: one per class the training loss runs over."""
        return [template.format(self.classnames[c]) for c in self.trained_classes]

    @property
    def trained_classes(self) -> list[int]:
        """Indices into `classnames` that training classifies among: `train_classes` (class-incremental: the step's
        own classes, as the official code's loss) or every class."""
        return list(range(len(self.classnames))) if self.train_classes is None else list(self.train_classes)

    def validate(self, needs_training: bool = True, check_images: bool = False, progress: bool = False) -> None:
        """Fail before any training starts, naming the task and what to fix.

        Checks class names (present, unique strings), templates, the splits' columns, that labels are integers
        indexing `classnames`, learning rates, and with `check_images` that every image decodes.
        """
        if not self.classnames:
            raise ValueError(f"Task {self.name!r} has no class names: pass `classnames` (one per label).")
        if not all(isinstance(name, str) and name.strip() for name in self.classnames):
            raise ValueError(f"Task {self.name!r} needs one non-empty class name (a string) per label, got "
                             f"{self.classnames!r}.")
        duplicates = sorted({name for name in self.classnames if self.classnames.count(name) > 1})
        if duplicates:
            raise ValueError(f"Task {self.name!r} has duplicate class names {duplicates}: two labels with the same "
                             "prompt cannot be told apart. Make every class name unique.")
        if not self.templates or any(not isinstance(t, str) or "{}" not in t for t in self.templates):
            raise ValueError(f"Task {self.name!r}: every prompt template must contain '{{}}', got {self.templates!r}.")
        rates = ([("learning_rate", self.learning_rate)] if self.learning_rate is not None else []) + [
            (f"official_learning_rates[{key!r}]", rate) for key, rate in self.official_learning_rates.items()]
        for name, rate in rates:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                raise ValueError(f"Task {self.name!r}: {name} must be a finite positive number, got {rate!r}.")
        splits = [("eval", self.eval_dataset)]
        if needs_training:
            splits.insert(0, ("train", self.train_dataset))
        for split, dataset in splits:
            if dataset is None or len(dataset) == 0:
                raise ValueError(f"Task {self.name!r} has an empty {split} dataset: give it at least one example.")
            missing = {"image", "label"} - set(dataset.column_names)
            if missing:
                raise ValueError(
                    f"Task {self.name!r}: the {split} dataset lacks column(s) {sorted(missing)}; it has "
                    f"{dataset.column_names}. Rename the columns to `image` and `label`."
                )
            self._check_labels(split, dataset)
            if check_images:
                check_images_decode(dataset, f"task {self.name!r}, {split} split", progress)

    def _check_labels(self, split: str, dataset: Dataset) -> None:
        feature = dataset.features["label"]
        dtype = getattr(feature, "dtype", None)
        if not isinstance(feature, ClassLabel) and dtype not in INTEGER_DTYPES:
            raise ValueError(
                f"Task {self.name!r}: the {split} labels are of type {dtype or type(feature).__name__}; labels must be "
                "integers indexing `classnames` (map strings or floats to class indices first, e.g. with "
                "`dataset.class_encode_column('label')`)."
            )
        labels = dataset["label"]
        low, high = min(labels), max(labels)
        if low < 0 or high >= len(self.classnames):
            raise ValueError(
                f"Task {self.name!r}: {split} labels range from {low} to {high} but there are "
                f"{len(self.classnames)} class names; every label must index `classnames`."
            )
        if split == "train" and self.train_classes is not None:
            outside = sorted(set(labels) - set(self.train_classes))
            if outside:
                raise ValueError(f"Task {self.name!r}: training labels {outside[:5]} are not in `train_classes`; the "
                                 "training loss only covers those classes.")

    @classmethod
    def from_disk(cls, path: str | os.PathLike, train_split: str = "train", eval_split: str = "test",
                  learning_rate: Optional[float] = None) -> "ContinualTask":
        """Load a task saved as `datasets.save_to_disk` with a `task.json` (name, classnames, templates) beside it."""
        path = Path(path)
        meta_file = path / "task.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing: a task folder needs task.json with its class names.")
        meta = json.loads(meta_file.read_text())
        splits = load_from_disk(str(path))
        return cls(
            name=meta.get("name", path.name),
            train_dataset=splits[train_split] if train_split in splits else None,
            eval_dataset=splits[eval_split],
            classnames=list(meta.get("classnames") or []),
            templates=list(meta.get("templates") or ["a photo of a {}."]),
            learning_rate=learning_rate,
        )
