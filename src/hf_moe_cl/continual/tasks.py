"""A continual-learning task: datasets plus the class names and prompt templates that make CLIP a classifier."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import Dataset, load_from_disk


@dataclass
class ContinualTask:
    """One task of a sequence. Datasets have an `image` column (PIL, any mode) and an integer `label` column.

    `learning_rate` fixes this task's rate for every method; `official_learning_rates` holds the rate each
    method's official recipe uses for it (keyed by `ContinualMethod.recipe`, filled by the presets).
    """

    name: str
    train_dataset: Optional[Dataset]
    eval_dataset: Dataset
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    learning_rate: Optional[float] = None
    official_learning_rates: dict[str, float] = field(default_factory=dict)

    def prompts(self, template: str) -> list[str]:
        return [template.format(name) for name in self.classnames]

    def validate(self, needs_training: bool = True) -> None:
        """Fail before any training starts, naming the task and what to fix."""
        if not self.classnames:
            raise ValueError(f"Task {self.name!r} has no class names: pass `classnames` (one per label).")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"Task {self.name!r}: every prompt template must contain '{{}}', got {self.templates!r}.")
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
            labels = dataset["label"]
            low, high = min(labels), max(labels)
            if low < 0 or high >= len(self.classnames):
                raise ValueError(
                    f"Task {self.name!r}: {split} labels range from {low} to {high} but there are "
                    f"{len(self.classnames)} class names; every label must index `classnames`."
                )

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
