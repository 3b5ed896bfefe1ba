"""Bad inputs and faults: each case ends in a clear error that names the problem, or in correct behaviour.
The table of cases is docs/reliability.md."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import save_file

from hf_moe_cl import ContinualTask, ContinualTrainer, MoELoraConfig, SelectorConfig
from hf_moe_cl.continual import to_rgb
from hf_moe_cl.continual.methods import ConDUArguments, MoEAdapters, MoEAdaptersArguments
from hf_moe_cl.files import check_safetensors_file

from conftest import colour_task, continual_args, moe_model, tiny_clip

TESTS = os.path.dirname(os.path.abspath(__file__))




def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----- settings ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: MoELoraConfig(noise_epsilon=math.nan), "`noise_epsilon` must be a finite number"),
    (lambda: MoELoraConfig(load_balancing_coef=math.nan), "`load_balancing_coef` must be a finite number"),
    (lambda: MoELoraConfig(expert_scale=math.inf), "`expert_scale` must be a finite number"),
    (lambda: MoELoraConfig(expert_dropout=math.nan), "`expert_dropout` must be a finite number"),
    (lambda: MoELoraConfig(noise_epsilon=-1.0), "`noise_epsilon` must be a finite number >= 0, got -1.0"),
    (lambda: continual_args("/tmp/x", learning_rate=math.inf), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", learning_rate=0.0), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", learning_rate=-1e-3), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", task_learning_rates=[1e-3, math.nan]), r"`task_learning_rates\[1\]`"),
    (lambda: continual_args("/tmp/x", max_steps=-2), "`max_steps` must be the steps per task"),
    (lambda: continual_args("/tmp/x", max_steps=-1, num_train_epochs=0), "set it above 0"),
    (lambda: continual_args("/tmp/x", train_augmentation="flip"), "`train_augmentation` must be None or one of"),
    (lambda: MoEAdaptersArguments(merge_experts_every=-1), "`merge_experts_every` must be an integer >= 0, got -1"),
    (lambda: SelectorConfig(feature_dim=0), "`selector.feature_dim` must be None or an integer >= 1, got 0"),
    (lambda: SelectorConfig(feature_dim=8, feature_layer=0), "`selector.feature_layer` must be None or an integer >= 1"),
    (lambda: ConDUArguments(condu_top_k=0), "`condu_top_k` must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ----- task ids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, message", [
    (1.7, "must be an integer"), (1.0, "must be an integer"), (True, "boolean"), ("1", "must be an integer"),
    (torch.tensor(1.0), "must be an integer"), (5, "out of range"),
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


def test_float_task_id_tensors_are_refused(clip_inputs):
    with pytest.raises(ValueError, match="integer tensor"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=torch.tensor([0.0, 1.0, 1.0, 2.0]))


# ----- tasks and data ------------------------------------------------------------------------------------------------
def image_split(labels, image=None):
    image = image or Image.new("RGB", (8, 8), (10, 20, 30))
    return Dataset.from_dict({"image": [image] * len(labels), "label": labels})


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


# ----- checkpoints and runs ------------------------------------------------------------------------------------------
def two_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3)]


def run(tmp_path, clip_processor, model=None, tasks=None, resume=False, **overrides):
    trainer = ContinualTrainer(model=model or moe_model(), args=continual_args(tmp_path, **overrides),
                               processing_class=clip_processor)
    return trainer.train_tasks(tasks or two_tasks(), resume=resume)


def test_a_new_run_refuses_a_folder_of_checkpoints_unless_asked(tmp_path, clip_processor):
    run(tmp_path, clip_processor)
    saved = folder_bytes(tmp_path / "task-00-first")
    with pytest.raises(ValueError, match="already holds task checkpoints"):
        run(tmp_path, clip_processor, learning_rate=1e-2)
    assert folder_bytes(tmp_path / "task-00-first") == saved
    run(tmp_path, clip_processor, learning_rate=1e-2, overwrite_output_dir=True)
    assert folder_bytes(tmp_path / "task-00-first") != saved


@pytest.mark.parametrize("change, named", [
    (dict(model_overrides=dict(top_k=1)), "top_k: 2 -> 1"),
    (dict(learning_rate=1e-2), "learning_rates"),
    (dict(seed=4), "seed: 3 -> 4"),
    (dict(classnames=["crimson", "green", "blue"]), r"tasks\[0\].classnames"),
    (dict(lora=True), "method.method: 'moe-adapters' -> 'lora'"),
])
def test_resume_refuses_a_folder_of_another_run(tmp_path, clip_processor, change, named):
    run(tmp_path, clip_processor)
    tasks = two_tasks()
    if "classnames" in change:
        tasks[0].classnames = change["classnames"]
    model = moe_model(**change.get("model_overrides", {}))
    if change.get("lora"):
        model = get_peft_model(tiny_clip(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    overrides = {k: v for k, v in change.items() if k in ("learning_rate", "seed")}
    with pytest.raises(ValueError, match=f"another run.*{named}"):
        run(tmp_path, clip_processor, model=model, tasks=tasks, resume=True, **overrides)


def test_a_damaged_progress_file_is_named(tmp_path, clip_processor):
    run(tmp_path, clip_processor, tasks=two_tasks()[:1])
    (tmp_path / "task-00-first" / "continual_progress.json").write_text("")
    with pytest.raises(ValueError, match=r"task-00-first/continual_progress.json is not valid JSON \(0 bytes"):
        run(tmp_path, clip_processor, resume=True)


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path, clip_processor):
    leftover = tmp_path / ".task-01-second.tmp-abcdef12"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    run(tmp_path, clip_processor)
    assert not leftover.exists() and (tmp_path / "task-01-second").is_dir()


def test_a_diverging_task_stops_before_saving_and_earlier_checkpoints_survive(tmp_path, clip_processor):
    run(tmp_path / "healthy", clip_processor, tasks=two_tasks()[:1], max_steps=4)
    tasks = two_tasks()
    tasks[1].learning_rate = 1e30
    with pytest.raises(FloatingPointError, match="task 2/2: second: the training loss became nan"):
        run(tmp_path / "run", clip_processor, tasks=tasks, max_steps=4)
    weights = "adapter_model.safetensors"
    assert (tmp_path / "run" / "task-00-first" / weights).read_bytes() == \
        (tmp_path / "healthy" / "task-00-first" / weights).read_bytes()
    assert not (tmp_path / "run" / "task-01-second").exists()


def test_save_total_limit_keeps_the_latest_task_checkpoints(tmp_path, clip_processor):
    run(tmp_path, clip_processor, save_total_limit=1)
    assert sorted(p.name for p in tmp_path.glob("task-*")) == ["task-01-second"]


def test_a_checkpoint_of_another_method_does_not_load_silently(tmp_path, clip_processor):
    from hf_moe_cl.continual.methods import ContinualLoRA

    run(tmp_path, clip_processor, tasks=two_tasks()[:1])
    lora = ContinualLoRA(get_peft_model(tiny_clip(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    with pytest.raises(ValueError, match="does not fit this model"):
        lora.load(tmp_path / "task-00-first")


# ----- loading adapters ----------------------------------------------------------------------------------------------
def test_loading_without_importing_the_library_says_what_to_do(tmp_path):
    moe_model().save_pretrained(tmp_path)
    script = (f"import sys; sys.path.insert(0, {TESTS!r})\nfrom peft import PeftModel\nfrom conftest import tiny_clip\n"
              f"PeftModel.from_pretrained(tiny_clip(), {str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "KeyError: 'MOE_LORA'" in result.stderr
    # the file stores the plain type; the card beside it says what the KeyError means
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOE_LORA"
    assert "`import hf_moe_cl` before loading it with peft (without it peft raises `KeyError: 'MOE_LORA'`)" in (
        tmp_path / "README.md").read_text()


def test_a_folder_written_with_the_old_peft_type_name_loads(tmp_path, clip_inputs):
    model = moe_model(init_weights=False).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "MOE_LORA (needs `import hf_moe_cl` before loading)"  # what 0.2 stored
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).eval()
    model.set_task(1), loaded.set_task(1)
    assert torch.equal(loaded(**clip_inputs).logits_per_image, model(**clip_inputs).logits_per_image)


def test_a_missing_weights_file_is_named(tmp_path):
    moe_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors: the adapter's weights are missing"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_a_malformed_adapter_config_is_named(tmp_path):
    """The library's loaders name the file; a direct PeftModel.from_pretrained parses it in peft first."""
    moe_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": ')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        MoELoraConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('["a list"]')
    with pytest.raises(ValueError, match="adapter_config.json should hold a JSON object"):
        MoELoraConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("header", [[1, 2], {"w": {"dtype": "F32", "shape": [1]}}, {"w": "x"}])
def test_malformed_safetensors_headers_are_named(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(ValueError, match="malformed safetensors header"):
        check_safetensors_file(path)


@pytest.mark.parametrize("layers", [3, 1])
def test_an_adapter_for_another_depth_is_refused(tmp_path, layers):
    moe_model().save_pretrained(tmp_path)
    other = tiny_clip()
    deeper = type(other)(other.config.__class__(**{**other.config.to_dict(), "vision_config": {
        **other.config.vision_config.to_dict(), "num_hidden_layers": layers}}))
    with pytest.raises(ValueError, match="as when the base model has more or fewer layers"):
        PeftModel.from_pretrained(deeper, tmp_path)


def test_a_shape_mismatch_message_names_no_missing_base(tmp_path):
    moe_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match this model") as error:
        PeftModel.from_pretrained(tiny_clip(vision_width=64), tmp_path)
    assert "(None)" not in str(error.value) and "Load it on the base model it was trained on" in str(error.value)


def test_a_partial_legacy_selector_is_refused_not_dropped(tmp_path):
    moe_model().save_pretrained(tmp_path)
    save_file({"thresholds": torch.zeros(2)}, tmp_path / "ddas.safetensors")  # ddas_config.json is missing
    with pytest.raises(ValueError, match=r"holds a DDAS selector in \['ddas.safetensors'\]"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    from hf_moe_cl import upgrade_adapter_folder

    with pytest.raises(FileNotFoundError, match="has no ddas_config.json"):
        upgrade_adapter_folder(str(tmp_path))


def test_an_adapter_saved_over_a_legacy_folder_does_not_pick_up_its_selector(tmp_path, clip_inputs):
    (tmp_path / "ddas_config.json").write_text(json.dumps({"feature_dim": 16, "num_tasks": 2}))
    save_file({"thresholds": torch.zeros(2)}, tmp_path / "ddas.safetensors")
    moe_model().save_pretrained(tmp_path)  # no selector: the stale files must not come back as one
    with pytest.raises(ValueError, match="layout of hf-moe-cl 0.1"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_ddas_method_without_a_moe_model_is_refused():
    with pytest.raises(ValueError, match="MoEAdapters needs a MoE-LoRA model"):
        MoEAdapters(tiny_clip())
