"""DDAS, the Distribution Discriminative Auto-Selector of MoE-Adapters: which task router serves an image.

One small autoencoder per task and one for a reference distribution learn to reconstruct frozen image features
of their data. An image goes to the task whose autoencoder reconstructs it best; if that is the reference
autoencoder, or the error is above the task's threshold, it goes to the untouched CLIP (task -1). The selector is
part of the adapter (`MoELoraConfig.selector`, weights in `adapter_model.safetensors`).
"""

from __future__ import annotations

import math
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from ..classification import ZERO_SHOT, Untouched
from ..options import check_option
from .autoencoder import FeatureAutoencoder, fit_autoencoder
from .features import selector_features
from .settings import HELDOUT_FRACTION, SelectorConfig, heldout_count

AUTOENCODER_TENSORS = ("encoder_weight", "encoder_bias", "decoder_weight", "decoder_bias")
SELECTOR_TENSORS = AUTOENCODER_TENSORS + ("thresholds", "trained", "feature_mean", "feature_scale")


class DistributionSelector(nn.Module):
    """Reference autoencoder + one autoencoder per task, with per-task decision thresholds.

    The autoencoders are stored stacked, reference first (`encoder_weight` is (1 + tasks, hidden, features)...),
    so every decision runs all of them as one batched computation, whatever the number of tasks. Features are
    standardised with the reference data's mean and scale (so one threshold scale serves every feature extractor)
    unless `standardize=False`, which with `sigmoid_output=True` is the paper's setting for AlexNet features. Its
    parameters never train with the adapter (`requires_grad` stays False); `fit_*` trains each autoencoder with its
    own optimiser as a `FeatureAutoencoder` and stores the result in its slot.
    """

    def __init__(self, config: SelectorConfig, num_tasks: int):
        super().__init__()
        check_option("num_tasks", num_tasks, int, low=0)
        self.config = config
        slots = [self._autoencoder() for _ in range(num_tasks + 1)]
        for name in AUTOENCODER_TENSORS:
            self.register_parameter(name, nn.Parameter(torch.stack([_tensor_of(ae, name) for ae in slots]),
                                                       requires_grad=False))
        self.register_buffer("thresholds", torch.full((num_tasks,), math.inf))
        self.register_buffer("trained", torch.zeros(num_tasks + 1, dtype=torch.bool))  # [reference, tasks...]
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(config.feature_dim))

    def _autoencoder(self) -> FeatureAutoencoder:
        return FeatureAutoencoder(self.config.feature_dim, self.config.hidden_dim, self.config.sigmoid_output)

    @property
    def num_tasks(self) -> int:
        return self.thresholds.shape[0]

    @property
    def has_reference(self) -> bool:
        return bool(self.trained[0])

    def task_is_trained(self, task: int) -> bool:
        return bool(self.trained[task + 1])

    def autoencoder(self, slot: int) -> FeatureAutoencoder:
        """A copy of the autoencoder in `slot` (0: the reference, 1 + t: task t) as a module of its own."""
        autoencoder = self._autoencoder().to(self.encoder_weight.device)
        with torch.no_grad():
            for name in AUTOENCODER_TENSORS:
                _tensor_of(autoencoder, name).copy_(getattr(self, name)[slot])
        return autoencoder.requires_grad_(False).eval()

    def add_task(self) -> int:
        new = self._autoencoder().to(self.encoder_weight.device)
        for name in AUTOENCODER_TENSORS:
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.cat([old.detach(), _tensor_of(new, name).detach().unsqueeze(0)]),
                                             requires_grad=False))
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_full((1,), math.inf)])
        self.trained = torch.cat([self.trained, self.trained.new_zeros(1)])
        return self.num_tasks - 1

    def _check_width(self, features: torch.Tensor) -> None:
        """Features of another width come from another extractor, model or layer than the selector was built for."""
        config = self.config
        if features.dim() != 2 or features.shape[-1] != config.feature_dim:
            source = ("AlexNet's conv5 features" if config.feature_extractor == "alexnet" else
                      "CLIP's image embeddings" if config.feature_layer is None else
                      f"CLIP's tokens after {config.feature_layer} vision blocks")
            raise ValueError(f"The DDAS selector reads {config.feature_dim} features per image ({source}), got "
                             f"features of shape {tuple(features.shape)}: they come from another model or layer "
                             "than the selector's `feature_dim` was set for. Use the base model the adapter was "
                             "trained on, or enable a selector whose feature_dim fits this model and fit it again.")

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """`features` as every autoencoder sees them: standardised with the reference's mean and scale (unless
        `standardize=False`), on the selector's device and dtype."""
        self._check_width(features)
        features = features.to(self.feature_mean.device, self.feature_mean.dtype)
        return (features - self.feature_mean) / self.feature_scale if self.config.standardize else features

    # ----- training ------------------------------------------------------------------------------------------------
    def fit_reference(self, features: torch.Tensor, steps: int = 1000, lr: float = 1e-3, batch_size: int = 64,
                      seed: int = 0, progress: Optional[str] = None, weight_decay: float = 0.0) -> None:
        """Train the reference autoencoder on `features` with the sampled schedule (paper: Tiny ImageNet, 1000
        steps); sets the standardisation."""
        features = features.detach()
        self.set_standardization(features)
        self.set_autoencoder(None, self._fit(self.normalise(features), steps, lr, batch_size, seed, progress,
                                             weight_decay))

    def set_standardization(self, reference_features: torch.Tensor) -> None:
        """Take the mean and scale every autoencoder's inputs are standardised with from the reference images'
        features (a no-op with `standardize=False`); set before any autoencoder is trained."""
        self._check_width(reference_features)
        features = reference_features.detach().to(self.feature_mean.device, self.feature_mean.dtype)
        if features.shape[0] < 2:
            raise ValueError("The reference autoencoder needs at least two reference images.")
        if self.config.standardize:
            self.feature_mean.copy_(features.mean(0))
            self.feature_scale.copy_(features.std(0).clamp_min(1e-6))

    @torch.no_grad()
    def calibrated_threshold(self, autoencoder: FeatureAutoencoder, heldout_features: torch.Tensor,
                             quantile: float) -> float:
        """The `quantile` of `autoencoder`'s errors on held-out in-task features (so that about 1 - quantile of
        in-distribution images fall back to zero-shot)."""
        if heldout_features.shape[0] < 1:
            raise ValueError("Too few images to calibrate a threshold: give more, or a fixed `threshold`.")
        errors = autoencoder.errors(self.normalise(heldout_features).to(next(autoencoder.parameters()).device))
        return float(torch.quantile(errors.float(), quantile))

    def fit_task(self, task: int, features: torch.Tensor, steps: int = 300, lr: float = 1e-3, batch_size: int = 64,
                 threshold: Optional[float] = None, heldout_fraction: float = HELDOUT_FRACTION, quantile: float = 0.95,
                 seed: int = 0, progress: Optional[str] = None, weight_decay: float = 0.0) -> float:
        """Train task `task`'s autoencoder on `features` with the sampled schedule (paper: 300 steps) and set its
        threshold; returns the threshold.

        With `threshold=None` it is calibrated: the `quantile` of the errors on a held-out `heldout_fraction` of
        the task's features (so that about 1 - quantile of in-distribution images fall back to zero-shot). A fixed
        threshold (the paper's 0.0655 for AlexNet features) is used as given.
        """
        self._check_slot(task, threshold, calibrated=threshold is None)
        features = features.detach()
        order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        held = heldout_count(features.shape[0], heldout_fraction) if threshold is None else 0
        if threshold is None and held < 1:
            raise ValueError("Too few images to calibrate a threshold: give more, or a fixed `threshold`.")
        train, heldout = self.normalise(features[order[held:]]), features[order[:held]]
        autoencoder = self._fit(train, steps, lr, batch_size, seed + task + 1, progress, weight_decay)
        if threshold is None:
            threshold = self.calibrated_threshold(autoencoder, heldout, quantile)
        self.set_autoencoder(task, autoencoder, threshold)
        return threshold

    def _fit(self, features: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
             progress: Optional[str], weight_decay: float) -> FeatureAutoencoder:
        config = self.config
        return fit_autoencoder(config.feature_dim, config.hidden_dim, config.sigmoid_output, features, steps, lr,
                               weight_decay, seed, "sampled", batch_size, progress=progress)

    def _check_slot(self, task: Optional[int], threshold: Optional[float], calibrated: bool = False) -> None:
        """What a task autoencoder (`task` not None) needs before it is set."""
        if task is None:
            return
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"Task id {task} is out of range: the selector has {self.num_tasks} task autoencoders.")
        if not self.has_reference:
            raise ValueError("Train (or set) the reference autoencoder first (fit_reference): the decision compares "
                             "to it.")
        if not calibrated and (threshold is None or not threshold > 0):
            raise ValueError(f"A task autoencoder needs a positive threshold, got {threshold!r}: an image is routed to "
                             "the task when its error is at most the threshold, so 0 would send every image to "
                             "zero-shot.")

    def set_autoencoder(self, task: Optional[int], autoencoder: FeatureAutoencoder,
                        threshold: Optional[float] = None) -> None:
        """Take the weights of an autoencoder trained elsewhere (e.g. the official DDAS loop) as the reference's
        (`task=None`) or task `task`'s, with that task's threshold; marks it trained."""
        self._check_slot(task, threshold)
        expected = {name: tuple(getattr(self, name).shape[1:]) for name in AUTOENCODER_TENSORS}
        given = {name: tuple(_tensor_of(autoencoder, name).shape) for name in AUTOENCODER_TENSORS}
        if given != expected:
            raise ValueError(f"The autoencoder has shapes {given}; this selector's are {expected} (feature_dim "
                             f"{self.config.feature_dim}, hidden_dim {self.config.hidden_dim}).")
        slot = 0 if task is None else task + 1
        with torch.no_grad():
            for name in AUTOENCODER_TENSORS:
                getattr(self, name)[slot].copy_(_tensor_of(autoencoder, name))
        self.trained[slot] = True
        if task is not None:
            self.thresholds[task] = threshold

    # ----- decisions -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruction_errors(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + tasks) errors: column 0 the reference, then each task; untrained ones are +inf unless
        `include_untrained` (the official code compares the randomly initialised ones too). Every autoencoder runs
        in the same two batched matrix products."""
        features = self.normalise(features)
        slots = self.encoder_weight.shape[0]
        inputs = features.unsqueeze(0).expand(slots, *features.shape)
        hidden = torch.relu(torch.baddbmm(self.encoder_bias.unsqueeze(1), inputs, self.encoder_weight.transpose(1, 2)))
        output = torch.baddbmm(self.decoder_bias.unsqueeze(1), hidden, self.decoder_weight.transpose(1, 2))
        if self.config.sigmoid_output:
            output = torch.sigmoid(output)
        errors = (output - inputs).pow(2).mean(-1).T
        return errors if self.config.include_untrained else errors.masked_fill(~self.trained, math.inf)

    def decide(self, errors: torch.Tensor) -> torch.Tensor:
        """Per row of `errors` (see `reconstruction_errors`): the task whose autoencoder fits best, or -1."""
        best = errors.argmin(-1)
        task = best - 1
        limit = self.thresholds[task.clamp_min(0)]
        fits = errors.gather(-1, best.unsqueeze(-1)).squeeze(-1) <= limit
        return torch.where((best > 0) & fits, task, torch.full_like(task, ZERO_SHOT))

    @torch.no_grad()
    def choose(self, model, pixels: torch.Tensor, untouched_model: Callable[[], ContextManager],
               alexnet: Optional[nn.Module] = None, untouched: Untouched = None, unit: Optional[int] = None
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Untouched]:
        """The routes of `pixels`, from one computation of every autoencoder's errors on their features (see
        `features.selector_features`, whose arguments these are): per image, per `unit` consecutive images when a
        `unit` is given (the official protocol's decision per test batch), and the untouched CLIP's embeddings of
        the images (or the function that finishes them). The tuner's own forward and `TaskAgnosticClassifier`
        both choose here."""
        features, untouched = selector_features(self.config, model, pixels, untouched_model, alexnet, untouched)
        errors = self.reconstruction_errors(features)
        return self.decide(errors), None if unit is None else self.select_units(errors, unit), untouched

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Per image: the task whose autoencoder fits best, or -1 (zero-shot) for the reference or a poor fit."""
        return self.decide(self.reconstruction_errors(features))

    def select_units(self, errors: torch.Tensor, unit: int) -> torch.Tensor:
        """One decision per consecutive `unit` rows of `errors` (the last unit may be shorter), from their mean
        errors: the official protocol's decision per test batch, whatever batches the images were encoded in."""
        rows = errors.shape[0]
        starts = torch.arange(0, rows, unit, device=errors.device)
        sizes = (rows - starts).clamp(max=unit).unsqueeze(1)
        sums = errors.new_zeros(len(starts), errors.shape[1])
        sums.index_add_(0, torch.arange(rows, device=errors.device) // unit, errors)
        return self.decide(sums / sizes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Values no selector can have are refused before anything is copied (the copy would turn a float `trained`
        into booleans). A selector saved by hf-moe-cl <= 0.2 was stacked by the tuner's loader before this."""
        problems = _saved_selector_problems({name: state_dict[prefix + name] for name in SELECTOR_TENSORS
                                             if prefix + name in state_dict})
        if problems:
            adapter = prefix.rstrip(".").rpartition(".")[-1]  # the selector's key in the tuner: the adapter's name
            owner = f"of adapter {adapter!r} in its weights (adapter_model.safetensors)" if adapter else "state loaded"
            raise ValueError(f"The DDAS selector {owner} has " + "; ".join(problems) + ": the file was damaged or "
                             "edited. Save the adapter again, or refit the selector.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _saved_selector_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """What no selector can hold (a threshold of 0 or NaN would send every image to zero-shot)."""
    problems = []
    for name, value in tensors.items():
        if name == "trained":
            if value.dtype != torch.bool:
                problems.append(f"`trained` of dtype {value.dtype} (it holds booleans: which autoencoders are trained)")
        elif not value.dtype.is_floating_point:
            problems.append(f"`{name}` of dtype {value.dtype} (floating point)")
        elif name == "thresholds":
            if not bool((value > 0).all()):
                problems.append(f"thresholds {value.tolist()} (each must be positive, +inf for no limit)")
        elif not bool(torch.isfinite(value).all()):
            problems.append(f"non-finite values in `{name}`")
        elif name == "feature_scale" and not bool((value > 0).all()):
            problems.append("a feature_scale that is not positive")
    return problems


def _tensor_of(autoencoder: FeatureAutoencoder, name: str) -> torch.Tensor:
    """One of `AUTOENCODER_TENSORS` of a module autoencoder."""
    part, kind = name.split("_")
    return getattr(getattr(autoencoder, part), kind)
