"""DDAS's settings: what a selector is (`SelectorConfig`, saved in the adapter, bound to the model when the adapter is
injected: `bound_to`) and how it is trained (`DDASArguments`, the options of a continual run)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

import torch

from ..options import check_flags, check_option, moved_options

# The name under which an adapter holds its selector: MoELoraModel's submodule, and the prefix of its tensors in
# adapter_model.safetensors.
SELECTOR_KEY = "moe_lora_selector"
FEATURE_EXTRACTORS = ("clip", "alexnet")
TRAINING_SCHEDULES = ("sampled", "official")
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 weights
ALEXNET_FEATURES = 256 * 13 * 13  # conv5 at 224 px
HELDOUT_FRACTION = 0.1  # the share of a task's images its calibrated threshold is measured on
EDITED = "In a saved adapter_config.json this means the file was damaged or edited"


def heldout_count(images: int, fraction: float = HELDOUT_FRACTION) -> int:
    """How many of a task's `images` are held out to calibrate its threshold (0: too few to calibrate)."""
    return int(images * fraction)


@dataclass
class SelectorConfig:
    """A DDAS selector: where its features come from and the shape of its autoencoders (stored as a dict in
    `MoELoraConfig.selector`).

    `feature_dim` is set when the selector is bound to a model (None before); `sigmoid_output` and `standardize`
    default to the extractor's rule (AlexNet, as the paper: sigmoid outputs on raw features; CLIP: linear outputs
    on features standardised with the reference's mean and scale).
    """

    feature_dim: Optional[int] = None
    hidden_dim: int = field(default=100, metadata={"help": "Hidden width of every DDAS autoencoder."})
    sigmoid_output: Optional[bool] = None
    standardize: Optional[bool] = None
    feature_extractor: str = field(default="clip", metadata={
        "help": "DDAS features: 'clip' (the untouched CLIP; no download) or 'alexnet' (the official "
                "extractor: ImageNet AlexNet conv5, sigmoid, used with a fixed threshold such as 0.0655)."})
    feature_layer: Optional[int] = field(default=None, metadata={
        "help": "CLIP features for DDAS: None = the untouched image embedding; k = tokens after k blocks."})
    include_untrained: bool = field(default=False, metadata={
        "help": "Let the autoencoders of tasks not learned yet (randomly initialised) take part in the "
                "argmin, with the fixed threshold, as the official code (evaluation.py lines 59-71); False "
                "leaves them out."})

    def __post_init__(self):
        check_option("selector.feature_extractor", self.feature_extractor, str, choices=FEATURE_EXTRACTORS)
        for name in ("feature_dim", "hidden_dim", "feature_layer"):
            check_option(f"selector.{name}", getattr(self, name), int, low=1, optional=name != "hidden_dim")
        for name in ("include_untrained", "sigmoid_output", "standardize"):
            check_option(f"selector.{name}", getattr(self, name), bool, optional=name != "include_untrained")
        alexnet = self.feature_extractor == "alexnet"
        if self.sigmoid_output is None:
            self.sigmoid_output = alexnet
        if self.standardize is None:
            self.standardize = not alexnet
        if alexnet:
            if self.feature_layer is not None:
                raise ValueError("`selector.feature_layer` selects CLIP vision blocks; it cannot be used with the "
                                 "AlexNet extractor (set it to None).")
            if self.feature_dim not in (None, ALEXNET_FEATURES):
                raise ValueError(f"`selector.feature_dim` must be {ALEXNET_FEATURES} with the AlexNet extractor (its "
                                 f"conv5 features at 224 px), got {self.feature_dim}.")
            self.feature_dim = ALEXNET_FEATURES

    @classmethod
    def from_dict(cls, values: dict) -> "SelectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown DDAS selector setting(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_kept_by(self, saved: "SelectorConfig", names: Optional[Sequence[str]] = None) -> None:
        """Refuse these settings (`names` of them; None: all), given for an adapter whose selector already has
        `saved` ones (its autoencoders learned tasks with them) that differ; `feature_dim` follows the model."""
        own, wanted = saved.to_dict(), self.to_dict()
        differ = [name for name in (names or wanted) if name != "feature_dim" and wanted[name] != own[name]]
        if differ:
            raise ValueError("This adapter's DDAS selector has " + ", ".join(f"{n}={own[n]!r}" for n in differ)
                             + "; its learned tasks' autoencoders were trained with those, so it keeps them, not "
                             + ", ".join(f"{n}={wanted[n]!r}" for n in differ) + ". Drop the selector settings, or "
                             "start from an adapter without a selector.")

    def bound_to(self, model_config, owner: str = "The DDAS selector") -> "SelectorConfig":
        """These settings for a model with `model_config` (a CLIPConfig): `feature_dim` set to the width of the
        features it gives, a `feature_layer` beyond its vision blocks or a saved width it does not give refused."""
        vision = getattr(model_config, "vision_config", None)
        if self.feature_extractor != "clip" or vision is None:
            return self
        depth = vision.num_hidden_layers
        fix = f"{EDITED}, or the adapter belongs to another base model."
        if self.feature_layer is not None and self.feature_layer > depth:
            raise ValueError(f"{owner} reads the tokens after `feature_layer`={self.feature_layer} vision blocks, but "
                             f"this model's vision tower has {depth}: give 1 to {depth}, or None for the image "
                             f"embeddings. {fix}")
        width = model_config.projection_dim if self.feature_layer is None else 2 * vision.hidden_size
        if self.feature_dim is not None and self.feature_dim != width:
            source = ("its image embeddings" if self.feature_layer is None
                      else f"its tokens after {self.feature_layer} vision blocks")
            raise ValueError(f"{owner} reads {self.feature_dim} features per image, but this model gives {width} "
                             f"({source}). {fix}")
        return SelectorConfig(**{**self.to_dict(), "feature_dim": width})


# The command line's names of SelectorConfig's fields (DDASArguments' own options until hf-moe-cl 0.3)
SELECTOR_OPTION_NAMES = {f"ddas_{name}": name for name in ("feature_extractor", "feature_layer", "hidden_dim",
                                                             "include_untrained")}


@moved_options(**{old: f"it is a setting of the DDAS selector: SelectorConfig({new}=...), given to MoEAdapters(..., "
                       "selector=...) or in MoELoraConfig(selector=...)" for old, new in SELECTOR_OPTION_NAMES.items()})
@dataclass
class DDASArguments:
    """How MoE-Adapters trains its DDAS selector: a reference autoencoder once, one per task after it. What the
    selector is (extractor, layer, width) is the adapter's `SelectorConfig`."""

    ddas: bool = field(default=False, metadata={
        "help": "Train a DDAS selector: a reference autoencoder once, one per task after it."})
    ddas_alexnet_weights: Optional[str] = field(default=ALEXNET_URL, metadata={
        "help": "AlexNet weights for the 'alexnet' extractor: URL or path (None: random weights, for "
                "timings and tests only)."})
    ddas_training: str = field(default="sampled", metadata={
        "help": "'official': the official loop (ddas/fitting.py): the whole training set through the "
                "training augmentation, steps + 1 iterations, Adam with the official step decay (with a calibrated "
                "threshold, a tenth of each task's images is held out to calibrate it). 'sampled': features of at "
                "most ddas_max_images un-augmented images, computed once, batches drawn with replacement (fast)."})
    ddas_task_steps: int = field(default=300, metadata={"help": "Training steps of each task autoencoder (official: "
                                                                "--iterations 300, run as 301)."})
    ddas_reference_steps: int = field(default=1000, metadata={"help": "Training steps of the reference one "
                                                                      "(official: 1000, run as 1001)."})
    ddas_learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the autoencoders "
                                                                      "(official: 0.01, few-shot 0.003)."})
    ddas_weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay (official: 1e-4)."})
    ddas_batch_size: int = field(default=64, metadata={"help": "Autoencoder batch size (official: 64)."})
    ddas_threshold: Optional[float] = field(default=None, metadata={
        "help": "Fixed zero-shot threshold (> 0); None calibrates one per task on held-out data."})
    ddas_quantile: float = field(default=0.95, metadata={
        "help": "Calibrated threshold: this quantile of held-out in-task errors."})
    ddas_max_images: int = field(default=2000, metadata={
        "help": "'sampled' training: images per task used to fit its autoencoder (a seeded random sample)."})
    ddas_reference_shots: Optional[int] = field(default=None, metadata={
        "help": "Train the reference on this many images per class (official few-shot: 5)."})
    ddas_augment_once: bool = field(default=False, metadata={
        "help": "'official' training: augment each image once and train on those fixed images (the "
                "official few-shot chooser, few_shot_AutoEncoder.py lines 170-189)."})
    ddas_task_draw: str = field(default="own", metadata={
        "help": "A few-shot task's autoencoder trains on its 'own' draw of as many images per class from "
                "the task's whole training set (official: few_shot_AutoEncoder.py lines 167-177 draw 5 per class "
                "in a process of their own, independent of the MoE's draw), or on the 'shared' draw the model "
                "trained on."})

    def __post_init__(self):
        check_flags(self, ("ddas", "ddas_augment_once"))
        check_option("ddas_alexnet_weights", self.ddas_alexnet_weights, str, optional=True)
        for name in ("ddas_task_steps", "ddas_reference_steps", "ddas_max_images", "ddas_batch_size"):
            check_option(name, getattr(self, name), int, low=1)
        check_option("ddas_reference_shots", self.ddas_reference_shots, int, low=1, optional=True)
        check_option("ddas_learning_rate", self.ddas_learning_rate, float, low=0.0, low_open=True)
        check_option("ddas_weight_decay", self.ddas_weight_decay, float, low=0.0)
        check_option("ddas_quantile", self.ddas_quantile, float, low=0.0, high=1.0, low_open=True)
        # 0 would send every image to zero-shot (an autoencoder's error is never below it)
        check_option("ddas_threshold", self.ddas_threshold, float, low=0.0, low_open=True, optional=True)
        if self.ddas_threshold is not None and not 0 < float(torch.tensor(self.ddas_threshold)) < math.inf:
            raise ValueError(f"ddas_threshold={self.ddas_threshold!r} is {'0' if self.ddas_threshold < 1 else 'inf'} "
                             "as the selector stores it (float32), which would send every image to "
                             f"{'zero-shot' if self.ddas_threshold < 1 else 'a task'}: give a threshold between "
                             "1e-38 and 3e38.")
        check_option("ddas_training", self.ddas_training, str, choices=TRAINING_SCHEDULES)
        check_option("ddas_task_draw", self.ddas_task_draw, str, choices=("own", "shared"))
        SelectorConfig(**{SELECTOR_OPTION_NAMES[name]: value for name, value in self.moved.items()})  # checked now
        if self.ddas_augment_once and self.ddas_training != "official":
            raise ValueError("ddas_augment_once is part of the official training: set ddas_training='official'.")

    def check_selector(self, selector: SelectorConfig) -> None:
        """The rule that joins the two: untrained autoencoders take part only with a fixed threshold (a task not
        learned yet has no calibrated one)."""
        if selector.include_untrained and self.ddas_threshold is None:
            raise ValueError("ddas_include_untrained needs a fixed ddas_threshold: a task not learned yet has no "
                             "calibrated one.")
