"""What DDAS looks at: image features from the untouched CLIP, or from ImageNet AlexNet as the paper does.

None of these extractors changes as tasks are learned, so a task's autoencoder keeps fitting its task's images.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 weights
ALEXNET_INPUT = 224
ALEXNET_FEATURES = 256 * 13 * 13  # conv5 at 224 px


@torch.no_grad()
def vision_prefix(vision_model, pixel_values: torch.Tensor, blocks: int) -> torch.Tensor:
    """Hidden states of a CLIP vision tower after its first `blocks` encoder blocks (pre-LN applied)."""
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    for block in vision_model.encoder.layers[:blocks]:
        hidden = block(hidden, None)
    return hidden


def prefix_features(hidden: torch.Tensor) -> torch.Tensor:
    """DDAS features of a vision prefix: token 0 and the mean patch token, concatenated."""
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1).float()


class AlexNetFeatures(nn.Module):
    """The official DDAS extractor: ImageNet AlexNet's `features[:-2]` (conv5 before its ReLU and max-pool) on the
    CLIP-normalised 224 px image, flattened to 43,264 values and squashed by a sigmoid.

    Built here layer for layer as torchvision's AlexNet (same module indices, so its state dict loads) without
    importing torchvision. `weights` is a state dict, a path to one, a URL (default: torchvision's ImageNet
    weights, downloaded once into torch's hub cache) or None for random weights (tests only). Images of another
    size are resized to 224 px first.
    """

    def __init__(self, weights: Optional[object] = ALEXNET_URL):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
        )
        if weights is not None:
            self.load_weights(weights)
        self.requires_grad_(False).eval()

    def load_weights(self, weights) -> None:
        if isinstance(weights, str) and weights.startswith(("http://", "https://")):
            weights = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=False)
        elif not isinstance(weights, dict):
            weights = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in weights.items() if k.startswith("features.")}
        expected = set(self.features.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"The AlexNet weights lack {missing}; give torchvision's AlexNet state dict "
                             f"(e.g. {ALEXNET_URL}).")
        self.features.load_state_dict({k: state[k] for k in expected})

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-1] != ALEXNET_INPUT or pixel_values.shape[-2] != ALEXNET_INPUT:
            pixel_values = F.interpolate(pixel_values, size=(ALEXNET_INPUT, ALEXNET_INPUT), mode="bilinear",
                                         align_corners=False)
        weight = self.features[0].weight
        return torch.sigmoid(self.features(pixel_values.to(weight.device, weight.dtype)).flatten(1)).float()
