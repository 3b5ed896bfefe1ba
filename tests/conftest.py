"""Tiny random CLIP models and a tiny BPE tokenizer built locally: the tests never reach the Hub."""

from __future__ import annotations

import json
import os
import string

import numpy as np

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, TrainerCallback

TEXT_VOCAB = 86  # matches tiny_tokenizer_dir: 84 symbols, then <|startoftext|>, <|endoftext|>


# ----- the shared assets (../shared/assets): tests that need them skip, with the reason, on a clone without them ------
def assets_present() -> bool:
    from hf_moe_cl.assets import AssetsNotFoundError, assets_dir

    try:
        return bool(assets_dir())
    except AssetsNotFoundError:
        return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_without_assets())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_without_assets())


def _skip_without_assets():
    """A test (or fixture) that asks for the default assets folder where there is none, itself or in a process it
    runs (whose output its failure shows), is skipped, naming it; with the assets there, the error is the test's own."""
    from hf_moe_cl.assets import AssetsNotFoundError

    try:
        return (yield)
    except Exception as error:
        missing = "(proxy CLIP, mini-MTIL tasks, reference images) does not exist"
        if assets_present() or not (isinstance(error, AssetsNotFoundError) or missing in str(error)):
            raise
        pytest.skip(next(line for line in str(error).splitlines() if missing in line).strip())


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


class StopAtTask(TrainerCallback):
    """Interrupts a continual run when task `name` starts training (a run stopped midway, to resume)."""

    def __init__(self, trainer, name):
        self.trainer, self.name = trainer, name

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.current_task.name == self.name:
            raise KeyboardInterrupt("simulated interruption")


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


def continual_args(output_dir, **overrides):
    """Small, quiet CPU training arguments for the task loop; `overrides` change any of them."""
    from hf_moe_cl import ContinualTrainingArguments  # here: scripts import this file without the library

    values = dict(output_dir=str(output_dir), max_steps=2, warmup_steps=1, learning_rate=5e-3, use_cpu=True,
                  per_device_train_batch_size=8, per_device_eval_batch_size=32, report_to="none", disable_tqdm=True,
                  logging_strategy="no", seed=3)
    values.update(overrides)
    return ContinualTrainingArguments(**values)


def moe_model(**overrides):
    """A tiny CLIP with a MoE-LoRA adapter: 2 tasks, 4 experts, top-2, rank 4 unless `overrides` say otherwise."""
    from peft import get_peft_model

    from hf_moe_cl import MoELoraConfig

    values = dict(num_tasks=2, num_experts=4, top_k=2, r=4)
    values.update(overrides)
    return get_peft_model(tiny_clip(), MoELoraConfig(**values))


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


def noise_images(n, seed):
    """`n` images of uniform noise: images of no task."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
                                        for _ in range(n)]})


@pytest.fixture(scope="session")
def module_processor(tmp_path_factory):
    return tiny_clip_processor(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def ddas_run(tmp_path_factory, module_processor):
    """One DDAS-enabled continual run (2 colour tasks, tiny CLIP) shared by the tests that only read it or save
    copies: (model, tasks, result, folder for their files)."""
    from hf_moe_cl.continual import ContinualTrainer
    from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters

    tmp_path = tmp_path_factory.mktemp("ddas")
    tasks = [colour_task("first", n_train=40, n_eval=12, seed=0),
             colour_task("second", n_train=40, n_eval=12, seed=1, offset=3)]
    model = moe_model()
    args = continual_args(tmp_path / "run", max_steps=3, task_agnostic_eval=True, seed=42)
    ddas = DDASArguments(ddas=True, ddas_task_steps=300, ddas_reference_steps=300, ddas_learning_rate=1e-2,
                         ddas_hidden_dim=16, ddas_quantile=1.0)
    method = MoEAdapters(model, ddas=ddas, ddas_reference=noise_images(60, 0))
    result = ContinualTrainer(method=method, args=args, processing_class=module_processor).train_tasks(tasks)
    return model, tasks, result, tmp_path


# ----- runs, output folders and saved adapters, used by the tests of several files -----------------------------------
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def tasks_named(*names):
    """Colour tasks named `names`, each with its own seed and colours."""
    return [colour_task(name, seed=i, offset=3 * i) for i, name in enumerate(names)]


def run(tmp_path, clip_processor, model=None, tasks=None, resume=False, **overrides):
    """A continual run of `tasks` (by default two colour tasks, 'first' and 'second') on `model` (by default a fresh
    `moe_model()`) into `tmp_path`; `overrides` change the training arguments."""
    from hf_moe_cl import ContinualTrainer

    trainer = ContinualTrainer(model=model or moe_model(), args=continual_args(tmp_path, **overrides),
                               processing_class=clip_processor)
    return trainer.train_tasks(tasks or tasks_named("first", "second"), resume=resume)


def trainer_for(output_dir, processor, **overrides):
    """A ContinualTrainer of a fresh `moe_model()` for one step per task; `overrides` change the training arguments."""
    from hf_moe_cl import ContinualTrainer

    return ContinualTrainer(model=moe_model(), args=continual_args(output_dir, max_steps=1, **overrides),
                            processing_class=processor)


def tree_bytes(root):
    """Every file under `root` (relative path -> bytes) and every folder (-> None)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def saved(folder, model):
    """`model` saved to `folder` (returned)."""
    model.save_pretrained(folder)
    return folder


def edited(source, folder, config=None, tensors=None):
    """A copy of the adapter folder `source` with `config` values and `tensors` (name suffix -> new value) replaced; a
    config edit is one made on purpose (`settings_sha256` None), so it meets the checks of values."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    if config is not None:
        values = json.loads((folder / "adapter_config.json").read_text())
        values.update(settings_sha256=None, **config)
        (folder / "adapter_config.json").write_text(json.dumps(values))
    if tensors is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        for suffix, value in tensors.items():
            weights[next(k for k in weights if k.endswith(suffix))] = value
        save_file(weights, folder / "adapter_model.safetensors")
        rerecord(folder)
    return folder


def rerecord(folder, file="adapter_config.json"):
    """Write the sha256 of `folder`'s edited files into its record (`file_sha256` in `file`), as a save does: the edit
    then meets the checks of values, not the integrity check."""
    from hf_moe_cl.files import file_hashes

    path = folder / file
    values = json.loads(path.read_text())
    values["file_sha256"] = file_hashes(folder, values["file_sha256"])
    path.write_text(json.dumps(values))


def flip_lowest_bits(path, every=4):
    """Flip the lowest bit of every `every`-th byte of a safetensors file's data (float32: the lowest bit of each
    value): the size and the header stay, the values are a hair off."""
    data = bytearray(path.read_bytes())
    for i in range(8 + int.from_bytes(data[:8], "little"), len(data), every):
        data[i] ^= 1
    path.write_bytes(bytes(data))


def load_peft(folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_clip(), str(folder))
