"""Task-agnostic inference as a transformers pipeline, and loading a published adapter with nothing but its folder."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from PIL import Image
from peft import get_peft_model
from transformers import CLIPImageProcessor, CLIPModel, pipeline

from hf_moe_cl import MoELoraConfig, SelectorConfig, TaskAgnosticClassifier, TaskAgnosticImageClassificationPipeline
from hf_moe_cl.assets import assets_dir
from hf_moe_cl.continual.methods import MoEAdapters

from conftest import moe_model, noise_images, saved, tiny_clip

TASK = "task-agnostic-image-classification"


def mixed_images(tasks):
    return (list(tasks[0].eval_dataset["image"][:4]) + list(tasks[1].eval_dataset["image"][:4])
            + list(noise_images(4, 9)["image"]))


def test_pipeline_answers_as_the_classifier_does_in_batches(ddas_run, module_processor):
    model, tasks, _, _ = ddas_run
    images = mixed_images(tasks)
    expected = TaskAgnosticClassifier(model, module_processor)(images, candidate_labels=["noise", "static"])
    assert {o["task"] for o in expected} == {"first", "second", None}  # both tasks and the fallback are exercised
    classify = pipeline(TASK, model=model, processor=module_processor)
    assert isinstance(classify, TaskAgnosticImageClassificationPipeline) and classify.device == model.device
    for batch_size in (1, 5):
        out = classify(images, candidate_labels=["noise", "static"], batch_size=batch_size)
        assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]
        assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-5)
    single = classify(images[0], candidate_labels=["noise", "static"], hypothesis_template=["{} noise.", "{}."])
    assert (single["label"], single["task"]) == (expected[0]["label"], expected[0]["task"])
    with pytest.raises(ValueError, match="candidate_labels"):
        classify(images[8:], batch_size=4)  # noise images belong to no learned task
    with pytest.raises(ValueError, match="processor=CLIPProcessor"):
        pipeline(TASK, model=model)  # a loaded tiny model names no processor to load


def test_a_tuple_or_a_datasets_column_of_images_is_a_batch_to_the_pipeline(ddas_run, module_processor):
    """transformers' `Pipeline` takes only a list for a batch: a tuple or `dataset["image"]` (a `datasets` Column)
    was read as one image and refused."""
    from datasets import Dataset

    model, tasks, _, _ = ddas_run
    images = mixed_images(tasks)[2:10]
    expected = TaskAgnosticClassifier(model, module_processor)(images, candidate_labels=["noise", "static"])
    classify = pipeline(TASK, model=model, processor=module_processor)
    for batch in (tuple(images), Dataset.from_dict({"image": images})["image"]):
        out = classify(batch, candidate_labels=["noise", "static"], batch_size=3)
        assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]
        assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-6)


def test_pipeline_refuses_a_model_without_selector(module_processor):
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=1, num_experts=2, r=2))
    with pytest.raises(ValueError, match="DDAS selector"):
        pipeline(TASK, model=model, tokenizer=module_processor.tokenizer,
                 image_processor=module_processor.image_processor)


@pytest.fixture(scope="module")
def proxy_adapter(tmp_path_factory):
    """A MoE-LoRA adapter on the shared proxy CLIP (stored in float16) whose selector knows cifar10: saved to a
    folder whose adapter config names the base model's path."""
    root = assets_dir()
    clip = CLIPModel.from_pretrained(root / "proxy-clip", dtype=torch.float32)
    model = get_peft_model(clip, MoELoraConfig(num_tasks=1, num_experts=2, r=2)).eval()
    selector = model.base_model.enable_selector(SelectorConfig(feature_dim=clip.config.projection_dim, hidden_dim=16))
    meta = json.loads((root / "mini-mtil" / "cifar10" / "task.json").read_text())
    cifar = list(load_from_disk(str(root / "mini-mtil" / "cifar10"))["test"]["image"][:32])
    pixels = CLIPImageProcessor.from_pretrained(root / "proxy-clip")(
        images=cifar + list(noise_images(32, 1)["image"]), return_tensors="pt")["pixel_values"]
    features = MoEAdapters(model).selector_features(pixels)[0]
    selector.fit_reference(features[32:], steps=100, lr=1e-2)
    selector.fit_task(0, features[:32], steps=100, lr=1e-2, threshold=float("inf"))
    model.base_model.set_task_info(0, "cifar10", meta["classnames"], meta["templates"])
    folder = tmp_path_factory.mktemp("proxy") / "adapter"
    model.save_pretrained(folder)
    return folder, cifar[:6] + list(noise_images(2, 2)["image"])


def test_from_pretrained_needs_only_the_adapter_and_loads_float32(proxy_adapter):
    folder, images = proxy_adapter
    root = assets_dir()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "proxy-clip")
    assert CLIPModel.from_pretrained(root / "proxy-clip").dtype == torch.float16  # what the checkpoint stores
    classifier = TaskAgnosticClassifier.from_pretrained(str(folder))
    assert {p.dtype for p in classifier.method.model.parameters()} == {torch.float32}
    expected = classifier(images, candidate_labels=["noise", "static"])
    assert {o["task"] for o in expected} == {"cifar10", None}
    explicit = TaskAgnosticClassifier.from_pretrained(str(folder), base_model_name_or_path=str(root / "proxy-clip"))
    assert explicit(images, candidate_labels=["noise", "static"]) == expected
    classify = pipeline(TASK, model=str(folder))  # base model, tokenizer and image processor from the adapter
    assert {p.dtype for p in classify.model.parameters()} == {torch.float32}
    out = classify(images, candidate_labels=["noise", "static"], batch_size=4)
    assert [(o["label"], o["task"]) for o in out] == [(o["label"], o["task"]) for o in expected]


def test_an_adapter_config_without_base_model_is_a_clear_error(proxy_adapter, tmp_path):
    folder, _ = proxy_adapter
    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_model_name_or_path="):
        TaskAgnosticClassifier.from_pretrained(str(copy))


def test_the_pipeline_loader_passes_the_subfolder_on(tmp_path):
    """`MoELoraCLIP.from_pretrained(root, subfolder=...)` loads the adapter of the subfolder (it used to be dropped
    after the source check, so the root was read instead)."""
    tiny_clip().save_pretrained(tmp_path / "base")
    model = moe_model()
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    saved(tmp_path / "root" / "adapter", model)
    from hf_moe_cl.pipeline import MoELoraCLIP

    loaded = MoELoraCLIP.from_pretrained(str(tmp_path / "root"), subfolder="adapter")
    assert loaded.peft_config["default"].num_tasks == 2


def test_a_missing_subfolder_of_a_folder_is_named(tmp_path):
    """The subfolder is named, not the folder (which exists; it was called neither a folder nor a repo id)."""
    from hf_moe_cl.pipeline import MoELoraCLIP

    (tmp_path / "root").mkdir()
    for load in (TaskAgnosticClassifier.from_pretrained, MoELoraCLIP.from_pretrained):
        with pytest.raises(FileNotFoundError, match=rf"The folder {tmp_path / 'root'} has no subfolder 'adapter': "
                                                    "give the subfolder the model was saved to"):
            load(str(tmp_path / "root"), subfolder="adapter")


# ----- TaskAgnosticClassifier.classify checks its inputs -------------------------------------------------------------
def selecting_model():
    """A MoE-LoRA model whose selector (its autoencoders as drawn) has the reference and task 0 trained."""
    model = moe_model()
    model.base_model.enable_selector(SelectorConfig(feature_dim=model.config.projection_dim)).trained[:2] = True
    model.base_model.set_task_info(0, "colours", ["red", "green"], ["a photo of a {}."])
    return model


@pytest.fixture(scope="module")
def agnostic_classifier(module_processor):
    from hf_moe_cl import TaskAgnosticClassifier

    return TaskAgnosticClassifier(selecting_model(), module_processor)


@pytest.mark.parametrize("labels, pixels, templates, message", [
    ([], None, None, "The zero-shot label set has no class names: pass `candidate_labels`"),
    (["cat", "cat"], None, None, r"duplicate class names \['cat'\]"),
    ("cat", None, None, "`candidate_labels` must be a list of class names .* one class per character"),
    (["cat", ""], None, None, "needs one non-empty class name"),
    (["cat"], None, ["a {} {}"], "the prompt template 'a {} {}' has 2 fields"),
    (["cat"], None, "a {}", "`templates` must be a non-empty list"),
    (["cat"], torch.randn(3, 16, 16), None, r"`pixels` must be a floating-point tensor .* got \(3, 16, 16\)"),
    (["cat"], torch.zeros(1, 3, 16, 16, dtype=torch.uint8), None, "`pixels` must be a floating-point tensor"),
    (["cat"], torch.full((1, 3, 16, 16), math.nan), None, "`pixels` holds NaN or infinite values"),
])
def test_classify_checks_its_labels_and_pixels_first(agnostic_classifier, labels, pixels, templates, message):
    pixels = torch.randn(2, 3, 16, 16) if pixels is None else pixels
    extra = {} if templates is None else {"templates": templates}
    with pytest.raises(ValueError, match=message):
        agnostic_classifier.classify(pixels, candidate_labels=labels, **extra)


def test_classify_of_an_empty_batch_is_an_empty_list(agnostic_classifier):
    assert agnostic_classifier.classify(torch.zeros(0, 3, 16, 16), candidate_labels=["cat"]) == []
    assert len(agnostic_classifier.classify(torch.randn(2, 3, 16, 16), candidate_labels=["cat", "dog"])) == 2


# ----- one image path: the pipeline reads images as the classifier does ---------------------------------------------
@pytest.fixture(scope="module")
def both_paths(module_processor):
    """(classifier, pipeline) over one MoE-LoRA model whose selector routes images."""
    model = selecting_model()
    return TaskAgnosticClassifier(model, module_processor), pipeline(TASK, model=model, processor=module_processor)


def test_the_pipeline_reads_16_bit_float_and_transparent_images_as_the_classifier(both_paths):
    classifier, classify = both_paths
    images = [Image.new("RGBA", (20, 20), (200, 30, 30, 0)),  # transparent: white, as in training
              Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 160),  # 16-bit ("I;16")
              Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20))]  # float ("F"), 0..1
    expected = classifier(images, candidate_labels=["cat", "dog"])
    out = classify(images, candidate_labels=["cat", "dog"])
    assert [o["score"] for o in out] == pytest.approx([o["score"] for o in expected], abs=1e-6)


def assert_both_paths_refuse(both_paths, image, error, message):
    """The classifier (a list of images) and the pipeline (one image) refuse `image` with the same error."""
    classifier, classify = both_paths
    with pytest.raises(error, match=message):
        classifier([image], candidate_labels=["cat"])
    with pytest.raises(error, match=message):
        classify(image, candidate_labels=["cat"])


@pytest.mark.parametrize("image, error, message", [
    (Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), ValueError, "A F image has 64 NaN"),
    (Image.new("RGB", (0, 0)), ValueError, "An image of 0x0 pixels has nothing to classify"),
    ("http://127.0.0.1:9/cat.png", ConnectionError,
     r"Cannot download the image http://127.0.0.1:9/cat.png \(URLError.*offline.*Pass a local path"),
])
def test_an_image_without_content_is_refused_the_same_by_both_paths(both_paths, image, error, message):
    assert_both_paths_refuse(both_paths, image, error, message)


def test_a_string_as_candidate_labels_is_refused_by_the_pipeline(both_paths):
    with pytest.raises(ValueError, match="`candidate_labels` must be a list of class names .* one class per character"):
        both_paths[1](Image.new("RGB", (8, 8)), candidate_labels="cat")


def test_float_channels_first_and_one_channel_arrays_read_as_their_uint8_image(both_paths):
    """What transformers' image processors and torchvision give (floats in 0..1, channels first, one channel) reads
    as the 8-bit image it stands for, through both paths (they were refused)."""
    classifier, classify = both_paths
    array = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    floats = array.astype(np.float32) / 255
    expected = classifier([Image.fromarray(array)], candidate_labels=["cat", "dog"])[0]
    for image in (floats, floats.astype(np.float64), array.transpose(2, 0, 1), floats.transpose(2, 0, 1),
                  torch.from_numpy(floats).permute(2, 0, 1), torch.from_numpy(array)):  # to_tensor; channels last
        assert classifier([image], candidate_labels=["cat", "dog"])[0] == expected
        assert classify(image, candidate_labels=["cat", "dog"])["score"] == pytest.approx(expected["score"], abs=1e-6)
    grey = array[..., 0]
    expected = classifier([Image.fromarray(grey)], candidate_labels=["cat", "dog"])
    for image in (grey[..., None], grey[None], torch.from_numpy(grey)[None]):
        assert classifier([image], candidate_labels=["cat", "dog"]) == expected


@pytest.mark.parametrize("image, message", [
    (np.full((16, 16, 3), 200.0, np.float32), r"A float array image of shape \(16, 16, 3\) has values outside 0..1"),
    (torch.full((3, 16, 16), math.nan), r"A float array image of shape \(16, 16, 3\) has values outside 0..1"),
    (np.zeros((16, 16, 3), np.int64), r"shape \(16, 16, 3\) and dtype int64 is not one PIL reads: give .* uint8"),
])
def test_an_array_image_pil_cannot_read_is_named_with_the_fix(both_paths, image, message):
    assert_both_paths_refuse(both_paths, image, ValueError, message)


def test_a_channels_first_tensor_image_reads_as_the_same_array(both_paths):
    classifier, _ = both_paths
    array = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    assert classifier([torch.from_numpy(array).permute(2, 0, 1)], candidate_labels=["cat", "dog"]) == \
        classifier([Image.fromarray(array)], candidate_labels=["cat", "dog"])


def test_one_image_not_in_a_list_or_a_missing_image_is_named(both_paths, tmp_path):
    classifier, classify = both_paths
    for images, kind in ((Image.new("RGB", (8, 8)), "Image"), (None, "NoneType"), ((i for i in []), "generator")):
        with pytest.raises(ValueError, match=rf"`images` must be a list of images, got {kind}: pass \[image\] for one, "
                                             r"list\(images\) for a generator"):
            classifier(images, candidate_labels=["cat"])
    with pytest.raises(TypeError, match=r"got NoneType: drop or replace missing images \(None\)"):
        classifier([None], candidate_labels=["cat"])
    missing = tmp_path / "no_such.png"
    for image in (missing, str(missing)):  # a path, given as text or as a Path
        with pytest.raises(FileNotFoundError, match=rf"The image file {missing} does not exist: check the path"):
            classifier([image], candidate_labels=["cat"])
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    assert classifier([tmp_path / "red.png"], candidate_labels=["cat"]) == \
        classifier([str(tmp_path / "red.png")], candidate_labels=["cat"])
    with pytest.raises(ValueError, match=r"An array image of shape \(5,\) and dtype uint8 is not one PIL reads"):
        classifier([np.zeros(5, dtype=np.uint8)], candidate_labels=["cat"])


def test_the_bytes_of_an_image_file_read_as_the_image(both_paths):
    """Encoded image data (bytes, bytearray, a binary file object) reads as the file would; other bytes are named
    (they were refused as if the image were missing)."""
    import io

    classifier, classify = both_paths
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    expected = classifier([image], candidate_labels=["cat", "dog"])[0]
    data = encoded.getvalue()
    assert classifier([data, bytearray(data), io.BytesIO(data)], candidate_labels=["cat", "dog"]) == [expected] * 3
    for one in (data, bytearray(data)):  # one image to the pipeline, not a sequence of byte values
        assert classify(one, candidate_labels=["cat", "dog"])["score"] == pytest.approx(expected["score"], abs=1e-6)
    assert_both_paths_refuse(both_paths, b"not an image", ValueError,
                             "The bytes given hold no image file PIL reads .*: give the bytes of a PNG, JPEG")


@pytest.mark.parametrize("option", [{"top_k": 2}, {"function_to_apply": "none"}])
def test_a_pipeline_option_it_does_not_have_is_named_with_those_it_has(both_paths, option):
    _, classify = both_paths
    for images in ([Image.new("RGB", (8, 8))], []):
        with pytest.raises(ValueError, match=rf"pipeline has no option \['{next(iter(option))}'\]: it takes "
                                             "candidate_labels, hypothesis_template, timeout, batch_size and num"):
            classify(images, candidate_labels=["cat"], **option)


def test_a_hypothesis_template_that_is_no_text_is_refused(both_paths):
    _, classify = both_paths
    with pytest.raises(ValueError, match="hypothesis_template must be a template with {} or a list of them, got int"):
        classify([Image.new("RGB", (8, 8))], candidate_labels=["cat"], hypothesis_template=3)


def test_an_empty_batch_gives_an_empty_list_with_its_labels_checked_by_both_paths(both_paths):
    classifier, classify = both_paths
    assert classifier([], candidate_labels=["cat"]) == classify([], candidate_labels=["cat"], batch_size=4) == []
    for call in (classifier, classify):
        with pytest.raises(ValueError, match="`candidate_labels` must be a list of class names"):
            call([], candidate_labels="cat")


def test_candidate_labels_the_tokenizer_cannot_tell_apart_are_refused(both_paths):
    """The tiny tokenizer drops emoji: both labels would be the same prompt, each scored 0.5 without a word."""
    classifier, classify = both_paths
    for call in (lambda: classifier([Image.new("RGB", (8, 8))], candidate_labels=["\U0001F431", "\U0001F436"]),
                 lambda: classify(Image.new("RGB", (8, 8)), candidate_labels=["\U0001F431", "\U0001F436"])):
        with pytest.raises(ValueError, match=r"The zero-shot label set: the classes '.' and '.' give the same tokens "
                                             r"with every template .*drops characters it does not know"):
            call()
