"""DDAS, the Distribution Discriminative Auto-Selector of MoE-Adapters: which task router serves an image.

One small autoencoder per task and one for a reference distribution learn to reconstruct frozen image features
of their data. An image goes to the task whose autoencoder reconstructs it best; if that is the reference
autoencoder, or the error is above the task's threshold, it goes to the untouched CLIP (task -1).

The selector is part of the adapter: its settings are `MoELoraConfig.selector` and its weights are saved in
`adapter_model.safetensors` with the experts, so peft's own save, load and push carry it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

ZERO_SHOT = -1
FEATURE_EXTRACTORS = ("clip", "alexnet")


@dataclass
class SelectorConfig:
    """Shape and feature source of a DDAS selector (stored as a dict in `MoELoraConfig.selector`)."""

    feature_dim: int
    hidden_dim: int = 100
    sigmoid_output: bool = False
    standardize: bool = True
    feature_extractor: str = "clip"
    feature_layer: Optional[int] = None
    include_untrained: bool = False  # official: the argmin also runs over task autoencoders not trained yet

    def __post_init__(self):
        for name in ("feature_dim", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DDAS selector `{name}` must be a positive integer, got {value!r}.")
        if self.feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(
                f"Unknown DDAS feature_extractor {self.feature_extractor!r}; use one of {FEATURE_EXTRACTORS}."
            )
        if self.feature_layer is not None and (
            isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, int) or self.feature_layer < 1
        ):
            raise ValueError(
                f"DDAS `feature_layer` must be None (final embedding) or a positive number of vision blocks, got "
                f"{self.feature_layer!r}."
            )

    @classmethod
    def from_dict(cls, values: dict) -> "SelectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown DDAS selector setting(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


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
    AlexNet features. Its parameters never train with the adapter (`requires_grad` stays False); `fit_*` trains
    them with their own optimiser.
    """

    def __init__(self, config: SelectorConfig, num_tasks: int):
        super().__init__()
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be non-negative, got {num_tasks}.")
        self.config = config
        self.reference = self._autoencoder()
        self.tasks = nn.ModuleList(self._autoencoder() for _ in range(num_tasks))
        self.requires_grad_(False)
        self.register_buffer("thresholds", torch.full((num_tasks,), math.inf))
        self.register_buffer("trained", torch.zeros(num_tasks + 1, dtype=torch.bool))  # [reference, tasks...]
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(config.feature_dim))

    def _autoencoder(self) -> FeatureAutoencoder:
        return FeatureAutoencoder(self.config.feature_dim, self.config.hidden_dim, self.config.sigmoid_output)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def has_reference(self) -> bool:
        return bool(self.trained[0])

    def task_is_trained(self, task: int) -> bool:
        return bool(self.trained[task + 1])

    def add_task(self) -> int:
        device = self.thresholds.device
        self.tasks.append(self._autoencoder().to(device).requires_grad_(False))
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_full((1,), math.inf)])
        self.trained = torch.cat([self.trained, self.trained.new_zeros(1)])
        return self.num_tasks - 1

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.feature_mean.device, self.feature_mean.dtype)
        return (features - self.feature_mean) / self.feature_scale if self.config.standardize else features

    # ----- training ------------------------------------------------------------------------------------------------
    def _fit(self, autoencoder: FeatureAutoencoder, features: torch.Tensor, steps: int, lr: float, batch_size: int,
             seed: int, progress: Optional[str] = None) -> None:
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
            for _ in tqdm(range(steps), desc=progress, disable=progress is None, leave=False):
                index = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),),
                                      generator=generator).to(features.device)
                loss = autoencoder.errors(features[index]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        autoencoder.requires_grad_(False)
        autoencoder.eval()

    def fit_reference(self, features: torch.Tensor, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64,
                      seed: int = 0, progress: Optional[str] = None) -> None:
        """Train the reference autoencoder (paper: Tiny ImageNet, 1000 steps); sets the standardisation."""
        features = features.detach().to(self.feature_mean.device, self.feature_mean.dtype)
        if features.shape[0] < 2:
            raise ValueError("The reference autoencoder needs at least two reference images.")
        if self.config.standardize:
            self.feature_mean.copy_(features.mean(0))
            self.feature_scale.copy_(features.std(0).clamp_min(1e-6))
        self._fit(self.reference, self._normalise(features), steps, lr, batch_size, seed, progress)
        self.trained[0] = True

    def fit_task(self, task: int, features: torch.Tensor, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                 threshold: Optional[float] = None, heldout_fraction: float = 0.1, quantile: float = 0.95,
                 seed: int = 0, progress: Optional[str] = None) -> float:
        """Train task `task`'s autoencoder (paper: 300 steps) and set its threshold; returns the threshold.

        With `threshold=None` it is calibrated: the `quantile` of the errors on a held-out `heldout_fraction` of
        the task's features (so that about 1 - quantile of in-distribution images fall back to zero-shot). A fixed
        threshold (the paper's 0.0655 for AlexNet features) is used as given.
        """
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the selector has {self.num_tasks} task autoencoders.")
        if not self.has_reference:
            raise ValueError("Train the reference autoencoder first (fit_reference): the decision compares to it.")
        features = self._normalise(features.detach())
        order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        held = int(features.shape[0] * heldout_fraction) if threshold is None else 0
        if threshold is None and held < 1:
            raise ValueError("Too few images to calibrate a threshold: give more, or a fixed `threshold`.")
        train, heldout = features[order[held:]], features[order[:held]]
        autoencoder = self.tasks[task]
        self._fit(autoencoder, train, steps, lr, batch_size, seed + task + 1, progress)
        if threshold is None:
            with torch.no_grad():
                threshold = float(torch.quantile(autoencoder.errors(heldout), quantile))
        self.thresholds[task] = threshold
        self.trained[task + 1] = True
        return threshold

    def set_autoencoder(self, task: Optional[int], autoencoder: FeatureAutoencoder,
                        threshold: Optional[float] = None) -> None:
        """Take the weights of an autoencoder trained elsewhere (e.g. the official DDAS loop) as the reference's
        (`task=None`) or task `task`'s, with that task's threshold; marks it trained."""
        if task is not None and not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the selector has {self.num_tasks} task autoencoders.")
        if task is not None and (threshold is None or not threshold > 0):
            raise ValueError(f"A task autoencoder needs a positive threshold, got {threshold!r}.")
        if task is not None and not self.has_reference:
            raise ValueError("Set the reference autoencoder first: the decision compares to it.")
        slot = self.reference if task is None else self.tasks[task]
        slot.load_state_dict(autoencoder.state_dict())  # refuses another shape with its own message
        if task is None:
            self.trained[0] = True
        else:
            self.thresholds[task] = threshold
            self.trained[task + 1] = True

    # ----- decisions -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruction_errors(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + tasks) errors: column 0 the reference, then each task; untrained ones are +inf unless
        `include_untrained` (the official code compares the randomly initialised ones too)."""
        features = self._normalise(features)
        errors = torch.stack([self.reference.errors(features)] + [ae.errors(features) for ae in self.tasks], dim=-1)
        return errors if self.config.include_untrained else errors.masked_fill(~self.trained, math.inf)

    def _decide(self, errors: torch.Tensor) -> torch.Tensor:
        best = errors.argmin(-1)
        task = best - 1
        limit = self.thresholds[task.clamp_min(0)]
        fits = errors.gather(-1, best.unsqueeze(-1)).squeeze(-1) <= limit
        return torch.where((best > 0) & fits, task, torch.full_like(task, ZERO_SHOT))

    @torch.no_grad()
    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Per image: the task whose autoencoder fits best, or -1 (zero-shot) for the reference or a poor fit."""
        return self._decide(self.reconstruction_errors(features))

    @torch.no_grad()
    def select_batch(self, features: torch.Tensor) -> int:
        """One decision for the whole batch from its mean errors (the official protocol: a test batch of one
        dataset)."""
        return int(self._decide(self.reconstruction_errors(features).mean(0, keepdim=True))[0])
