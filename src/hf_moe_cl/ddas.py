"""DDAS, the Distribution Discriminative Auto-Selector of MoE-Adapters: which task router serves an image.

One small autoencoder per task and one for a reference distribution learn to reconstruct frozen image features
of their data. An image goes to the task whose autoencoder reconstructs it best; if that is the reference
autoencoder, or the error is above the task's threshold, it goes to the untouched CLIP (task -1). The official code
decides once per batch; this one decides per image, so a mixed batch is routed image by image.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .safetensors_files import check_safetensors_file

ZERO_SHOT = -1
SELECTOR_CONFIG = "ddas_config.json"
SELECTOR_WEIGHTS = "ddas.safetensors"
FEATURE_EXTRACTORS = ("clip", "alexnet")


class FeatureAutoencoder(nn.Module):
    """`Linear(F, hidden) + ReLU -> Linear(hidden, F) [+ Sigmoid]`, the paper's autoencoder."""

    def __init__(self, feature_dim: int, hidden_dim: int, sigmoid_output: bool):
        super().__init__()
        self.encoder = nn.Linear(feature_dim, hidden_dim)
        self.decoder = nn.Linear(hidden_dim, feature_dim)
        self.sigmoid_output = sigmoid_output

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.decoder(F.relu(self.encoder(features)))
        return torch.sigmoid(out) if self.sigmoid_output else out

    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared reconstruction error."""
        return (self(features) - features).pow(2).mean(-1)


class DistributionSelector(nn.Module):
    """Reference autoencoder + one autoencoder per task, with per-task decision thresholds.

    Features are standardised with the reference data's mean and scale (so one threshold scale serves every
    feature extractor) unless `standardize=False`, which with `sigmoid_output=True` is the paper's setting for
    AlexNet features.
    """

    def __init__(self, feature_dim: int, num_tasks: int, hidden_dim: int = 100, sigmoid_output: bool = False,
                 standardize: bool = True, feature_extractor: str = "clip", feature_layer: Optional[int] = None):
        super().__init__()
        if feature_dim < 1 or num_tasks < 0 or hidden_dim < 1:
            raise ValueError("feature_dim and hidden_dim must be positive and num_tasks non-negative.")
        if feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"Unknown feature_extractor {feature_extractor!r}; use one of {FEATURE_EXTRACTORS}.")
        self.feature_extractor, self.feature_layer = feature_extractor, feature_layer
        self.feature_dim, self.hidden_dim = feature_dim, hidden_dim
        self.sigmoid_output, self.standardize = sigmoid_output, standardize
        self.reference = FeatureAutoencoder(feature_dim, hidden_dim, sigmoid_output)
        self.tasks = nn.ModuleList(FeatureAutoencoder(feature_dim, hidden_dim, sigmoid_output)
                                   for _ in range(num_tasks))
        self.requires_grad_(False)
        self.register_buffer("thresholds", torch.full((num_tasks,), math.inf))
        self.register_buffer("trained", torch.zeros(num_tasks + 1, dtype=torch.bool))  # [reference, tasks...]
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def config_dict(self) -> dict:
        return {"feature_dim": self.feature_dim, "num_tasks": self.num_tasks, "hidden_dim": self.hidden_dim,
                "sigmoid_output": self.sigmoid_output, "standardize": self.standardize,
                "feature_extractor": self.feature_extractor, "feature_layer": self.feature_layer}

    def add_task(self) -> int:
        device = self.thresholds.device
        new = FeatureAutoencoder(self.feature_dim, self.hidden_dim, self.sigmoid_output).to(device)
        self.tasks.append(new.requires_grad_(False))
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_full((1,), math.inf)])
        self.trained = torch.cat([self.trained, self.trained.new_zeros(1)])
        return self.num_tasks - 1

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_mean.dtype)
        return (features - self.feature_mean) / self.feature_scale if self.standardize else features

    # ----- training ------------------------------------------------------------------------------------------------
    def _fit(self, autoencoder: FeatureAutoencoder, features: torch.Tensor, steps: int, lr: float, batch_size: int,
             seed: int) -> None:
        if features.shape[0] == 0:
            raise ValueError("Cannot train a DDAS autoencoder on zero images: the task's dataset is empty.")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # seeded initialisation: the same data and seed give the same selector
            for linear in (autoencoder.encoder, autoencoder.decoder):
                bound = 1.0 / math.sqrt(linear.in_features)
                for param in (linear.weight, linear.bias):
                    param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
        autoencoder.requires_grad_(True)
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
        autoencoder.train()
        with torch.enable_grad():
            for _ in range(steps):
                index = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),),
                                      generator=generator).to(features.device)
                loss = autoencoder.errors(features[index]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        autoencoder.requires_grad_(False)
        autoencoder.eval()

    def fit_reference(self, features: torch.Tensor, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64,
                      seed: int = 0) -> None:
        """Train the reference autoencoder (paper: Tiny ImageNet, 1000 steps); sets the standardisation."""
        features = features.detach().to(self.feature_mean.device, self.feature_mean.dtype)
        if features.shape[0] < 2:
            raise ValueError("The reference autoencoder needs at least two reference images.")
        if self.standardize:
            self.feature_mean.copy_(features.mean(0))
            self.feature_scale.copy_(features.std(0).clamp_min(1e-6))
        self._fit(self.reference, self._normalise(features), steps, lr, batch_size, seed)
        self.trained[0] = True

    def fit_task(self, task: int, features: torch.Tensor, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                 threshold: Optional[float] = None, heldout_fraction: float = 0.1, quantile: float = 0.95,
                 seed: int = 0) -> float:
        """Train task `task`'s autoencoder (paper: 300 steps) and set its threshold; returns the threshold.

        With `threshold=None` it is calibrated: the `quantile` of the errors on a held-out `heldout_fraction` of
        the task's features (so that about 1 - quantile of in-distribution images fall back to zero-shot). A fixed
        threshold (the paper's 0.065 for AlexNet features) is used as given.
        """
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the selector has {self.num_tasks} task autoencoders.")
        if not bool(self.trained[0]):
            raise ValueError("Train the reference autoencoder first (fit_reference): the decision compares to it.")
        features = self._normalise(features.detach().to(self.feature_mean.device))
        order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        held = int(features.shape[0] * heldout_fraction) if threshold is None else 0
        if threshold is None and held < 1:
            raise ValueError("Too few images to calibrate a threshold: give more, or a fixed `threshold`.")
        train, heldout = features[order[held:]], features[order[:held]]
        autoencoder = self.tasks[task]
        self._fit(autoencoder, train, steps, lr, batch_size, seed + task + 1)
        if threshold is None:
            with torch.no_grad():
                threshold = float(torch.quantile(autoencoder.errors(heldout), quantile))
        self.thresholds[task] = threshold
        self.trained[task + 1] = True
        return threshold

    # ----- decisions -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruction_errors(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + tasks) errors: column 0 the reference, then each task; untrained ones are +inf."""
        features = self._normalise(features)
        errors = torch.stack([self.reference.errors(features)] + [ae.errors(features) for ae in self.tasks], dim=-1)
        return errors.masked_fill(~self.trained, math.inf)

    @torch.no_grad()
    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Per image: the task whose autoencoder fits best, or -1 (zero-shot) for the reference or a poor fit."""
        errors = self.reconstruction_errors(features)
        best = errors.argmin(-1)
        task = best - 1
        inside = best > 0
        limit = self.thresholds[task.clamp_min(0)]
        fits = errors.gather(-1, best.unsqueeze(-1)).squeeze(-1) <= limit
        return torch.where(inside & fits, task, torch.full_like(task, ZERO_SHOT))


# ----- features ----------------------------------------------------------------------------------------------------
class AlexNetFeatures(nn.Module):
    """The paper's extractor: ImageNet AlexNet conv5 features (needs torchvision and its pretrained weights)."""

    IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, pixel_mean, pixel_std):
        super().__init__()
        try:
            from torchvision.models import AlexNet_Weights, alexnet
        except ImportError as error:
            raise ImportError("feature_extractor='alexnet' needs torchvision; install it or use 'clip'.") from error
        network = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1)
        self.features, self.pool = network.features, network.avgpool
        self.register_buffer("clip_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(pixel_std).view(1, 3, 1, 1))
        self.register_buffer("imagenet_mean", torch.tensor(self.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("imagenet_std", torch.tensor(self.IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        images = pixel_values * self.clip_std + self.clip_mean
        images = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
        return self.pool(self.features((images - self.imagenet_mean) / self.imagenet_std)).flatten(1)


@torch.no_grad()
def clip_image_features(model, pixel_values: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """Features of the untouched CLIP (adapters switched off), so they never drift as tasks are learned.

    `layer=None`: the normalised image embedding. `layer=k`: token 0 and the mean token after the first k vision
    blocks, which costs only k blocks and makes task-agnostic inference barely dearer than plain CLIP.
    """
    from .tuners.moe_lora.model import find_moe

    moe = find_moe(model)
    with moe.routing(None) if moe is not None else nullcontext():
        if layer is None:
            return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)
        vision = model.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for block in vision.encoder.layers[:layer]:
            hidden = block(hidden, None)
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1).float()


def selector_features(selector: DistributionSelector, model, pixel_values: torch.Tensor, extractor=None):
    """The features `selector` was trained on, for a batch of CLIP pixel values."""
    if selector.feature_extractor == "alexnet":
        if extractor is None:
            raise ValueError("An AlexNet selector needs its AlexNetFeatures extractor passed in.")
        return extractor(pixel_values)
    return clip_image_features(model, pixel_values, selector.feature_layer)


# ----- files ---------------------------------------------------------------------------------------------------------
def save_selector(selector: DistributionSelector, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, SELECTOR_CONFIG), "w") as handle:
        json.dump(selector.config_dict(), handle, indent=1)
    state = {k: v.detach().contiguous().cpu() for k, v in selector.state_dict().items()}
    save_file(state, os.path.join(folder, SELECTOR_WEIGHTS), metadata={"format": "pt"})


def _selector_files(folder: str) -> Optional[tuple[str, str]]:
    if os.path.isdir(folder):
        config = os.path.join(folder, SELECTOR_CONFIG)
        return (config, os.path.join(folder, SELECTOR_WEIGHTS)) if os.path.isfile(config) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(folder, SELECTOR_CONFIG), hf_hub_download(folder, SELECTOR_WEIGHTS)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def load_selector(folder: str, expected_tasks: Optional[int] = None) -> Optional[DistributionSelector]:
    """The selector saved in `folder` (a local folder or a Hub repo id), or None if it has none."""
    files = _selector_files(folder)
    if files is None:
        return None
    config_path, weights_path = files
    if not os.path.isfile(weights_path):
        raise ValueError(f"{config_path} has no {SELECTOR_WEIGHTS} beside it; save the selector again.")
    check_safetensors_file(weights_path)
    with open(config_path) as handle:
        config = json.load(handle)
    if expected_tasks is not None and config["num_tasks"] != expected_tasks:
        raise ValueError(
            f"The DDAS selector in {folder} has {config['num_tasks']} task autoencoders but the adapter has "
            f"{expected_tasks} task routers: they come from different runs. Save the adapter and its selector "
            "together (save_pretrained) or train a new selector."
        )
    selector = DistributionSelector(**config)
    state = load_file(weights_path)
    expected = selector.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"{weights_path} does not match {config_path}; save the selector again.")
    selector.load_state_dict(state)
    return selector
