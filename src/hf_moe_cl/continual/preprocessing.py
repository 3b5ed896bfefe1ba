"""Batches of `image` + `label` examples turned into CLIP pixel values, whatever the image mode, with the official
training augmentation."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image

# Full-scale value of PIL's wide integer modes: 16-bit data (PNG, TIFF) opens as "I;16*" or, in older Pillow, "I".
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535}


def eight_bit(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Values 0..`full_scale` as uint8 0..255 (clipped, rounded)."""
    return np.round(np.clip(array / full_scale, 0.0, 1.0) * 255).astype(np.uint8)


def array_image(array: np.ndarray, channels_first: bool = False) -> Image.Image:
    """An array image as PIL reads it: (height, width) or (height, width, 1, 3 or 4), or channels first (1, 3 or 4,
    height, width: torch's and torchvision's layout; `channels_first` decides a shape that fits both), of uint8
    values 0..255 or floats 0..1 (torchvision's `to_tensor`); a 2-D float array is read as PIL reads an "F" image."""
    channels = (1, 3, 4)
    if array.ndim == 3 and array.shape[0] in channels and (channels_first or array.shape[-1] not in channels):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.dtype.kind == "f":
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(f"A float array image of shape {array.shape} has values outside 0..1 (or NaN): give "
                             "floats in 0..1, or uint8 values 0..255 (a.astype(np.uint8)).")
        array = eight_bit(array, 1.0)
    try:
        if array.ndim not in (2, 3):  # PIL would read a 1-D array as a one-row image
            raise TypeError
        return Image.fromarray(array)
    except TypeError:  # PIL: "Cannot handle this data type"
        raise ValueError(f"An array image of shape {array.shape} and dtype {array.dtype} is not one PIL reads: "
                         "give (height, width) or (height, width, 3 or 4) uint8 values 0..255 or floats 0..1, "
                         "channels last or first, or a PIL image.") from None


def to_rgb(image: Any) -> Image.Image:
    """Grayscale (MNIST), palette, RGBA, CMYK, 16-bit, array or undecoded images (a `datasets.Image(decode=False)`
    column's {"bytes", "path"}, opened as datasets decodes them) as 8-bit RGB PIL images; empty ones refused.

    Wide integer images are scaled by their bit depth (0..65535 -> 0..255), float images ("F") are read as 0..1;
    values are never stretched per image, so a uniform grey stays that grey.
    """
    if isinstance(image, dict):
        image = ImageFeature().decode_example({"bytes": image.get("bytes"), "path": image.get("path")})
    if isinstance(image, (torch.Tensor, np.ndarray)):  # tensors: channels first, as datasets and torchvision give them
        image = array_image(image.numpy(force=True) if isinstance(image, torch.Tensor) else image,
                            channels_first=isinstance(image, torch.Tensor))
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, a numpy array, a tensor or a datasets image dict, got "
                        f"{type(image).__name__}: drop or replace missing images (None).")
    if image.mode in WIDE_MODES or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"A {image.mode} image has {int(np.isnan(array).sum())} NaN and "
                             f"{int(np.isinf(array).sum())} infinite pixel value(s); they have no colour. Replace or "
                             "drop such images (check_images=True names the first one before training).")
        image = Image.fromarray(eight_bit(array, WIDE_MODES.get(image.mode, 1.0)))
    if 0 in image.size:
        raise ValueError(f"An image of {image.width}x{image.height} pixels has nothing to classify: drop it, or check "
                         "how it was made (a crop outside the picture?).")
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


class RandomResizedCrop:
    """torchvision's `RandomResizedCrop` on PIL images, without torchvision: a crop of `scale` of the area and an
    aspect ratio log-uniform in `ratio`, resized to `size` (bicubic). The official training transform is
    `RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=bicubic)`. Draws from torch's RNG, so seeded runs repeat.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCrop scale must satisfy 0 < low <= high <= 1, got {scale}.")
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,)).item()
                left = torch.randint(0, width - w + 1, (1,)).item()
                return left, top, left + w, top + h
        aspect = width / height  # fallback: the central crop with the nearest allowed aspect ratio
        w, h = ((width, int(round(width / min(self.ratio)))) if aspect < min(self.ratio) else
                (int(round(height * max(self.ratio))), height) if aspect > max(self.ratio) else (width, height))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize((self.size, self.size), Image.BICUBIC, box=self.box(*image.size))


def training_augmentation(image_processor, name: Optional[str]) -> Optional[RandomResizedCrop]:
    """The training augmentation `name` (`ContinualTrainingArguments.train_augmentation`) for this processor's input
    size: the official `RandomResizedCrop(size, scale=(0.9, 1.0))`, or None for 'none'."""
    return None if name in (None, "none") else RandomResizedCrop(image_processor.crop_size["height"], scale=(0.9, 1.0))


class ImageClassificationCollator:
    """Collates examples with `image` (or already preprocessed `pixel_values`) and `label` into `pixel_values` and
    `labels` for `ContinualTrainer`; `augment` (e.g. `RandomResizedCrop`) is applied to every RGB image before the
    image processor."""

    def __init__(self, image_processor, augment: Optional[Any] = None):
        self.image_processor = image_processor
        self.augment = augment

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "pixel_values" in examples[0]:  # preprocessed once and fixed (ConDU few-shot: augmented once)
            pixel_values = torch.stack([example["pixel_values"] for example in examples])
        else:
            images = [to_rgb(example["image"]) for example in examples]
            if self.augment is not None:
                images = [self.augment(image) for image in images]
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(example["label"]) for example in examples], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}
