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

from ...classification import Routes, image_embeddings
from ...tuners.moe_lora.features import ALEXNET_FEATURES, ALEXNET_URL, AlexNetFeatures, prefix_features, vision_prefix
from ...tuners.moe_lora.selector import SelectorConfig


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
    ddas_task_steps: int = field(default=300, metadata={"help": "Training steps of each task autoencoder."})
    ddas_reference_steps: int = field(default=1000, metadata={"help": "Training steps of the reference one."})
    ddas_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoders."})
    ddas_threshold: Optional[float] = field(
        default=None, metadata={"help": "Fixed zero-shot threshold; None calibrates one per task on held-out data."}
    )
    ddas_quantile: float = field(
        default=0.95, metadata={"help": "Calibrated threshold: this quantile of held-out in-task errors."}
    )
    ddas_max_images: int = field(
        default=2000, metadata={"help": "Images per task used to fit its autoencoder: a seeded random sample."}
    )

    def __post_init__(self):
        if self.ddas_feature_extractor not in ("clip", "alexnet"):
            raise ValueError(f"ddas_feature_extractor must be 'clip' or 'alexnet', got {self.ddas_feature_extractor!r}.")
        if self.ddas_feature_extractor == "alexnet" and self.ddas_feature_layer is not None:
            raise ValueError("ddas_feature_layer selects CLIP blocks; it cannot be used with the AlexNet extractor.")
        counts = {"ddas_hidden_dim": (self.ddas_hidden_dim, 1), "ddas_task_steps": (self.ddas_task_steps, 1),
                  "ddas_reference_steps": (self.ddas_reference_steps, 1), "ddas_max_images": (self.ddas_max_images, 1)}
        for name, (value, low) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        numbers = {"ddas_learning_rate": (self.ddas_learning_rate, "a finite positive number", lambda v: v > 0),
                   "ddas_quantile": (self.ddas_quantile, "a number in (0, 1]", lambda v: 0 < v <= 1),
                   "ddas_threshold": (self.ddas_threshold, "None or a finite number >= 0", lambda v: v >= 0)}
        for name, (value, wanted, valid) in numbers.items():
            if value is None and name == "ddas_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not valid(value):
                raise ValueError(f"`{name}` must be {wanted}, got {value!r}.")


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
        with self.moe.routing(None):
            if config.feature_layer is None:
                embeddings = image_embeddings(self.model, pixels)
                return embeddings, embeddings
            return prefix_features(vision_prefix(self.model.vision_model, pixels, config.feature_layer)), None

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

    def _selector_settings(self) -> SelectorConfig:
        ddas = self.ddas
        if ddas.ddas_feature_extractor == "alexnet":  # the paper's autoencoders: sigmoid outputs on raw features
            return SelectorConfig(feature_dim=ALEXNET_FEATURES, hidden_dim=ddas.ddas_hidden_dim, sigmoid_output=True,
                                  standardize=False, feature_extractor="alexnet")
        width = (self.model.config.projection_dim if ddas.ddas_feature_layer is None
                 else 2 * self.model.config.vision_config.hidden_size)
        return SelectorConfig(feature_dim=width, hidden_dim=ddas.ddas_hidden_dim, feature_layer=ddas.ddas_feature_layer)

    def _fit_selector(self, trainer, route: int, task) -> None:
        moe, ddas = self.moe, self.ddas
        show = trainer.is_world_process_zero() and not trainer.args.disable_tqdm
        if moe.selector is None or not moe.selector.has_reference:
            reference = self.ddas_reference
            if "label" not in reference.column_names:
                reference = reference.add_column("label", [0] * len(reference))
            if moe.selector is None:
                moe.enable_selector(self._selector_settings())
            moe.selector.fit_reference(self._features_of(trainer, reference, "reference images"),
                                       steps=ddas.ddas_reference_steps, lr=ddas.ddas_learning_rate,
                                       seed=trainer.args.seed, progress="DDAS reference autoencoder" if show else None)
        moe.selector.fit_task(route, self._features_of(trainer, task.train_dataset, task.name),
                              steps=ddas.ddas_task_steps, lr=ddas.ddas_learning_rate, threshold=ddas.ddas_threshold,
                              quantile=ddas.ddas_quantile, seed=trainer.args.seed,
                              progress=f"DDAS autoencoder: {task.name}" if show else None)

    def select_routes(self, classifier, pixels, per_batch=False):
        """DDAS's routes. The untouched pass that gives DDAS its features also serves the images sent to zero-shot:
        with CLIP features after k blocks it is finished for those images only; with the final embedding it is
        reused as it is."""
        selector = self.moe.selector
        config = selector.config
        if config.feature_extractor == "clip" and config.feature_layer is not None:
            with self.moe.routing(None):
                prefix = vision_prefix(self.model.vision_model, pixels, config.feature_layer)
            features = prefix_features(prefix)
            untouched = partial(self._finish_untouched, prefix)
        else:
            features, untouched = self.selector_features(pixels)
        if per_batch:
            return Routes.single(selector.select_batch(features), pixels.shape[0], pixels.device), untouched
        return Routes(selector.select(features)), untouched

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
