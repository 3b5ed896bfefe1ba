"""The base models the benchmarks run on: the assets' proxy CLIP, a randomly initialised CLIP of ViT-B/16's size
(timings only), or a tiny random CLIP (to run a benchmark's logic in seconds)."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

from hf_moe_cl.assets import PROXY_CLIP

MODELS = ("proxy-clip", "vit-b16-random", "tiny-random")


def vit_b16_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512,
    )


def tiny_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )


def load_model(name: str, assets) -> CLIPModel:
    if name == "proxy-clip":
        return CLIPModel.from_pretrained(assets / PROXY_CLIP, dtype=torch.float32)
    if name == "vit-b16-random":
        return CLIPModel(vit_b16_config())
    if name == "tiny-random":
        return CLIPModel(tiny_config())
    raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
