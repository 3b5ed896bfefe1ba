"""Tiny random CLIP models and a tiny BPE tokenizer built locally: the tests never reach the Hub."""

from __future__ import annotations

import json
import string

import numpy as np

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

TEXT_VOCAB = 86  # matches tiny_tokenizer_dir: 84 symbols, then <|startoftext|>, <|endoftext|>


def tiny_clip_config(vision_width: int = 48, text_width: int = 32) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=TEXT_VOCAB,
            max_position_embeddings=16,
            bos_token_id=TEXT_VOCAB - 2,
            eos_token_id=TEXT_VOCAB - 1,
            pad_token_id=TEXT_VOCAB - 1,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )


def tiny_clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


@pytest.fixture
def clip_inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, TEXT_VOCAB - 2, (4, 6), generator=generator),
        "pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
    }


def write_tiny_tokenizer(tmp_path):
    """A character-level CLIP BPE tokenizer (letters, digits, punctuation) written to disk."""
    symbols = list(string.ascii_lowercase + string.digits + ".,:'\"-")
    vocab = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return tmp_path


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    return write_tiny_tokenizer(tmp_path)


PALETTE = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]


def colour_task(name, num_classes=3, n_train=24, n_eval=12, seed=0, mode="RGB", offset=0):
    """A learnable task: the class is the image's colour (with noise)."""
    from datasets import Dataset
    from PIL import Image

    from hf_moe_cl.continual import ContinualTask

    rng = np.random.default_rng(seed)

    def split(n):
        labels = [i % num_classes for i in range(n)]
        images = []
        for label in labels:
            colour = np.array(PALETTE[(label + offset) % len(PALETTE)], dtype=np.float32)
            pixels = np.clip(colour + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels).convert(mode))
        return Dataset.from_dict({"image": images, "label": labels})

    names = ["red", "green", "blue", "yellow", "cyan", "magenta"]
    classnames = [names[(i + offset) % len(names)] for i in range(num_classes)]
    return ContinualTask(name=name, train_dataset=split(n_train), eval_dataset=split(n_eval), classnames=classnames,
                         templates=["a photo of {}.", "{} colour."])


def tiny_clip_processor(tokenizer_dir):
    """A CLIPProcessor for the tiny CLIPs: 16 px images, the tiny tokenizer in `tokenizer_dir`."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture
def clip_processor(tiny_tokenizer_dir):
    return tiny_clip_processor(tiny_tokenizer_dir)
