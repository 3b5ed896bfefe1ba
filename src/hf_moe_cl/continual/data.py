"""Batches of `image` + `label` examples turned into CLIP pixel values, whatever the image mode."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Any) -> Image.Image:
    """Grayscale (MNIST), palette, RGBA, CMYK, 16-bit or array images as 8-bit RGB PIL images."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


class ImageClassificationCollator:
    """Collates examples with `image` and `label` into `pixel_values` and `labels` for `ContinualTrainer`."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [to_rgb(example["image"]) for example in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(example["label"]) for example in examples], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}
