"""Routing: which task router each image goes through. A task id is one integer (`set_task`, `routing()`), per-sample
task ids a 1-D integer tensor of one id per sample; anything else is refused, integer-like ids route like an int.
No silent fallback to the untouched CLIP: an adapter with a trained selector routes each image through it when no
task is given, training or inference without a route is an error that says what to pass (every entry point); the
plain `Trainer` trains MoE-LoRA with a per-sample `task_ids` column."""

from __future__ import annotations


import numpy as np
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


def test_every_entry_point_refuses_a_call_without_a_route_and_zero_shot_is_explicit(tmp_path, clip_processor):
    """A saved 2-task adapter without a selector, loaded with peft or through transformers' zero-shot pipeline, refuses
    to answer as the untouched CLIP; set_task(None) gives the untouched CLIP's answers on purpose (through a pipeline:
    the base model's folder)."""
    from PIL import Image
    from transformers import pipeline

    tiny_clip().save_pretrained(tmp_path / "base")
    clip_processor.save_pretrained(tmp_path / "base")
    model = moe_model(init_weights=False)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    clip_processor.save_pretrained(tmp_path / "adapter")
    refused = r"2 task routers and no route was chosen.*task_ids.*set_task\(t\).*DDAS selector"
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter").eval()
    inputs = clip_processor(text=["red", "blue"], images=[Image.new("RGB", (20, 20), "red")], return_tensors="pt",
                            padding=True)
    with pytest.raises(ValueError, match=refused):
        loaded(**inputs)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=refused):
        classifier(Image.new("RGB", (20, 20), "red"), candidate_labels=["red", "blue"])
    loaded.set_task(None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, tiny_clip()(**inputs).logits_per_image)


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


# ----- task ids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, message", [
    (1.7, "must be an integer"), (1.0, "must be an integer"), (True, "boolean"), ("1", "must be an integer"),
    (torch.tensor(1.0), "must be an integer"), (5, "out of range"),
    (torch.tensor(1, device="meta"), "A task id must have a value; got a tensor on the meta device"),
])
def test_bad_task_ids_are_refused(task, message):
    with pytest.raises(ValueError, match=message):
        moe_model(num_tasks=3).set_task(task)


@pytest.mark.parametrize("task", [np.int64(1), torch.tensor(1), 1])
def test_integer_like_task_ids_route_like_an_int(task, clip_inputs):
    model = moe_model(num_tasks=3, init_weights=False).eval()
    model.set_task(1)
    with torch.no_grad():
        expected = model(**clip_inputs).logits_per_image
        model.set_task(task)
        assert model.base_model.active_task == 1
        assert torch.equal(model(**clip_inputs).logits_per_image, expected)


@pytest.mark.parametrize("call", [
    lambda model: model.set_task(torch.tensor([1])),
    lambda model: model.set_task([1]),
    lambda model: model.base_model.routing([0, 1, 1, 0]).__enter__(),
])
def test_several_task_ids_where_one_is_expected_are_refused(call):
    model = moe_model()
    model.set_task(1)
    with pytest.raises(ValueError, match="A task id must be one integer, got .*per-sample task ids go to routing"):
        call(model)
    assert model.base_model.active_task == 1  # unchanged


def test_float_task_id_tensors_are_refused(clip_inputs):
    with pytest.raises(ValueError, match="integer tensor"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=torch.tensor([0.0, 1.0, 1.0, 2.0]))


@pytest.mark.parametrize("task_ids", [
    torch.tensor([[0, 1], [1, 0]]), torch.tensor([], dtype=torch.long), torch.zeros(4, dtype=torch.long,
                                                                                    device="meta"),
    torch.tensor([[0, 1, 1, 0]]),
])
def test_task_ids_of_another_shape_or_without_values_are_refused(task_ids, clip_inputs):
    with pytest.raises(ValueError, match=r"task_ids must be a non-empty 1-D tensor with values .* got shape"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=task_ids)


def test_task_ids_for_another_batch_size_are_refused(clip_inputs):
    with pytest.raises(ValueError, match="3 task ids were given for a batch of 4 samples"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("selections", ["x", [], ()])
def test_selections_that_are_not_a_dict_are_refused_before_the_forward(selections, clip_inputs):
    model = moe_model(num_tasks=3).eval()
    for task_ids in (1, torch.tensor([0, 1, 1, 0])):
        with pytest.raises(ValueError, match=f"selections must be a dict .* got {type(selections).__name__}"):
            model.base_model.routing(task_ids, selections=selections).__enter__()
        assert not model.base_model._call_routes
