"""`TaskContext`: what a continual method gets from the task loop at `begin_sequence`, `begin_task` and `end_task`
(the trainer makes one for the run; a method never changes the trainer through it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .preprocessing import ImageClassificationCollator, training_augmentation


@dataclass(frozen=True)
class TaskContext:
    """The run's device, seed and tokenizer, and its ways to read images: `loader` (evaluation batches of this
    process's share, `gather` joins what every process computed on its share), `collator` (with or without the
    training augmentation) and named progress bars."""

    device: torch.device
    seed: int
    trains: bool  # the run trains its tasks (max_steps != 0), or only evaluates
    tokenizer: Any
    image_processor: Any
    augmentation: Optional[str]  # ContinualTrainingArguments.train_augmentation
    eval_batch_size: int
    num_workers: int
    show_progress: bool
    check_images: bool  # ContinualTrainingArguments.check_images: decode every image before training
    prepare: Callable[[DataLoader], DataLoader]  # shards a loader over the processes (accelerate)
    gather: Callable[[Any], Any]  # gathers a tensor (or a tuple of them) of every process's share

    def progress(self, iterable: Iterable, description: str):
        """A named progress bar over `iterable` (none unless `show_progress`)."""
        return tqdm(iterable, desc=description, leave=False, disable=not self.show_progress)

    def collator(self, augmented: bool = False) -> ImageClassificationCollator:
        """Batches of `image` + `label` as CLIP pixel values: as evaluated, or through the training augmentation."""
        augment = training_augmentation(self.image_processor, self.augmentation) if augmented else None
        return ImageClassificationCollator(self.image_processor, augment)

    def loader(self, dataset, augmented: bool = False) -> DataLoader:
        """`dataset` in order, in evaluation batches, this process's share of it."""
        return self.prepare(DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=self.collator(augmented),
                                       num_workers=self.num_workers))
