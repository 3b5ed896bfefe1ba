"""No silent fallback to the untouched CLIP: an adapter with a trained selector routes each image through it when no
task is given, training without a route is an error that says what to pass, inference without one warns once; the
plain `Trainer` trains MoE-LoRA with a per-sample `task_ids` column."""

from __future__ import annotations


import pytest
import torch
from conftest import TEXT_VOCAB, moe_model, tiny_clip
from datasets import Dataset
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from hf_moe_cl import SelectorConfig
from hf_moe_cl.classification import image_embeddings


def test_training_without_a_route_says_what_to_pass(clip_inputs):
    model = moe_model().train()  # two task routers, none chosen
    with pytest.raises(ValueError, match="pass task_ids=.*set_task"):
        model(**clip_inputs)
    model(**clip_inputs, task_ids=torch.tensor([0, 1, 1, 0])).logits_per_image.sum().backward()


def test_a_call_without_a_route_is_refused_and_the_untouched_model_is_an_explicit_choice(clip_inputs):
    """A model with several task routers, no selector and no task chosen would answer as the untouched CLIP: it is
    refused, in training and inference alike, naming set_task, task_ids and the selector; set_task(None) is the
    explicit zero-shot route."""
    model = moe_model(init_weights=False).eval()
    base = tiny_clip().eval()
    for training in (False, True):
        model.train(training)
        with pytest.raises(ValueError, match=r"no route was chosen.*task_ids.*set_task\(t\).*DDAS selector"):
            model(**clip_inputs)
    model.eval()
    model.set_task(None)
    with torch.no_grad():
        torch.testing.assert_close(model(**clip_inputs).logits_per_image, base(**clip_inputs).logits_per_image)


def selector_model(tmp_path):
    """A saved 2-task adapter whose selector sends half of the images to task 0 and the rest to task 1."""
    model = moe_model(init_weights=False).eval()
    selector = model.base_model.enable_selector(SelectorConfig(feature_dim=16, hidden_dim=8))
    pixels = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pixels[20:] += 3.0
    with model.base_model.routing(None):
        features = image_embeddings(model, pixels)
    selector.fit_reference(torch.randn(200, 16) * 5, steps=200, lr=1e-2)
    selector.fit_task(0, features[:20], steps=300, lr=1e-2, threshold=float("inf"))
    selector.fit_task(1, features[20:], steps=300, lr=1e-2, threshold=float("inf"))
    model.save_pretrained(tmp_path / "adapter")
    return pixels, selector.select(features)


def test_a_loaded_adapter_with_a_selector_routes_each_image(tmp_path):
    pixels, routes = selector_model(tmp_path)
    assert set(routes.tolist()) == {0, 1}
    loaded = PeftModel.from_pretrained(tiny_clip(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        automatic = loaded.get_image_features(pixel_values=pixels).pooler_output
        with loaded.base_model.routing(routes):
            explicit = loaded.get_image_features(pixel_values=pixels).pooler_output
        with loaded.base_model.routing(None):
            untouched = loaded.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(automatic, explicit)
    assert not torch.allclose(automatic, untouched)
    text = torch.randint(0, TEXT_VOCAB - 2, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # images of one task: its text features too
        one_task = loaded(input_ids=text, pixel_values=pixels[routes == 1]).logits_per_image
        with loaded.base_model.routing(1):
            expected = loaded(input_ids=text, pixel_values=pixels[routes == 1]).logits_per_image
    torch.testing.assert_close(one_task, expected)
    with pytest.raises(ValueError, match="different tasks"), torch.no_grad():
        loaded(input_ids=text, pixel_values=pixels)


def test_the_plain_trainer_trains_with_a_task_ids_column(tmp_path):
    model = moe_model()
    generator = torch.Generator().manual_seed(0)
    rows = 16
    data = Dataset.from_dict({
        "pixel_values": torch.randn(rows, 3, 16, 16, generator=generator).tolist(),
        "input_ids": torch.randint(0, TEXT_VOCAB - 2, (rows, 6), generator=generator).tolist(),
        "task_ids": [i % 2 for i in range(rows)],
    }).with_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", remove_unused_columns=False, learning_rate=1e-2,
                             disable_tqdm=True, save_strategy="no")

    class ContrastiveTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs, return_loss=True)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    ContrastiveTrainer(model=model, args=args, train_dataset=data).train()
    counts = model.base_model.selection_counts()
    assert all(int(c[0].sum()) > 0 and int(c[1].sum()) > 0 for c in counts.values())
