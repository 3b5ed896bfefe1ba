import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from hf_moe_cl.assets import assets_dir
from hf_moe_cl.continual import ContinualTask, ImageClassificationCollator, to_rgb


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
