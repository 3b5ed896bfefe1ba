"""The official training loop of DDAS's autoencoders (MoE-Adapters4CL `mtil/src/models/AutoEncoder.py` lines 160-191,
`few_shot_AutoEncoder.py` lines 167-222).

Adam with weight decay 1e-4; before every step the learning rate is set to `lr * 0.1 ** (epoch // 10)` with
`epoch = iteration // batches_per_epoch` (their `exp_lr_scheduler`); `iterations + 1` steps (`range(total_iterations
+ 1)`), each on the next batch of a shuffled loader that is restarted at every epoch boundary and when it runs out;
loss `MSELoss` of the sigmoid output against the input. The autoencoder starts from PyTorch's default initialisation.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...tuners.moe_lora.selector import FeatureAutoencoder

LR_DECAY_EPOCHS = 10  # exp_lr_scheduler(lr_decay_epoch=10): AutoEncoder.py line 49


def official_learning_rate(lr: float, iteration: int, batches_per_epoch: int) -> float:
    """The learning rate of `iteration`: `lr * 0.1 ** ((iteration // batches_per_epoch) // 10)` (AutoEncoder.py
    lines 54 and 180)."""
    return lr * 0.1 ** ((iteration // batches_per_epoch) // LR_DECAY_EPOCHS)


def new_autoencoder(feature_dim: int, hidden_dim: int, sigmoid_output: bool, seed: int) -> FeatureAutoencoder:
    """An autoencoder with PyTorch's default initialisation (as the official `nn.Linear`s), drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureAutoencoder(feature_dim, hidden_dim, sigmoid_output)


def train_autoencoder(autoencoder: FeatureAutoencoder, loader: Iterable,
                      features: Optional[Callable[[object], torch.Tensor]],
                      iterations: int, lr: float, weight_decay: float, batches_per_epoch: int,
                      progress: Optional[str] = None) -> float:
    """Train `autoencoder` the official way on `features(batch)` of `loader`'s batches (the batches themselves
    with `features=None`); returns the last loss.

    `batches_per_epoch` is the number of batches of the whole training set (`len(dataset.train_loader)`): in
    few-shot the official loader holds only the few-shot images, but epochs are still counted over the whole set.
    """
    if iterations < 0 or batches_per_epoch < 1:
        raise ValueError(f"iterations must be >= 0 and batches_per_epoch >= 1, got {iterations} and "
                         f"{batches_per_epoch}.")
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    autoencoder.requires_grad_(True)
    autoencoder.train()
    loss = torch.tensor(math.nan)
    batches = iter(loader)
    with torch.enable_grad():
        for iteration in tqdm(range(iterations + 1), desc=progress, disable=progress is None, leave=False):
            if iteration and iteration % batches_per_epoch == 0:
                batches = iter(loader)
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = official_learning_rate(lr, iteration, batches_per_epoch)
            inputs = (batch if features is None else features(batch)).detach()
            loss = F.mse_loss(autoencoder(inputs), inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    autoencoder.requires_grad_(False)
    autoencoder.eval()
    return float(loss.detach())
