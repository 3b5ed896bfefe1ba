"""Tiny random CLIP models and a tiny BPE tokenizer built locally: the tests never reach the Hub."""

from __future__ import annotations

import json
import string

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


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
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
