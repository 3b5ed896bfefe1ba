"""Fitting an adapter's DDAS selector during a continual run: the reference autoencoder once, then one autoencoder
per task after it trained, with the schedule `DDASArguments.ddas_training` names (see `autoencoder.py`).

- 'sampled': the features of at most `ddas_max_images` images of each set (a seeded draw, evaluation transform)
  are computed once; the selector fits them in memory (`DistributionSelector.fit_reference` / `fit_task`).
- 'official': every autoencoder trains on the whole set through the training augmentation, in the official order
  (few-shot: a draw of its own, each image augmented once, then fixed); with a calibrated threshold, a seeded
  tenth of the task's images is held out of its training to calibrate it.

What the run provides (`context`): `seed`, `device`, `num_workers`, `progress(iterable, description)`,
`loader(dataset)` (evaluation batches, this process's share), `collator(augmented)` and `gather(tensor)`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from ..data.splits import few_shot_subset, seeded_rows
from .autoencoder import fit_autoencoder
from .selector import DistributionSelector
from .settings import HELDOUT_FRACTION, DDASArguments, heldout_count


def check_calibration(options: DDASArguments, tasks) -> None:
    """Refuse, before the first task trains, a sequence with a task DDAS cannot learn: one without training images
    (an evaluation-only task) or too small to hold out the tenth of its images that calibrates its threshold."""
    for task in tasks:
        if task.train_dataset is None:
            raise ValueError(f"Task {task.name!r} has no training split (an evaluation-only task), but DDAS learns "
                             "every task's autoencoder from its training images, also with max_steps=0. Give it its "
                             "training split (ContinualTask.from_disk's train_split), or run without DDAS.")
    if options.ddas_threshold is not None:
        return
    for task in tasks:
        images = len(task.train_dataset)
        if options.ddas_training == "sampled":
            images = min(images, options.ddas_max_images)
        if heldout_count(images) < 1:
            least = math.ceil(1 / HELDOUT_FRACTION)
            raise ValueError(f"Task {task.name!r} gives DDAS {images} training images: too few to calibrate its "
                             f"threshold on a held-out {HELDOUT_FRACTION:.0%}. Give it at least {least} (and "
                             f"ddas_max_images >= {least}), or set a fixed ddas_threshold.")


class _Mapped:
    """A re-iterable loader whose batches go through `function`."""

    def __init__(self, loader, function):
        self.loader, self.function = loader, function

    def __iter__(self):
        return (self.function(batch) for batch in self.loader)


def reference_images(options: DDASArguments, reference: Dataset, seed: int) -> Dataset:
    """The images the reference autoencoder trains on (`ddas_reference_shots` per class, else all), with a `label`
    column; refused (before any task trains, `MoEAdapters.begin_sequence`) when fewer than two remain."""
    images = reference
    if options.ddas_reference_shots is not None:
        if "label" not in images.column_names:
            raise ValueError("ddas_reference_shots needs a `label` column in the reference images to take that many "
                             "per class; give a labelled reference (e.g. zh-plus/tiny-imagenet).")
        images = few_shot_subset(images, options.ddas_reference_shots, seed)
    used = len(images) if options.ddas_training == "official" else min(len(images), options.ddas_max_images)
    if used < 2:
        raise ValueError(f"The DDAS reference autoencoder would train on {used} image(s) (of {len(reference)} "
                         f"reference images, ddas_reference_shots={options.ddas_reference_shots}, ddas_max_images="
                         f"{options.ddas_max_images}); it needs at least two. Give more reference images, more "
                         "ddas_reference_shots or a larger ddas_max_images.")
    return images if "label" in images.column_names else images.add_column("label", [0] * len(images))


class SelectorFitting:
    """Fits `selector` with `options` in a run's `context`; `features(pixels)` are the selector's features of a
    pixel batch (the model must be in evaluation mode)."""

    def __init__(self, selector: DistributionSelector, options: DDASArguments, context,
                 features: Callable[[torch.Tensor], torch.Tensor]):
        self.selector, self.options, self.context, self.features = selector, options, context, features

    @torch.no_grad()
    def features_of(self, dataset: Dataset, label: str) -> torch.Tensor:
        """Selector features of a seeded random sample of `ddas_max_images` images, gathered from every process."""
        context = self.context
        if len(dataset) > self.options.ddas_max_images:
            dataset = dataset.select(seeded_rows(len(dataset), self.options.ddas_max_images, context.seed))
        return torch.cat([context.gather(self.features(batch["pixel_values"].to(context.device)))
                          for batch in context.progress(context.loader(dataset), f"DDAS features: {label}")])

    def fit(self, route: int, task, reference: Dataset) -> None:
        """After task `route` trained: the reference autoencoder if the selector has none yet (on `reference`),
        then the task's."""
        selector, options, seed = self.selector, self.options, self.context.seed
        official = options.ddas_training == "official"
        if not selector.has_reference:
            images = reference_images(options, reference, seed)
            label = "DDAS reference autoencoder" if self.context.show_progress else None
            if official:
                if selector.config.standardize:  # the scale every autoencoder's inputs are standardised with
                    selector.set_standardization(self.features_of(images, "reference images"))
                self._fit_official(None, images, len(reference), options.ddas_reference_steps, label)
            else:
                selector.fit_reference(self.features_of(images, "reference images"),
                                       steps=options.ddas_reference_steps, lr=options.ddas_learning_rate,
                                       batch_size=options.ddas_batch_size, weight_decay=options.ddas_weight_decay,
                                       seed=seed, progress=label)
        label = f"DDAS autoencoder: {task.name}" if self.context.show_progress else None
        images, whole = task.train_dataset, task.full_train_dataset
        if whole is not None and options.ddas_task_draw == "own":  # as many per class, drawn apart from the model's
            images = few_shot_subset(whole, max(Counter(images["label"]).values()), seed + route + 1)
        if official:
            self._fit_official(route, images, len(images if whole is None else whole), options.ddas_task_steps, label)
        else:
            selector.fit_task(route, self.features_of(images, task.name), steps=options.ddas_task_steps,
                              lr=options.ddas_learning_rate, threshold=options.ddas_threshold,
                              batch_size=options.ddas_batch_size, weight_decay=options.ddas_weight_decay,
                              quantile=options.ddas_quantile, seed=seed, progress=label)
        if selector.config.include_untrained:  # the official single threshold also bounds tasks not learned yet
            for other in range(selector.num_tasks):
                if not selector.task_is_trained(other):
                    selector.thresholds[other] = options.ddas_threshold

    def _fit_official(self, route: Optional[int], dataset: Dataset, whole: int, steps: int,
                      progress: Optional[str]) -> None:
        """One autoencoder (the reference for `route=None`) trained by the official loop on `dataset` through the
        training augmentation; `whole` is the size of the full training set it was drawn from (epochs count its
        batches, as the official few-shot code does)."""
        options, selector, context = self.options, self.selector, self.context
        if len(dataset) == 0:
            raise ValueError("Cannot train a DDAS autoencoder on zero images: the dataset is empty.")
        seed = context.seed + (0 if route is None else route + 1)
        heldout = None
        if route is not None and options.ddas_threshold is None:
            held = heldout_count(len(dataset))
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
            heldout, dataset = dataset.select(sorted(order[:held])), dataset.select(sorted(order[held:]))
        loader = DataLoader(dataset, batch_size=options.ddas_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed), num_workers=context.num_workers,
                            collate_fn=context.collator(augmented=True))

        @torch.no_grad()
        def features(batch) -> torch.Tensor:
            return selector.normalise(self.features(batch["pixel_values"].to(context.device)))

        batches = _Mapped(loader, features)
        if options.ddas_augment_once:  # each image augmented once, then fixed (few_shot_AutoEncoder.py 170-189)
            fixed = torch.cat([features(batch) for batch in context.progress(loader, "DDAS features: augmented once")])
            batches = DataLoader(fixed, batch_size=options.ddas_batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed))
        config = selector.config
        autoencoder = fit_autoencoder(config.feature_dim, config.hidden_dim, config.sigmoid_output, batches, steps,
                                      options.ddas_learning_rate, options.ddas_weight_decay, seed, "official",
                                      batches_per_epoch=math.ceil(whole / options.ddas_batch_size),
                                      device=context.device, progress=progress)
        threshold = None if route is None else options.ddas_threshold
        if heldout is not None:
            threshold = selector.calibrated_threshold(autoencoder, self.features_of(heldout, "held out"),
                                                      options.ddas_quantile)
        selector.set_autoencoder(route, autoencoder, threshold)
