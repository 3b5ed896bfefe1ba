"""Tasks (`ContinualTask`): their definition (names, class names, prompt templates, labels, learning rates) is
checked before any training, their images are decoded and converted to RGB (by bit depth, refusing damaged
or non-finite images), and a task folder loads with the splits it has (`ContinualTask.from_disk`)."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from hf_moe_cl.assets import assets_dir
from hf_moe_cl.continual import ContinualTask, ContinualTrainer, ImageClassificationCollator, to_rgb
from hf_moe_cl.continual.methods import ConDU, ConDUArguments

from conftest import colour_task, continual_args, moe_model, run, tiny_clip


def image_dataset(labels, mode="RGB"):
    images = [Image.new(mode, (8, 8)) for _ in labels]
    return Dataset.from_dict({"image": images, "label": labels})


def task(**overrides):
    values = dict(name="t", train_dataset=image_dataset([0, 1]), eval_dataset=image_dataset([1, 0]),
                  classnames=["a", "b"])
    values.update(overrides)
    return ContinualTask(**values)


def test_valid_task_passes():
    task().validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(classnames=[]), "no class names"),
        (dict(train_dataset=image_dataset([])), "empty train dataset"),
        (dict(eval_dataset=image_dataset([])), "empty eval dataset"),
        (dict(train_dataset=image_dataset([0, 2])), "labels range from 0 to 2 but there are 2 class names"),
        (dict(templates=["no slot"]), "must contain"),
        (dict(eval_dataset=Dataset.from_dict({"img": [Image.new("RGB", (8, 8))], "label": [0]})), "lacks column"),
    ],
)
def test_bad_tasks_fail_with_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        task(**overrides).validate()


def test_eval_only_task_needs_no_training_split():
    task(train_dataset=None).validate(needs_training=False)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "1", "LA"])
def test_any_image_mode_becomes_rgb(mode):
    image = Image.new(mode, (8, 8))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (8, 8)


def test_grayscale_values_survive_the_conversion():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    rgb = np.asarray(to_rgb(gray))
    assert np.array_equal(rgb[..., 0], np.asarray(gray)) and np.array_equal(rgb[..., 2], np.asarray(gray))


def test_collator_makes_pixel_values_from_mixed_modes(clip_processor):
    collate = ImageClassificationCollator(clip_processor.image_processor)
    batch = collate([{"image": Image.new(m, (20, 20)), "label": i} for i, m in enumerate(["L", "RGBA", "CMYK"])])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2]


def test_mini_mtil_task_loads_from_the_shared_assets():
    root = assets_dir()
    mnist = ContinualTask.from_disk(root / "mini-mtil" / "mnist")
    assert mnist.name == "mnist" and len(mnist.classnames) == 10
    assert len(mnist.train_dataset) == 2000 and len(mnist.eval_dataset) == 1000
    mnist.validate()


def test_missing_task_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.json"):
        ContinualTask.from_disk(tmp_path)


def test_missing_assets_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="HF_MOE_CL_ASSETS"):
        assets_dir(tmp_path / "nowhere")


# ----- task definitions: names, class names, templates, labels -------------------------------------------------------
def image_split(labels, image=None, features=None):
    image = image or Image.new("RGB", (8, 8), (10, 20, 30))
    return Dataset.from_dict({"image": [image] * len(labels), "label": labels}, features=features)


def simple_task(**changes):
    task = ContinualTask("t", image_split([0, 1, 2]), image_split([0, 1, 2]), ["red", "green", "blue"])
    for key, value in changes.items():
        setattr(task, key, value)
    return task


@pytest.mark.parametrize("change, message", [
    (dict(classnames=["red", "red", "blue"]), r"duplicate class names \['red'\]"),
    (dict(classnames=["red", "", "blue"]), "non-empty class name"),
    (dict(train_dataset=image_split([0.0, 1.0, 2.5])), "labels are of type float"),
    (dict(train_dataset=image_split(["red", "green", "blue"])), "labels are of type string"),
    (dict(learning_rate=0.0), "learning_rate must be a finite positive number"),
    (dict(official_learning_rates={"moe-adapters": math.nan}), r"official_learning_rates\['moe-adapters'\]"),
])
def test_bad_tasks_are_refused(change, message):
    task = ContinualTask("t", image_split([0, 1, 2]), image_split([0, 1, 2]), ["red", "green", "blue"])
    for key, value in change.items():
        setattr(task, key, value)
    with pytest.raises(ValueError, match=message):
        task.validate()


@pytest.mark.parametrize("change, message", [
    (dict(classnames="rgb"), "`classnames` must be a list of class names .* got str 'rgb'; a string would make one "
                             "class per character"),
    (dict(classnames={"red": 0}), "`classnames` must be a list"),
    (dict(templates="a photo of {}."), "`templates` must be a non-empty list"),
    (dict(templates=[]), "`templates` must be a non-empty list"),
    (dict(templates=["{} and {}"]), "has 2 fields"),
    (dict(templates=["a photo of {name}."]), r"has the field \{name\}"),
    (dict(templates=["a photo of {0}."]), r"has the field \{0\}"),
    (dict(templates=["a photo of {!r}."]), "a named, numbered or formatted field"),
    (dict(templates=["a photo of {:>5}."]), "a named, numbered or formatted field"),
    (dict(templates=["a photo of {."]), "does not parse"),
    (dict(templates=["no slot"]), "has no '{}'"),
    (dict(templates=[None]), "is a NoneType, not a string"),
    (dict(train_classes=[]), "`train_classes` must be a non-empty list of distinct class indices in 0..2"),
    (dict(train_classes=[0, 3]), "`train_classes` must be"),
    (dict(train_classes=[0, 0]), "`train_classes` must be"),
    (dict(train_classes=[True]), "`train_classes` must be"),
    (dict(train_classes="01"), "`train_classes` must be"),
    (dict(train_classes=[0, 1.0]), "`train_classes` must be"),
    (dict(train_dataset=image_split([0, None, 2])), "1 train example.s. have no label .None., the first at index 1"),
    (dict(eval_dataset=image_split([None, 1, 2])), "1 eval example.s. have no label"),
])
def test_bad_task_definitions_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        simple_task(**change).validate()


def test_escaped_braces_in_a_template_are_fine():
    simple_task(templates=["{{a}} photo of {}."]).validate()
    assert simple_task().prompts("{{a}} {}") == ["{a} red", "{a} green", "{a} blue"]


def class_label_split(names):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    return image_split([0, 1, 2], features=features)


@pytest.mark.parametrize("names, message", [
    (["blue", "red", "green"], r"label 0 is 'blue' there but classnames\[0\] is 'red'; 'blue' is classnames\[2\]"),
    (["Red", "Blue", "Green"], r"label 1 is 'Blue' there but classnames\[1\] is 'green'; 'Blue' is classnames\[2\]"),
    # the same reordering plus a class the task lacks: label 1 would still train with the prompt of 'green'
    (["red", "blue", "green", "cyan"], r"label 1 is 'blue' there but classnames\[1\] is 'green'"),
    (["cyan", "red", "green"], r"label 1 is 'red' there but classnames\[1\] is 'green'; 'red' is classnames\[0\]"),
    (["red", "green", "blue"], None),
    (["red", "green", "blue", "cyan"], None),  # an extra class after the task's, at their indices
    (["n01", "n02", "n03"], None),  # other names (e.g. WordNet ids): nothing to compare
    (["red", "n02", "n03"], None),  # partly renamed, every matching name at its own index
])
def test_class_labels_in_another_order_than_the_class_names_are_refused(names, message):
    task = simple_task(train_dataset=class_label_split(names), eval_dataset=class_label_split(names))
    if message is None:
        task.validate()
        return
    with pytest.raises(ValueError, match=f"ClassLabel names the task's class names at other indices .*{message}"):
        task.validate()


@pytest.mark.parametrize("field", ["name", "classnames", "templates"])
def test_text_that_cannot_be_written_as_utf8_is_refused_before_training(field):
    bad = os.fsdecode(b"caf\xe9")  # 'caf\udce9': a lone surrogate, as os.fsdecode makes of a latin-1 file name
    values = {"name": bad, "classnames": [bad, "green", "blue"], "templates": [bad + " {}"]}
    task = simple_task(**{field: values[field]})
    with pytest.raises(ValueError, match=r"'caf\\udce9( \{\})?' cannot be written as UTF-8 \(surrogates not allowed at "
                                         r"position 3"):
        task.validate()


@pytest.mark.parametrize("name, message", [
    ("", "needs a non-empty name"), ("  ", "needs a non-empty name"), (None, "needs a non-empty name"),
    (3, "needs a non-empty name"),
])
def test_empty_or_non_string_task_names_are_refused(name, message):
    task = colour_task("t")
    task.name = name
    with pytest.raises(ValueError, match=message):
        task.validate()


def test_official_learning_rates_that_are_not_a_dict_are_refused():
    task = colour_task("first")
    task.official_learning_rates = [("moe-adapters", 1e-3)]
    with pytest.raises(ValueError, match=r"Task 'first': `official_learning_rates` must map recipe names to learning "
                                         r"rates \(a dict such as \{'moe-adapters': 1e-3\}\), got \[\('moe-adapters'"):
        task.validate()


def test_a_misspelt_official_learning_rate_key_is_refused_before_training(tmp_path, module_processor):
    """The rate for 'moe-adapter' is not MoE-Adapters' ('moe-adapters'): the task would silently train at
    learning_rate; the presets' other recipes ('moe-adapters-few-shot', 'condu-lora', ...) are no misspelling."""
    from conftest import trainer_for, tree_bytes

    first, second = colour_task("first"), colour_task("second", seed=1, offset=3)
    first.official_learning_rates = {"moe-adapters-few-shot": 1e-3, "condu-lora": 1e-4}
    second.official_learning_rates = {"moe-adapter": 5e-3}
    folder = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^Task 'second': official_learning_rates has 'moe-adapter' but no rate for "
                                         r"this method's recipe 'moe-adapters', so the task would train at "
                                         r"learning_rate\. Name the key 'moe-adapters' \(or give the task a "
                                         r"learning_rate\)\.$"):
        trainer_for(folder, module_processor).train_tasks([first, second])
    assert not any(name.startswith("task-") for name in tree_bytes(folder))


def test_class_names_cut_to_the_same_prompt_are_refused_before_training(tmp_path, clip_processor):
    task = colour_task("long")
    task.classnames = ["redredredredredred", "redredredredredreg", "blue"]  # equal in the first 16 tokens
    model = moe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="the classes 'redredredredredred' and 'redredredredredreg' give the same "
                                         r"tokens with every template \(the tokenizer cuts prompts at 16 tokens and drops"):
        run(tmp_path, clip_processor, tasks=[task], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(tmp_path.glob("task-*"))


def test_class_names_cut_alike_by_some_templates_only_are_a_warning(tmp_path, clip_processor, caplog):
    task = colour_task("long")
    task.classnames = ["redredredredr1", "redredredredr2", "blue"]
    task.templates = ["a photo of {}.", "{}"]  # the second separates them
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        run(tmp_path, clip_processor, tasks=[task])
    assert "give the same tokens with 1 of 2 templates" in caplog.text


# ----- images --------------------------------------------------------------------------------------------------------
def damaged_images(task, positions, truncate=True):
    """The task's eval split with the images at `positions` replaced by damaged PNG bytes."""
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, format="PNG")
    data = buffer.getvalue()
    bad = data[: len(data) // 2] if truncate else b"not an image at all"
    images = [{"bytes": bad, "path": None} if i in positions else image
              for i, image in enumerate(task.eval_dataset.cast_column("image", task.eval_dataset.features["image"]
                                                                       .__class__(decode=False))["image"])]
    return Dataset.from_dict({"image": images, "label": task.eval_dataset["label"]},
                             features=task.eval_dataset.features)


@pytest.mark.parametrize("truncate", [True, False])
def test_a_damaged_image_in_a_later_task_fails_before_any_training(tmp_path, clip_processor, truncate):
    first, second = colour_task("first"), colour_task("second", seed=1, offset=3)
    second.eval_dataset = damaged_images(second, {3, 7}, truncate)
    model = moe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ContinualTrainer(model=model, args=continual_args(tmp_path), processing_class=clip_processor)
    with pytest.raises(ValueError, match=r"task 'second', eval split: 2 image\(s\) cannot be decoded, the first at "
                                         r"index 3"):
        trainer.train_tasks([first, second])
    assert not any(tmp_path.glob("task-*"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode, value, expected", [("I;16", 32896, 128), ("I", 65535, 255), ("F", 0.5, 128)])
def test_wide_and_float_images_are_scaled_by_bit_depth(mode, value, expected):
    image = Image.new(mode, (4, 4), value)  # a uniform grey stays grey, it is not stretched to black
    assert np.asarray(to_rgb(image)).tolist() == [[[expected] * 3] * 4] * 4


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_infinite_pixels_are_refused(value):
    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[2, 3] = value
    bad = Image.fromarray(pixels, mode="F")
    with pytest.raises(ValueError, match="F image has .* pixel value.s.; they have no colour"):
        to_rgb(bad)
    images = [Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F")] * 3 + [bad]
    task = simple_task(eval_dataset=Dataset.from_dict({"image": images, "label": [0, 1, 2, 0]}))
    with pytest.raises(ValueError, match=r"eval split: 1 image\(s\) cannot be decoded, the first at index 3 "
                                         r"\(ValueError: A F image has"):
        task.validate(check_images=True)


@pytest.mark.parametrize("feature", ["Array3D", "Array2D", "List"])
def test_an_image_column_of_pixel_arrays_is_refused_before_training_naming_the_fix(tmp_path, clip_processor, feature):
    from datasets import Array2D, Array3D, Value

    pixels = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    features = {"Array3D": Features({"image": Array3D((8, 8, 3), "uint8"), "label": Value("int64")}),
                "Array2D": Features({"image": Array2D((8, 8), "uint8"), "label": Value("int64")}), "List": None}
    arrays = pixels[..., 0] if feature == "Array2D" else pixels
    task = colour_task("arrays")
    task.train_dataset = Dataset.from_dict({"image": list(arrays), "label": [0, 1, 2, 0]}, features=features[feature])
    message = (rf"task 'arrays', train split: the `image` column is a datasets {feature}\(.*not datasets.Image.*"
               r"Convert them once: dataset.map\(lambda row: \{'image': PIL.Image.fromarray")
    for check_images in (True, False):  # the column's type is checked whether images are decoded or not
        with pytest.raises(ValueError, match=message):
            task.validate(check_images=check_images)
    trainer = ContinualTrainer(model=moe_model(), args=continual_args(tmp_path), processing_class=clip_processor)
    with pytest.raises(ValueError, match=message):
        trainer.train_tasks([task])
    assert not any(tmp_path.glob("task-*"))
    # the conversion the message gives makes the same images as PIL ones
    dataset = task.train_dataset
    fixed = dataset.map(lambda row: {"image": Image.fromarray(np.asarray(row["image"], dtype=np.uint8))},
                        features=Features({**dataset.features, "image": ImageFeature()}))
    assert [np.asarray(to_rgb(image)).tolist() for image in fixed["image"]] == \
        [np.asarray(to_rgb(Image.fromarray(a))).tolist() for a in arrays]
    task.train_dataset = fixed
    task.validate(check_images=True)


# ----- the whole training split a few-shot train set was drawn from (full_train_dataset) -----------------------------
@pytest.mark.parametrize("whole, message", [
    (lambda: colour_task("x", num_classes=6).train_dataset,
     r"full train labels range from 0 to 5 but there are 3 class names"),
    (lambda: Dataset.from_dict({"img": [1, 2], "label": [0, 1]}),
     r"the full train dataset lacks column\(s\) \['image'\]"),
    (lambda: colour_task("x").train_dataset.select([]), "has an empty full train dataset"),
    (lambda: Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [0.5]}),
     "the full train labels are of type float"),
    (lambda: [{"image": Image.new("RGB", (8, 8)), "label": 0}],
     "the full train dataset is a list, not a datasets.Dataset"),
])
def test_a_bad_full_train_dataset_is_refused_before_training(tmp_path, clip_processor, whole, message):
    task = colour_task("first")
    task.full_train_dataset = whole()
    with pytest.raises(ValueError, match=f"Task 'first'.*{message}"):
        task.validate()
    task.validate(needs_training=False)  # only training reads it
    trainer = ContinualTrainer(method=ConDU(tiny_clip(), ConDUArguments(), rank=2),
                               args=continual_args(tmp_path / "run", max_steps=1), processing_class=clip_processor)
    with pytest.raises(ValueError, match=message):
        trainer.train_tasks([task, colour_task("second", seed=1, offset=3)])
    assert not list((tmp_path / "run").glob("task-*"))  # nothing trained or saved


# ----- task folders (ContinualTask.from_disk) ------------------------------------------------------------------------
def task_folder(path, splits=("train", "test")):
    data = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [0, 1]})
    DatasetDict({split: data for split in splits}).save_to_disk(str(path))
    (path / "task.json").write_text(json.dumps({"name": "t", "classnames": ["a", "b"]}))
    return path


@pytest.mark.parametrize("splits, message", [
    (dict(eval_split="validation"), r"has no split 'validation' \(`eval_split`\); it has \['test', 'train'\]"),
    (dict(train_split="trian"), r"has no split 'trian' \(`train_split`\); it has \['test', 'train'\]"),
])
def test_a_split_the_task_folder_lacks_is_named_with_the_splits_it_has(tmp_path, splits, message):
    folder = task_folder(tmp_path / "task")
    with pytest.raises(ValueError, match=message) as error:
        ContinualTask.from_disk(folder, **splits)
    assert str(folder) in str(error.value)


def test_an_evaluation_only_task_folder_loads_with_train_split_none(tmp_path):
    folder = task_folder(tmp_path / "task", splits=("test",))
    with pytest.raises(ValueError, match=r"has no split 'train' \(`train_split`\); it has \['test'\]: pass one of "
                                         r"them \(train_split=None loads an evaluation-only task\)"):
        ContinualTask.from_disk(folder)
    task = ContinualTask.from_disk(folder, train_split=None)
    assert task.train_dataset is None and len(task.eval_dataset) == 2
    task.validate(needs_training=False)


@pytest.mark.parametrize("damage", ["truncated", "empty split"])
def test_a_task_folder_whose_data_cannot_be_read_is_named_with_the_fix(tmp_path, damage):
    folder = task_folder(tmp_path / "task")
    arrow = next((folder / "test").glob("*.arrow"))
    if damage == "truncated":
        arrow.write_bytes(arrow.read_bytes()[:-40])
    else:
        for path in (folder / "test").glob("*.arrow"):
            path.unlink()
    with pytest.raises(ValueError, match=rf"{folder} cannot be read as datasets saved with `save_to_disk` \(.*\); a "
                                         r"split's files are damaged, truncated or missing\. Save the task's splits "
                                         r"again"):
        ContinualTask.from_disk(folder)


def test_a_task_folder_of_one_dataset_is_named(tmp_path):
    Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [0]}).save_to_disk(str(tmp_path))
    (tmp_path / "task.json").write_text(json.dumps({"classnames": ["a"]}))
    with pytest.raises(ValueError, match=f"{tmp_path} holds one dataset, not a DatasetDict of splits"):
        ContinualTask.from_disk(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{", "task.json is not valid JSON"),
    ('["a", "b"]', "task.json should hold a JSON object"),
    ('{"classnames": "abc"}', "`classnames` must be a list of class names"),
    ('{"classnames": ["a", "a"]}', r"duplicate class names \['a'\]"),
    ('{"classnames": ["a"], "templates": null}', "`templates` must be a non-empty list"),
])
def test_a_damaged_task_json_is_named(tmp_path, content, message):
    (tmp_path / "task.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        ContinualTask.from_disk(tmp_path)
    assert str(tmp_path / "task.json") in str(error.value)


def test_a_task_that_trains_over_one_class_is_refused_before_training(tmp_path, clip_processor):
    one = colour_task("one", num_classes=1)  # every label 0: the loss over one class is always 0
    incremental = colour_task("step")
    incremental.train_dataset = incremental.train_dataset.filter(lambda row: row["label"] == 1)
    incremental.train_classes = [1]
    for task, name in ((one, "'red'"), (incremental, "'green'")):
        with pytest.raises(ValueError, match=rf"Task '{task.name}' trains over one class \({name}\): the loss over one "
                                             r"class is always 0.*at least two classes, or only evaluate it"):
            run(tmp_path / task.name, clip_processor, tasks=[task])
        assert not any((tmp_path / task.name).glob("task-*"))
        task.validate(needs_training=False)  # evaluating it is fine
    run(tmp_path / "eval", clip_processor, tasks=[one], max_steps=0)


def test_a_dataset_in_torch_or_numpy_format_trains_as_the_plain_one(tmp_path, clip_processor):
    results = []
    for form in (None, "torch", "numpy"):
        task = colour_task("first")
        if form is not None:
            task.train_dataset = task.train_dataset.with_format(form)
            task.eval_dataset = task.eval_dataset.with_format(form)
        model = moe_model()
        run(tmp_path / str(form), clip_processor, model=model, tasks=[task])
        results.append({k: v.clone() for k, v in model.state_dict().items() if "moe_lora" in k})
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_an_undecoded_image_column_trains_and_scores_as_the_decoded_one(tmp_path, clip_processor):
    """`datasets.Image(decode=False)` columns hold {"bytes", "path"} dicts: the checks accepted them, the collator
    did not; they are opened as datasets decodes them."""
    results = []
    for decode in (True, False):
        task = colour_task("first", n_eval=6)
        if not decode:
            task.train_dataset = task.train_dataset.cast_column("image", ImageFeature(decode=False))
            task.eval_dataset = task.eval_dataset.cast_column("image", ImageFeature(decode=False))
        model = moe_model()
        result = run(tmp_path / str(decode), clip_processor, model=model, tasks=[task])
        weights = {k: v.clone() for k, v in model.state_dict().items() if "moe_lora" in k}
        results.append((result.accuracy_matrix, weights))
    (matrix, weights), (other_matrix, other_weights) = results
    assert matrix == other_matrix and all(torch.equal(weights[k], other_weights[k]) for k in weights)


def test_to_rgb_opens_undecoded_images_from_bytes_or_path(tmp_path):
    from io import BytesIO

    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "image.png")
    for value in ({"bytes": buffer.getvalue(), "path": None}, {"bytes": None, "path": str(tmp_path / "image.png")}):
        assert np.array_equal(np.asarray(to_rgb(value)), np.asarray(image))


@pytest.mark.parametrize("method", ["moe-adapters", "condu"])
def test_evaluation_only_tasks_run_with_max_steps_0(tmp_path, clip_processor, method):
    """Tasks without a train split (ContinualTask.from_disk(train_split=None)) are measured, not trained: the
    routing report reads their prompts only, ConDU's prototypes keep their text means."""
    tasks = [colour_task("first"), colour_task("second", seed=1, offset=3)]
    for task in tasks:
        task.train_dataset = None
    model = moe_model() if method == "moe-adapters" else None
    trainer = ContinualTrainer(model=model, method=None if model else ConDU(tiny_clip(), ConDUArguments(), rank=4),
                               args=continual_args(tmp_path, max_steps=0), processing_class=clip_processor)
    result = trainer.train_tasks(tasks)
    assert [len(row) for row in result.accuracy_matrix] == [2, 2]
    if method == "moe-adapters":
        report = result.diagnostics["routing_report"][-1]["second"]
        assert "text" in report and "vision" not in report
    else:
        means = trainer.method.store.prototypes[1]
        assert torch.equal(means["image_mean"], torch.zeros_like(means["text_mean"]))


def test_an_evaluation_only_task_in_a_training_run_is_named_with_the_fix(tmp_path, clip_processor):
    middle = colour_task("middle", seed=1, offset=3)
    middle.train_dataset = None
    tasks = [colour_task("first"), middle, colour_task("last", seed=2, offset=1)]
    with pytest.raises(ValueError, match=r"Task 'middle' has no train dataset \(an evaluation-only task\), but the run "
                                         r"trains every task in turn: give it a train split, or measure it apart"):
        run(tmp_path, clip_processor, tasks=tasks)
    assert not any(tmp_path.glob("task-*"))
