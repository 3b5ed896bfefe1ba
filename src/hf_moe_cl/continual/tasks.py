"""A continual-learning task: datasets plus the class names and prompt templates that make CLIP a classifier."""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from datasets import Image as ImageFeature
from tqdm.auto import tqdm

from ..classification import tokenize_prompts
from ..data.labels import label_key
from ..files import read_json_file
from ..options import check_label_space, is_finite_number, short_repr
from .preprocessing import to_rgb

logger = logging.getLogger("hf_moe_cl")
INTEGER_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def check_image_column(dataset: Dataset, where: str, decode: bool, progress: bool = False,
                       batch_size: int = 256, checked: Optional[set[str]] = None) -> None:
    """`dataset`'s `image` column is a `datasets.Image` feature and, with `decode`, every image decodes and converts
    to RGB (no NaN pixels, no 0x0 image); a ValueError names the first bad one and how many there are.

    `checked` holds the `datasets` fingerprints of datasets whose images all decoded: such a dataset is not decoded
    again, and one that passes is added (a dataset's fingerprint changes with its data, so a changed one is decoded)."""
    feature = dataset.features.get("image")
    if not isinstance(feature, ImageFeature):
        raise ValueError(
            f"{where}: the `image` column is a datasets {feature!r} feature, not datasets.Image; arrays of pixel "
            "values are not read as images (datasets' cast_column('image', datasets.Image()) reads 2-D uint8 arrays as "
            "32-bit). Convert them once: dataset.map(lambda row: {'image': PIL.Image.fromarray(np.asarray("
            "row['image'], dtype=np.uint8))}, features=datasets.Features({**dataset.features, 'image': "
            "datasets.Image()})) (0..255 values; scale 0..1 floats by 255 first).")
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not decode or (checked is not None and fingerprint in checked):
        return
    dataset = dataset.cast_column("image", ImageFeature(decode=False))
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(dataset), desc=f"checking images ({where})", disable=not progress, leave=False) as bar:
        for start, batch in enumerate(dataset.select_columns(["image"]).iter(batch_size=batch_size)):
            for offset, image in enumerate(batch["image"]):
                try:
                    to_rgb(image)  # decodes datasets' undecoded image; refuses NaN or infinite pixels and 0x0 images
                except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
                    bad.append((start * batch_size + offset, f"{type(error).__name__}: {error}"))
            bar.update(len(batch["image"]))
    if bad:
        index, error = bad[0]
        raise ValueError(f"{where}: {len(bad)} image(s) cannot be decoded, the first at index {index} ({error}). "
                         "Remove or replace them before training (e.g. dataset.select of the good indices).")
    if checked is not None and fingerprint is not None:
        checked.add(fingerprint)


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

    def validate(self, needs_training: bool = True, check_images: bool = False, progress: bool = False,
                 checked: Optional[set[str]] = None) -> None:
        """Fail before any training starts, naming the task and what to fix.

        Checks class names (present, unique strings), templates, the splits' columns (`full_train_dataset` too,
        when training), that labels are integers indexing `classnames`, learning rates, and with `check_images`
        that every image decodes (a split whose fingerprint is in `checked` is not decoded again: see
        `check_image_column`).
        """
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"A task needs a non-empty name (a string), got {self.name!r}: it names the task in the "
                             "matrices, the reports and its checkpoint folder.")
        check_label_space(self.classnames, self.templates, f"Task {self.name!r}")
        for what, text in [("name", self.name)] + [("class name", c) for c in self.classnames] + [
                ("template", t) for t in self.templates]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"Task {self.name!r}: the {what} {text!r} cannot be written as UTF-8 ({error.reason} at position "
                    f"{error.start}; e.g. a lone surrogate from os.fsdecode of a file name that is not UTF-8), so "
                    "its checkpoint's files could not be saved. Decode the bytes with their real encoding (e.g. "
                    "bytes.decode('latin-1')) or replace the character.") from None
        classes = self.train_classes
        if classes is not None and not (isinstance(classes, (list, tuple)) and classes and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(self.classnames) for c in classes)
                and len(set(classes)) == len(classes)):
            raise ValueError(f"Task {self.name!r}: `train_classes` must be a non-empty list of distinct class "
                             f"indices in 0..{len(self.classnames) - 1} (positions in `classnames`), got "
                             f"{short_repr(classes)}.")
        if not isinstance(self.official_learning_rates, dict):
            raise ValueError(f"Task {self.name!r}: `official_learning_rates` must map recipe names to learning rates "
                             "(a dict such as {'moe-adapters': 1e-3}), got "
                             f"{short_repr(self.official_learning_rates)}.")
        rates = ([("learning_rate", self.learning_rate)] if self.learning_rate is not None else []) + [
            (f"official_learning_rates[{key!r}]", rate) for key, rate in self.official_learning_rates.items()]
        for name, rate in rates:
            if not is_finite_number(rate) or rate <= 0:
                raise ValueError(f"Task {self.name!r}: {name} must be a finite positive number, got {rate!r}.")
        if needs_training and len(self.trained_classes) < 2:
            only = self.classnames[self.trained_classes[0]]
            raise ValueError(f"Task {self.name!r} trains over one class ({only!r}): the loss over one class is always "
                             "0, so training would change nothing. Give it at least two classes, or only evaluate it "
                             "(max_steps=0).")
        splits = [("eval", self.eval_dataset)]
        if needs_training:  # the whole split feeds ConDU's prototypes and DDAS's epochs: checked as the train split
            splits[:0] = [("train", self.train_dataset)] + (
                [] if self.full_train_dataset is None else [("full train", self.full_train_dataset)])
        for split, dataset in splits:
            if dataset is not None and not isinstance(dataset, Dataset):
                raise ValueError(f"Task {self.name!r}: the {split} dataset is a {type(dataset).__name__}, not a "
                                 "datasets.Dataset with `image` and `label` columns.")
            if dataset is None and split == "train":
                raise ValueError(f"Task {self.name!r} has no train dataset (an evaluation-only task), but the run "
                                 "trains every task in turn: give it a train split, or measure it apart (a max_steps=0 "
                                 "run, or ContinualTrainer.evaluate_task(task, route) after training).")
            if dataset is None or len(dataset) == 0:
                raise ValueError(f"Task {self.name!r} has an empty {split} dataset: give it at least one example.")
            missing = {"image", "label"} - set(dataset.column_names)
            if missing:
                raise ValueError(
                    f"Task {self.name!r}: the {split} dataset lacks column(s) {sorted(missing)}; it has "
                    f"{dataset.column_names}. Rename the columns to `image` and `label`.")
            self._check_labels(split, dataset)
            check_image_column(dataset, f"task {self.name!r}, {split} split", check_images, progress,
                               checked=checked)

    def _check_labels(self, split: str, dataset: Dataset) -> None:
        feature = dataset.features["label"]
        if isinstance(feature, ClassLabel):
            self._check_label_names(split, feature.names)
        elif (dtype := getattr(feature, "dtype", None)) not in INTEGER_DTYPES:
            raise ValueError(
                f"Task {self.name!r}: the {split} labels are of type {dtype or type(feature).__name__}; labels must be "
                "integers indexing `classnames` (map strings or floats to class indices first, e.g. with "
                "`dataset.class_encode_column('label')`).")
        labels = dataset["label"]
        missing = [i for i, label in enumerate(labels) if label is None]
        if missing:
            raise ValueError(f"Task {self.name!r}: {len(missing)} {split} example(s) have no label (None), the first "
                             f"at index {missing[0]}. Drop them (dataset.filter) or give them their class index.")
        low, high = min(labels), max(labels)
        if low < 0 or high >= len(self.classnames):
            raise ValueError(
                f"Task {self.name!r}: {split} labels range from {low} to {high} but there are "
                f"{len(self.classnames)} class names; every label must index `classnames`.")
        if split == "train" and self.train_classes is not None:
            outside = sorted(set(labels) - set(self.train_classes))
            if outside:
                raise ValueError(f"Task {self.name!r}: training labels {outside[:5]} are not in `train_classes`; the "
                                 "training loss only covers those classes.")

    def _check_label_names(self, split: str, names: list[str]) -> None:
        """A `ClassLabel` name that is one of the task's class names at another index would train and score its
        images with another class's prompt; names that match no class name (e.g. WordNet ids) are a renaming."""
        ours = [label_key(n) for n in self.classnames]
        for label, name in enumerate(names):
            key = label_key(name)
            if key in ours and (label >= len(ours) or ours[label] != key):
                here = (f"classnames[{label}] is {self.classnames[label]!r}" if label < len(ours) else
                        f"there are {len(ours)} class names")
                raise ValueError(
                    f"Task {self.name!r}: the {split} dataset's ClassLabel names the task's class names at other "
                    f"indices (label {label} is {name!r} there but {here}; {name!r} is "
                    f"classnames[{ours.index(key)}]), so images would be trained and scored with another class's "
                    "prompt. Pass classnames=dataset.features['label'].names, or map the labels to your order first "
                    "(dataset.align_labels_with_mapping).")

    @classmethod
    def from_disk(cls, path: str | os.PathLike, train_split: Optional[str] = "train", eval_split: str = "test",
                  learning_rate: Optional[float] = None) -> "ContinualTask":
        """Load a task saved as `datasets.save_to_disk` with a `task.json` (name, classnames, templates) beside it;
        `train_split=None` for an evaluation-only task (a named split the folder lacks is refused, not dropped)."""
        path = Path(path)
        meta_file = path / "task.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing: a task folder needs task.json with its class names.")
        meta = read_json_file(meta_file)
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_file} should hold a JSON object with the task's name, classnames and templates.")
        name, templates = meta.get("name", path.name), meta.get("templates", ["a photo of a {}."])
        check_label_space(meta.get("classnames"), templates, f"{meta_file} (task {name!r})")
        try:
            splits = load_from_disk(str(path))
        except Exception as error:  # datasets raises what its reader meets (IndexError, ArrowInvalid, ...)
            raise ValueError(f"{path} cannot be read as datasets saved with `save_to_disk` ({type(error).__name__}: "
                             f"{error}); a split's files are damaged, truncated or missing. Save the task's splits "
                             "again (DatasetDict(...).save_to_disk) or restore the folder.") from error
        if not isinstance(splits, DatasetDict):
            raise ValueError(f"{path} holds one dataset, not a DatasetDict of splits; save the splits together "
                             "(DatasetDict({'train': ..., 'test': ...}).save_to_disk).")
        wanted = [("eval_split", eval_split)] + ([] if train_split is None else [("train_split", train_split)])
        for argument, split in wanted:
            if split not in splits:
                raise ValueError(f"{path} has no split {split!r} (`{argument}`); it has {sorted(splits)}: pass one of "
                                 "them (train_split=None loads an evaluation-only task).")
        return cls(name=name, train_dataset=None if train_split is None else splits[train_split],
                   eval_dataset=splits[eval_split], classnames=list(meta["classnames"]),
                   templates=list(templates), learning_rate=learning_rate)


def check_prompt_tokens(tokenizer, classnames, templates, owner: str) -> None:
    """Class names whose prompts are the same tokens (cut at the tokenizer's length, unknown characters dropped)
    under every template cannot be told apart: refused. The same under some templates only: a warning (those templates
    do not separate them, the average over all templates still does). `owner` starts the message."""
    same: dict[tuple[int, int], list[str]] = {}
    for template in templates:
        ids = tokenize_prompts(tokenizer, [template.format(c) for c in classnames])["input_ids"].tolist()
        first: dict[tuple, int] = {}
        for i, row in enumerate(ids):
            other = first.setdefault(tuple(row), i)
            if other != i:
                same.setdefault((other, i), []).append(template)
    for (a, b), alike in same.items():
        names = f"the classes {classnames[a]!r} and {classnames[b]!r}"
        cut = f"the tokenizer cuts prompts at {tokenizer.model_max_length} tokens and drops characters it does not know"
        if len(alike) == len(templates):
            raise ValueError(f"{owner}: {names} give the same tokens with every template ({cut}), so they cannot be "
                             "told apart. Shorten or rename the class names, or change the templates.")
        logger.warning("%s: %s give the same tokens with %d of %d templates (%s), e.g. %r.", owner, names,
                       len(alike), len(templates), cut, alike[0])


def check_tasks(tasks, train: bool, args, tokenizer, progress: bool = False, recipe: Optional[str] = None,
                checked: Optional[set[str]] = None) -> None:
    """A task sequence `ContinualTrainer` can run with `args`: a non-empty list of uniquely named tasks, each valid
    (`ContinualTask.validate`, its prompts told apart by `tokenizer`; `checked`: the fingerprints of the datasets
    whose images already decoded), with the training template and one learning rate per task where `args` asks for
    them; an official rate whose key is a misspelling of the method's `recipe` is refused (the task would train at
    `learning_rate`)."""
    if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, ContinualTask) for t in tasks):
        raise ValueError(f"train_tasks needs a non-empty list of ContinualTask (one per task, in training order), "
                         f"got {short_repr(tasks)}.")
    if len({task.name for task in tasks}) != len(tasks):
        raise ValueError("Task names must be unique: they name the checkpoint folders.")
    if args.task_learning_rates is not None and len(args.task_learning_rates) != len(tasks):
        raise ValueError(f"task_learning_rates has {len(args.task_learning_rates)} entries for {len(tasks)} tasks.")
    for task in tasks:
        task.validate(needs_training=train, check_images=args.check_images, progress=progress, checked=checked)
        if train and args.train_template >= len(task.templates):
            raise ValueError(f"train_template={args.train_template} but task {task.name!r} has "
                             f"{len(task.templates)} prompt template(s): give every task that many templates or "
                             "choose a lower train_template.")
        check_prompt_tokens(tokenizer, task.classnames, task.templates, f"Task {task.name!r}")
        rates = task.official_learning_rates
        if not train or not recipe or recipe in rates or task.learning_rate is not None \
                or args.task_learning_rates is not None:
            continue
        close = difflib.get_close_matches(recipe, list(rates), n=1, cutoff=0.8)
        if close:
            raise ValueError(f"Task {task.name!r}: official_learning_rates has {close[0]!r} but no rate for this "
                             f"method's recipe {recipe!r}, so the task would train at learning_rate. Name the key "
                             f"{recipe!r} (or give the task a learning_rate).")
