"""What DDAS looks at: image features from the untouched CLIP, or from ImageNet AlexNet as the paper does.

None of these extractors changes as tasks are learned, so a task's autoencoder keeps fitting its task's images.
`selector_features` is the one place they are computed: for fitting, for the tuner's own selection in a forward,
and for classifying without a task id.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..classification import Untouched, image_embeddings
from .settings import ALEXNET_URL, SelectorConfig

ALEXNET_INPUT = 224


@torch.no_grad()
def _finish_untouched(model, untouched_model: Callable[[], ContextManager], prefix: torch.Tensor, blocks: int,
                      rows: torch.Tensor) -> torch.Tensor:
    vision = model.vision_model
    hidden = prefix[rows]
    with untouched_model():
        for block in vision.encoder.layers[blocks:]:
            hidden = block(hidden, None)
        pooled = vision.post_layernorm(hidden[:, 0])
        return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def selector_features(config: SelectorConfig, model, pixels: torch.Tensor,
                      untouched_model: Callable[[], ContextManager], alexnet: Optional[nn.Module] = None,
                      untouched: Untouched = None) -> tuple[torch.Tensor, Untouched]:
    """The selector's features of `pixels`, and the untouched CLIP's embeddings of them for images sent to zero-shot:
    `untouched` when given (the caller encoded them already); the features themselves when they are the final
    embedding; after the first k blocks, a function of row indices that finishes the untouched pass for those rows
    only. `untouched_model()` is a context in which `model` runs without its adapter."""
    if config.feature_extractor == "alexnet":
        if alexnet is None:
            raise ValueError("This adapter's DDAS selector reads AlexNet features, which the model cannot compute by "
                             "itself: classify with TaskAgnosticClassifier (it loads them), or pass task_ids.")
        return alexnet(pixels), untouched
    if config.feature_layer is None:
        if untouched is None:
            with untouched_model():
                untouched = image_embeddings(model, pixels)
        return untouched, untouched
    vision = model.vision_model
    with untouched_model(), torch.no_grad():  # the hidden states after the first `feature_layer` blocks (pre-LN)
        prefix = vision.pre_layrnorm(vision.embeddings(pixels))
        for block in vision.encoder.layers[:config.feature_layer]:
            prefix = block(prefix, None)
    finish = partial(_finish_untouched, model, untouched_model, prefix, config.feature_layer)
    features = torch.cat([prefix[:, 0], prefix[:, 1:].mean(1)], dim=-1).float()  # token 0 and the mean patch token
    return features, untouched if untouched is not None else finish


class AlexNetFeatures(nn.Module):
    """The official DDAS extractor: ImageNet AlexNet's `features[:-2]` (conv5 before its ReLU and max-pool) on the
    CLIP-normalised 224 px image, flattened to 43,264 values and squashed by a sigmoid.

    Built here layer for layer as torchvision's AlexNet (same module indices, so its state dict loads) without
    importing torchvision. `weights` is a state dict, a path to one, a URL (default: torchvision's ImageNet
    weights, downloaded once into torch's hub cache and checked against the hash in their file name) or None for
    random weights (tests only). Images of another size are resized to 224 px first.
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
            weights = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=False, check_hash=True)
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


def load_alexnet(weights: Optional[str], device) -> AlexNetFeatures:
    """The AlexNet extractor with `weights` (`DDASArguments.ddas_alexnet_weights`) on `device`; a file or download
    that fails says what to do."""
    try:
        return AlexNetFeatures(weights).to(device)
    except (OSError, RuntimeError) as error:  # RuntimeError: a download whose bytes do not match its hash
        raise OSError(f"The DDAS AlexNet weights (ddas_alexnet_weights={weights!r}) cannot be loaded: {error}. "
                      "Download the file where there is a network and pass its path as "
                      "ddas_alexnet_weights.") from error
