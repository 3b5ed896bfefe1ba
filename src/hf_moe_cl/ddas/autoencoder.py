"""DDAS's autoencoder and the one loop that trains it, with its two schedules.

- 'official' (MoE-Adapters4CL `mtil/src/models/AutoEncoder.py` lines 160-191, `few_shot_AutoEncoder.py` lines
  167-222): PyTorch's default initialisation drawn from the seed; `steps + 1` iterations (`range(total_iterations +
  1)`), each on the next batch of a shuffled loader that is restarted at every epoch boundary and when it runs out;
  before every step the learning rate is `lr * 0.1 ** (epoch // 10)` with `epoch = iteration // batches_per_epoch`
  (their `exp_lr_scheduler`); loss `MSELoss` of the output against the input.
- 'sampled': a seeded uniform initialisation; `steps` iterations at a constant rate, each on a batch drawn with
  replacement from features computed once; loss the mean per-image error.

Both use Adam (with `weight_decay`: official 1e-4).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

LR_DECAY_EPOCHS = 10  # exp_lr_scheduler(lr_decay_epoch=10): AutoEncoder.py line 49


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


def official_learning_rate(lr: float, iteration: int, batches_per_epoch: int) -> float:
    """The learning rate of `iteration`: `lr * 0.1 ** ((iteration // batches_per_epoch) // 10)` (AutoEncoder.py
    lines 54 and 180)."""
    return lr * 0.1 ** ((iteration // batches_per_epoch) // LR_DECAY_EPOCHS)


def epoch_batches(loader: Iterable, batches_per_epoch: int) -> Callable[[int], torch.Tensor]:
    """The official order: the next batch of `loader`, restarted at every epoch boundary (`batches_per_epoch`
    counts the whole training set's batches: in few-shot the loader holds fewer) and when it runs out."""
    state = {}

    def next_batch(iteration: int) -> torch.Tensor:
        if "batches" not in state or (iteration and iteration % batches_per_epoch == 0):
            state["batches"] = iter(loader)
        try:
            return next(state["batches"])
        except StopIteration:
            state["batches"] = iter(loader)
            return next(state["batches"])

    return next_batch


def fit_autoencoder(feature_dim: int, hidden_dim: int, sigmoid_output: bool, data, steps: int, lr: float,
                    weight_decay: float, seed: int, schedule: str = "sampled", batch_size: int = 64,
                    batches_per_epoch: int = 1, device=None, progress: Optional[str] = None) -> FeatureAutoencoder:
    """A new autoencoder trained with one of the two schedules: 'official' on the feature batches of the loader
    `data` (the official initialisation and order, see the module), 'sampled' on batches of `batch_size` drawn
    with replacement from the feature tensor `data` (the seed draws the initialisation, then the batches)."""
    if schedule == "official":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            autoencoder = FeatureAutoencoder(feature_dim, hidden_dim, sigmoid_output).to(device)
        next_batch = epoch_batches(data, batches_per_epoch)
    else:
        if data.shape[0] == 0:
            raise ValueError("Cannot train a DDAS autoencoder on zero images: the task's dataset is empty.")
        autoencoder = FeatureAutoencoder(feature_dim, hidden_dim, sigmoid_output).to(data.device)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (autoencoder.encoder, autoencoder.decoder):
                bound = 1.0 / math.sqrt(linear.in_features)
                for param in (linear.weight, linear.bias):
                    param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
        size = min(batch_size, data.shape[0])

        def next_batch(iteration: int) -> torch.Tensor:
            return data[torch.randint(0, data.shape[0], (size,), generator=generator).to(data.device)]
    train_autoencoder(autoencoder, next_batch, steps, lr, weight_decay, schedule, batches_per_epoch, progress)
    return autoencoder


def train_autoencoder(autoencoder: FeatureAutoencoder, next_batch: Callable[[int], torch.Tensor], steps: int,
                      lr: float, weight_decay: float, schedule: str, batches_per_epoch: int = 1,
                      progress: Optional[str] = None) -> float:
    """Train `autoencoder` on `next_batch(iteration)` (feature batches) with one of the two schedules; returns the
    last loss."""
    if steps < 0 or batches_per_epoch < 1:
        raise ValueError(f"steps must be >= 0 and batches_per_epoch >= 1, got {steps} and {batches_per_epoch}.")
    official = schedule == "official"
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    autoencoder.requires_grad_(True).train()
    loss = torch.tensor(math.nan)
    with torch.enable_grad():
        for iteration in tqdm(range(steps + official), desc=progress, disable=progress is None, leave=False):
            inputs = next_batch(iteration).detach()
            if official:
                for group in optimizer.param_groups:
                    group["lr"] = official_learning_rate(lr, iteration, batches_per_epoch)
                loss = F.mse_loss(autoencoder(inputs), inputs)
            else:
                loss = autoencoder.errors(inputs).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    autoencoder.requires_grad_(False).eval()
    if not all(bool(torch.isfinite(param).all()) for param in autoencoder.parameters()):
        raise FloatingPointError(f"A DDAS autoencoder diverged: its weights are NaN or infinite after {steps} steps at "
                                 f"learning rate {lr:g}. Lower ddas_learning_rate (official: 1e-3).")
    return float(loss.detach())
