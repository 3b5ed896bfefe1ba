"""DDAS for MoE-Adapters: fitting the selector after each task and picking routes without a task id.

`DDASSelection` is a part of `MoEAdapters` (its `moe`, `model`, `ddas` and `ddas_reference`); the selector itself
lives in the adapter (`hf_moe_cl.tuners.moe_lora.selector`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from ...classification import Routes
from ...data.splits import few_shot_subset
from ...options import check_flags, check_option
from ...tuners.moe_lora.features import ALEXNET_FEATURES, ALEXNET_URL, AlexNetFeatures, prefix_features, vision_prefix
from ...tuners.moe_lora.selector import HELDOUT_FRACTION, SelectorConfig, heldout_count
from ..preprocessing import ImageClassificationCollator, training_augmentation
from .ddas_training import new_autoencoder, train_autoencoder


@dataclass
class DDASArguments:
    """DDAS: the selector that picks a task router per image, trained after every task."""

    ddas: bool = field(
        default=False,
        metadata={"help": "Train a DDAS selector: a reference autoencoder once, one per task after it."},
    )
    ddas_feature_extractor: str = field(
        default="clip",
        metadata={"help": "DDAS features: 'clip' (the untouched CLIP; no download) or 'alexnet' (the official "
                  "extractor: ImageNet AlexNet conv5, sigmoid, used with a fixed threshold such as 0.0655)."},
    )
    ddas_feature_layer: Optional[int] = field(
        default=None,
        metadata={"help": "CLIP features for DDAS: None = the untouched image embedding; k = tokens after k blocks."},
    )
    ddas_alexnet_weights: Optional[str] = field(
        default=ALEXNET_URL,
        metadata={"help": "AlexNet weights for ddas_feature_extractor='alexnet': URL or path (None: random weights, "
                  "for timings and tests only)."},
    )
    ddas_hidden_dim: int = field(default=100, metadata={"help": "Hidden width of every DDAS autoencoder."})
    ddas_training: str = field(
        default="sampled",
        metadata={"help": "'official': the official loop (ddas_training.py): the whole training set through the "
                  "training augmentation, steps + 1 iterations, Adam with the official step decay (with a calibrated "
                  "threshold, a tenth of each task's images is held out to calibrate it). 'sampled': features of at "
                  "most ddas_max_images un-augmented images, computed once, batches drawn with replacement (fast)."},
    )
    ddas_task_steps: int = field(default=300, metadata={"help": "Training steps of each task autoencoder (official: "
                                                                "--iterations 300, run as 301)."})
    ddas_reference_steps: int = field(default=1000, metadata={"help": "Training steps of the reference one "
                                                                      "(official: 1000, run as 1001)."})
    ddas_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoders "
                                                                      "(official: 0.01, few-shot 0.003)."})
    ddas_weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (official: 1e-4)."})
    ddas_batch_size: int = field(default=64, metadata={"help": "Autoencoder batch size (official: 64)."})
    ddas_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Fixed zero-shot threshold (> 0); None calibrates one per task on held-out data."},
    )
    ddas_quantile: float = field(
        default=0.95, metadata={"help": "Calibrated threshold: this quantile of held-out in-task errors."}
    )
    ddas_max_images: int = field(
        default=2000, metadata={"help": "'sampled' training: images per task used to fit its autoencoder (a seeded "
                                "random sample)."}
    )
    ddas_include_untrained: bool = field(
        default=False,
        metadata={"help": "Let the autoencoders of tasks not learned yet (randomly initialised) take part in the "
                  "argmin, with the fixed threshold, as the official code (evaluation.py lines 59-71); False "
                  "leaves them out."},
    )
    ddas_reference_shots: Optional[int] = field(
        default=None, metadata={"help": "Train the reference on this many images per class (official few-shot: 5)."}
    )
    ddas_augment_once: bool = field(
        default=False,
        metadata={"help": "'official' training: augment each image once and train on those fixed images (the "
                  "official few-shot chooser, few_shot_AutoEncoder.py lines 170-189)."},
    )

    def __post_init__(self):
        check_flags(self, ("ddas", "ddas_include_untrained", "ddas_augment_once"))
        check_option("ddas_feature_extractor", self.ddas_feature_extractor, str, choices=("clip", "alexnet"))
        check_option("ddas_feature_layer", self.ddas_feature_layer, int, low=1, optional=True)
        if self.ddas_feature_extractor == "alexnet" and self.ddas_feature_layer is not None:
            raise ValueError("ddas_feature_layer selects CLIP blocks; it cannot be used with the AlexNet extractor.")
        check_option("ddas_alexnet_weights", self.ddas_alexnet_weights, str, optional=True)
        for name in ("ddas_hidden_dim", "ddas_task_steps", "ddas_reference_steps", "ddas_max_images",
                     "ddas_batch_size"):
            check_option(name, getattr(self, name), int, low=1)
        check_option("ddas_reference_shots", self.ddas_reference_shots, int, low=1, optional=True)
        check_option("ddas_learning_rate", self.ddas_learning_rate, float, low=0.0, low_open=True)
        check_option("ddas_weight_decay", self.ddas_weight_decay, float, low=0.0)
        check_option("ddas_quantile", self.ddas_quantile, float, low=0.0, high=1.0, low_open=True)
        # 0 would send every image to zero-shot (an autoencoder's error is never below it)
        check_option("ddas_threshold", self.ddas_threshold, float, low=0.0, low_open=True, optional=True)
        check_option("ddas_training", self.ddas_training, str, choices=("sampled", "official"))
        if self.ddas_include_untrained and self.ddas_threshold is None:
            raise ValueError("ddas_include_untrained needs a fixed ddas_threshold: a task not learned yet has no "
                             "calibrated one.")
        if self.ddas_augment_once and self.ddas_training != "official":
            raise ValueError("ddas_augment_once is part of the official training: set ddas_training='official'.")


class DDASSelection:
    """Selector fitting and route selection of MoE-Adapters."""

    # ----- DDAS ----------------------------------------------------------------------------------------------------
    def selector_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """DDAS features of `pixels` (untouched CLIP or AlexNet), and the untouched CLIP's embeddings when they were
        the features."""
        config = self.moe.selector.config
        if config.feature_extractor == "alexnet":
            if self._alexnet is None:
                self._alexnet = AlexNetFeatures(self.ddas.ddas_alexnet_weights).to(pixels.device)
            return self._alexnet(pixels), None
        return self.moe.clip_selector_features(pixels)

    @torch.no_grad()
    def _features_of(self, trainer, dataset: Dataset, label: str) -> torch.Tensor:
        """Selector features of a seeded random sample of `ddas_max_images` images, gathered from every process."""
        if len(dataset) > self.ddas.ddas_max_images:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(trainer.args.seed))
            dataset = dataset.select(sorted(order[: self.ddas.ddas_max_images].tolist()))
        self.model.eval()
        features = []
        for batch in trainer.progress(trainer.get_eval_dataloader(dataset), f"DDAS features: {label}"):
            pixels = batch["pixel_values"].to(trainer.args.device)
            features.append(trainer.accelerator.gather_for_metrics(self.selector_features(pixels)[0]))
        return torch.cat(features)

    def check_feature_layer(self) -> None:
        """Refuse a `ddas_feature_layer` beyond the model's vision blocks (the prefix would silently be all of them)."""
        layer, depth = self.ddas.ddas_feature_layer, self.model.config.vision_config.num_hidden_layers
        if layer is not None and layer > depth:
            raise ValueError(f"ddas_feature_layer={layer} is beyond this model's vision tower, which has {depth} "
                             f"blocks: give 1 to {depth} (the tokens after that many blocks), or None for the image "
                             "embedding.")

    def check_calibration(self, tasks) -> None:
        """Refuse, before the first task trains, a sequence with a task too small to hold out the tenth of its
        images that calibrates its threshold."""
        if self.ddas.ddas_threshold is not None:
            return
        for task in tasks:
            images = len(task.train_dataset)
            if self.ddas.ddas_training == "sampled":
                images = min(images, self.ddas.ddas_max_images)
            if heldout_count(images) < 1:
                least = math.ceil(1 / HELDOUT_FRACTION)
                raise ValueError(f"Task {task.name!r} gives DDAS {images} training images: too few to calibrate its "
                                 f"threshold on a held-out {HELDOUT_FRACTION:.0%}. Give it at least {least} (and "
                                 f"ddas_max_images >= {least}), or set a fixed ddas_threshold.")

    def _selector_settings(self) -> SelectorConfig:
        ddas = self.ddas
        if ddas.ddas_feature_extractor == "alexnet":  # the paper's autoencoders: sigmoid outputs on raw features
            return SelectorConfig(feature_dim=ALEXNET_FEATURES, hidden_dim=ddas.ddas_hidden_dim, sigmoid_output=True,
                                  standardize=False, feature_extractor="alexnet",
                                  include_untrained=ddas.ddas_include_untrained)
        width = (self.model.config.projection_dim if ddas.ddas_feature_layer is None
                 else 2 * self.model.config.vision_config.hidden_size)
        return SelectorConfig(feature_dim=width, hidden_dim=ddas.ddas_hidden_dim, feature_layer=ddas.ddas_feature_layer,
                              include_untrained=ddas.ddas_include_untrained)

    def _fit_selector(self, trainer, route: int, task) -> None:
        moe, ddas = self.moe, self.ddas
        show = trainer.is_world_process_zero() and not trainer.args.disable_tqdm
        official = ddas.ddas_training == "official"
        if moe.selector is None:
            moe.enable_selector(self._selector_settings())
        selector = moe.selector
        if not selector.has_reference:
            reference = self.ddas_reference
            if ddas.ddas_reference_shots is not None:
                if "label" not in reference.column_names:
                    raise ValueError("ddas_reference_shots needs a `label` column in the reference images to take "
                                     "that many per class; give a labelled reference (e.g. zh-plus/tiny-imagenet).")
                reference = few_shot_subset(reference, ddas.ddas_reference_shots, trainer.args.seed)
            if "label" not in reference.column_names:
                reference = reference.add_column("label", [0] * len(reference))
            if official:
                if selector.config.standardize:  # the scale every autoencoder's inputs are standardised with
                    selector.set_standardization(self._features_of(trainer, reference, "reference images"))
                self._fit_official(trainer, None, reference, len(self.ddas_reference), ddas.ddas_reference_steps,
                                   "DDAS reference autoencoder" if show else None)
            else:
                selector.fit_reference(self._features_of(trainer, reference, "reference images"),
                                       steps=ddas.ddas_reference_steps, lr=ddas.ddas_learning_rate,
                                       batch_size=ddas.ddas_batch_size, weight_decay=ddas.ddas_weight_decay,
                                       seed=trainer.args.seed,
                                       progress="DDAS reference autoencoder" if show else None)
        progress = f"DDAS autoencoder: {task.name}" if show else None
        if official:
            whole = task.full_train_dataset if task.full_train_dataset is not None else task.train_dataset
            self._fit_official(trainer, route, task.train_dataset, len(whole), ddas.ddas_task_steps, progress)
        else:
            selector.fit_task(route, self._features_of(trainer, task.train_dataset, task.name),
                              steps=ddas.ddas_task_steps, lr=ddas.ddas_learning_rate, threshold=ddas.ddas_threshold,
                              batch_size=ddas.ddas_batch_size, weight_decay=ddas.ddas_weight_decay,
                              quantile=ddas.ddas_quantile, seed=trainer.args.seed, progress=progress)
        if ddas.ddas_include_untrained:  # the official single threshold also bounds tasks not learned yet
            for other in range(selector.num_tasks):
                if not selector.task_is_trained(other):
                    selector.thresholds[other] = ddas.ddas_threshold

    def _fit_official(self, trainer, route: Optional[int], dataset: Dataset, whole: int, steps: int,
                      progress: Optional[str]) -> None:
        """One autoencoder (the reference for `route=None`) trained by the official loop on `dataset` through the
        training augmentation; `whole` is the size of the full training set it was drawn from (epochs count its
        batches, as the official few-shot code does). A task's calibrated threshold (no `ddas_threshold`) comes
        from a seeded held-out 10 % of `dataset`, which the loop then does not see."""
        ddas, selector = self.ddas, self.moe.selector
        if len(dataset) == 0:
            raise ValueError("Cannot train a DDAS autoencoder on zero images: the dataset is empty.")
        seed = trainer.args.seed + (0 if route is None else route + 1)
        heldout = None
        if route is not None and ddas.ddas_threshold is None:
            held = heldout_count(len(dataset))
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
            heldout, dataset = dataset.select(sorted(order[:held])), dataset.select(sorted(order[held:]))
        device = trainer.args.device
        processor = trainer.processing_class.image_processor
        loader = DataLoader(dataset, batch_size=ddas.ddas_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed),
                            num_workers=trainer.args.dataloader_num_workers,
                            collate_fn=ImageClassificationCollator(processor, training_augmentation(
                                processor, trainer.args.train_augmentation)))
        self.model.eval()

        @torch.no_grad()
        def features(batch) -> torch.Tensor:
            return selector.normalise(self.selector_features(batch["pixel_values"].to(device))[0])

        extract = features
        if ddas.ddas_augment_once:  # few-shot: each image augmented once, then fixed (few_shot_AutoEncoder.py 170-189)
            fixed = torch.cat([features(batch) for batch in trainer.progress(loader, "DDAS features: augmented once")])
            loader = DataLoader(fixed, batch_size=ddas.ddas_batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            extract = None  # the batches are the features
        config = selector.config
        autoencoder = new_autoencoder(config.feature_dim, config.hidden_dim, config.sigmoid_output, seed).to(device)
        train_autoencoder(autoencoder, loader, extract, steps, ddas.ddas_learning_rate, ddas.ddas_weight_decay,
                          math.ceil(whole / ddas.ddas_batch_size), progress)
        threshold = None if route is None else ddas.ddas_threshold
        if heldout is not None:
            threshold = selector.calibrated_threshold(autoencoder, self._features_of(trainer, heldout, "held out"),
                                                      ddas.ddas_quantile)
        selector.set_autoencoder(route, autoencoder, threshold)

    def _route_features(self, pixels, untouched=None):
        """DDAS features of `pixels`, and the untouched CLIP's embeddings for images sent to zero-shot: `untouched`
        when given; the features themselves when they are the final embedding; after the first k blocks, a function
        that finishes the untouched pass for those images only."""
        config = self.moe.selector.config
        if config.feature_extractor == "clip" and config.feature_layer is None and untouched is not None:
            return untouched, untouched
        if config.feature_extractor == "clip" and config.feature_layer is not None:
            with self.moe.routing(None):
                prefix = vision_prefix(self.model.vision_model, pixels, config.feature_layer)
            return prefix_features(prefix), untouched if untouched is not None else partial(self._finish_untouched,
                                                                                            prefix)
        features, embeddings = self.selector_features(pixels)
        return features, untouched if untouched is not None else embeddings

    def select_routes(self, classifier, pixels):
        """DDAS's routes, per image."""
        features, untouched = self._route_features(pixels)
        return Routes(self.moe.selector.select(features)), untouched

    def choose_routes(self, classifier, pixels, untouched=None, unit=None):
        """Per-image and per-unit routes from one computation of every autoencoder's errors."""
        selector = self.moe.selector
        errors = selector.reconstruction_errors(self._route_features(pixels, untouched)[0])
        return Routes(selector.decide(errors)), None if unit is None else selector.select_units(errors, unit)

    @torch.no_grad()
    def _finish_untouched(self, prefix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The untouched CLIP's image embeddings of `rows`, from their hidden states after the first blocks."""
        vision = self.model.vision_model
        hidden = prefix[rows]
        with self.moe.routing(None):
            for block in vision.encoder.layers[self.moe.selector.config.feature_layer:]:
                hidden = block(hidden, None)
            pooled = vision.post_layernorm(hidden[:, 0])
            return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def learned_tasks(self) -> dict[int, dict]:
        selector, info = self.moe.selector, self.moe.task_info
        trained = [t for t in range(self.moe.num_tasks) if selector is not None and selector.task_is_trained(t)]
        missing = [t for t in trained if not info[t] or not info[t].get("classnames")]
        if missing:
            raise ValueError(f"Tasks {missing} have no class names in the adapter config (`task_info`); save the "
                             "adapter from ContinualTrainer or call set_task_info().")
        return {t: info[t] for t in trained}
