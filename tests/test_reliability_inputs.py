"""Bad inputs, concurrent runs and resumes (issue 19): each case ends in a clear error that names the problem and the
fix, or in a logged, documented behaviour. The table of cases is docs/reliability.md."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from hf_moe_cl import ContinualTask, ContinualTrainer
from hf_moe_cl.continual import to_rgb
from hf_moe_cl.continual.checkpoints import LOCK_FILE, run_lock, task_folder

from conftest import colour_task, continual_args, moe_model, tiny_clip

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def tasks_named(*names):
    return [colour_task(name, seed=i, offset=3 * i) for i, name in enumerate(names)]


def trainer_for(tmp_path, clip_processor, model=None, **overrides):
    return ContinualTrainer(model=model or moe_model(), args=continual_args(tmp_path, **overrides),
                            processing_class=clip_processor)


def run(tmp_path, clip_processor, tasks=None, resume=False, model=None, **overrides):
    return trainer_for(tmp_path, clip_processor, model, **overrides).train_tasks(tasks or tasks_named("first", "second"),
                                                                                 resume=resume)


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----- task folder names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, folder", [
    ("first", "task-00-first"),
    ("org/dataset", "task-00-org-dataset-"),
    ("../../victim", "task-00-victim-"),
    ("..", "task-00-"),
    ("a b:c*?", "task-00-a-b-c-"),
    ("trailing.", "task-00-trailing-"),
    ("é" * 3, "task-00-"),
    ("x" * 200, "task-00-" + "x" * 40 + "-"),
])
def test_task_folders_stay_inside_the_output_dir(tmp_path, name, folder):
    path = task_folder(tmp_path, 0, name)
    assert path.parent == tmp_path and path.name.startswith(folder) and "/" not in path.name[len("task-"):]
    assert path == task_folder(tmp_path, 0, name)  # stable: the same folder at every resume
    assert len({task_folder(tmp_path, 0, other) for other in (name, name + "/", name + " ")}) == 3


def test_a_task_named_to_escape_writes_and_deletes_nothing_outside(tmp_path, clip_processor):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    output = tmp_path / "a" / "b"
    tasks = tasks_named("../../victim", "org/second")
    run(output, clip_processor, tasks=tasks)
    assert files_under(victim) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("task-")) == [
        task_folder(output, 0, "../../victim").name, task_folder(output, 1, "org/second").name]
    run(output, clip_processor, tasks=tasks, overwrite_output_dir=True)  # replaces only its own folders
    assert files_under(victim) == ["keep.txt"]


def test_hub_style_task_names_resume_without_retraining_and_refuse_a_new_run(tmp_path, clip_processor, caplog):
    tasks = tasks_named("org/first", "org/second")
    result = run(tmp_path, clip_processor, tasks=tasks)
    saved = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    assert len(saved) == 2
    with caplog.at_level(logging.INFO, logger="hf_moe_cl"):
        resumed = run(tmp_path, clip_processor, tasks=tasks, resume=True)
    assert "Resuming after task 2/2 (org/second)" in caplog.text
    assert resumed.accuracy_matrix == result.accuracy_matrix and resumed.task_names == ["org/first", "org/second"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == saved
    with pytest.raises(ValueError, match="already holds task checkpoints"):
        run(tmp_path, clip_processor, tasks=tasks)


@pytest.mark.parametrize("name, message", [
    ("", "needs a non-empty name"), ("  ", "needs a non-empty name"), (None, "needs a non-empty name"),
    (3, "needs a non-empty name"),
])
def test_empty_or_non_string_task_names_are_refused(name, message):
    task = colour_task("t")
    task.name = name
    with pytest.raises(ValueError, match=message):
        task.validate()


# ----- one run per folder --------------------------------------------------------------------------------------------
HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from hf_moe_cl.continual.checkpoints import run_lock
with run_lock({folder!r}):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, clip_processor,
                                                                                         caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(src=SRC, folder=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by another run: process {holder.pid} on .*, started .*"
                                               rf"Wait for it to finish or use another output_dir"):
            run(tmp_path, clip_processor)
        assert not any(tmp_path.glob("task-*"))
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        run(tmp_path, clip_processor)  # the holder was killed: its lock is stale
    assert f"Taking over {tmp_path / LOCK_FILE}: its run (process {holder.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end
    assert len(list(tmp_path.glob("task-*"))) == 2


def test_a_lock_held_on_another_host_is_refused_and_named(tmp_path, clip_processor):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "started": "2024-01-01 10:00:00"}))
    with pytest.raises(RuntimeError, match=r"process 1 on gpu-node-7, started 2024-01-01 10:00:00.*delete .*run.lock"):
        run(tmp_path, clip_processor)


def test_the_lock_is_released_when_a_run_fails(tmp_path, clip_processor):
    tasks = tasks_named("first", "second")
    tasks[1].learning_rate = 1e30
    with pytest.raises(FloatingPointError):
        run(tmp_path, clip_processor, tasks=tasks, max_steps=4)
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path):  # free again
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_an_output_dir_that_is_a_file_is_named(tmp_path, clip_processor):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="output_dir .*out is a file, not a folder"):
        trainer_for(path, clip_processor)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        with run_lock(path):
            pass


# ----- resuming ------------------------------------------------------------------------------------------------------
def test_after_divergence_the_unfinished_tasks_rate_may_change_on_resume(tmp_path, clip_processor, caplog):
    tasks = tasks_named("first", "second")
    tasks[1].learning_rate = 1e30
    with pytest.raises(FloatingPointError, match="then continue with resume=True"):
        run(tmp_path, clip_processor, tasks=tasks, max_steps=4)
    tasks[1].learning_rate = 5e-3
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        result = run(tmp_path, clip_processor, tasks=tasks, resume=True, max_steps=4)
    assert "task 2 (second) is not trained yet: learning rate 1e+30 -> 0.005" in caplog.text
    assert len(result.accuracy_matrix) == 2 and (tmp_path / "task-01-second").is_dir()
    tasks[0].learning_rate = 1e-4  # a finished task's rate may not change
    with pytest.raises(ValueError, match=r"another run.*learning_rates\[0\]: 0.005 -> 0.0001"):
        run(tmp_path, clip_processor, tasks=tasks, resume=True, max_steps=4)


@pytest.mark.parametrize("change, named", [
    (dict(gradient_accumulation_steps=2), "another run.*gradient_accumulation_steps: 1 -> 2"),
    (dict(optim="sgd"), "another run.*optimizer.optim: 'adamw_torch.*' -> 'sgd'"),
    (dict(max_grad_norm=1.0), "another run.*max_grad_norm: 0.0 -> 1.0"),
    (dict(adam_beta2=0.98), "another run.*optimizer.adam_beta2: 0.999 -> 0.98"),
    (dict(base_seed=1), r"another run.*base_model.weights: '[0-9a-f]+' -> '[0-9a-f]+'"),
    (dict(tasks=["first", "third"]), r"task-01-second is not a task of this sequence \['first', 'third'\]"),
])
def test_resume_refuses_other_training_settings_and_another_base(tmp_path, clip_processor, change, named):
    run(tmp_path, clip_processor)
    change = dict(change)
    model = moe_model()
    if "base_seed" in change:  # a base of the same shape with other weights
        from peft import get_peft_model

        from hf_moe_cl import MoELoraConfig

        model = get_peft_model(tiny_clip(seed=change.pop("base_seed")),
                               MoELoraConfig(num_tasks=2, num_experts=4, top_k=2, r=4))
    tasks = tasks_named(*change.pop("tasks")) if "tasks" in change else None
    with pytest.raises(ValueError, match=named):
        run(tmp_path, clip_processor, tasks=tasks, model=model, resume=True, **change)


def test_the_base_fingerprint_ignores_the_adapters_initialisation():
    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_fingerprint

    torch.manual_seed(0)
    first = moe_model()
    second = moe_model(init_weights=False)  # other adapter values, same base
    assert base_weights_fingerprint(first) == base_weights_fingerprint(second) == base_weights_fingerprint(
        tiny_clip())
    assert base_weights_fingerprint(tiny_clip(seed=1)) != base_weights_fingerprint(tiny_clip())


def test_an_adapter_is_refused_on_other_pretrained_weights_of_the_same_shape(tmp_path, clip_inputs, caplog):
    from peft import PeftConfig, PeftModel

    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_record

    model = moe_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_weights"]
    assert saved == base_weights_record(tiny_clip())

    other = tiny_clip(seed=1)
    untouched = {name: p.clone() for name, p in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"created on other pretrained weights.*base_weights=None"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any("moe_lora" in name for name, _ in other.named_modules())  # refused before any injection
    assert all(torch.equal(untouched[n], p) for n, p in other.state_dict().items())

    same = PeftModel.from_pretrained(tiny_clip(), tmp_path)  # the base it was created on
    with torch.no_grad():
        model.set_task(1), same.set_task(1)
        assert torch.equal(model(**clip_inputs).logits_per_image, same(**clip_inputs).logits_per_image)

    host = moe_model()  # load_adapter into a model of other weights is refused the same way
    host_other = PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=_without_record(tmp_path))
    with pytest.raises(ValueError, match="created on other pretrained weights"):
        host_other.load_adapter(tmp_path, adapter_name="second")
    host.load_adapter(tmp_path, adapter_name="second")

    config = PeftConfig.from_pretrained(tmp_path)  # on purpose: the documented way round
    config.base_weights = None
    PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=config)

    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):  # another dtype cannot be compared: said, not silent
        PeftModel.from_pretrained(tiny_clip(seed=1).to(torch.bfloat16), tmp_path)
    assert "created on float32 base weights and is loaded on bfloat16 ones" in caplog.text


def _without_record(folder):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(folder)
    config.base_weights = None
    return config


@pytest.mark.parametrize("record", ["abc", {"sha256": "0" * 16}, {"sha256": "z" * 16, "dtype": "float32",
                                                                   "layout": "0" * 16}])
def test_a_damaged_base_weights_record_is_named(tmp_path, record):
    from peft import PeftModel

    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), base_weights=record)))
    with pytest.raises(ValueError, match="`base_weights` must be None or.*damaged or edited"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_an_adapter_saved_before_the_record_loads_and_gains_it(tmp_path):
    from peft import PeftModel

    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_record

    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "base_weights"}))
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].base_weights == base_weights_record(tiny_clip())


def test_resume_into_a_missing_or_empty_folder_is_refused(tmp_path, clip_processor):
    for folder in (tmp_path / "typo", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        with pytest.raises(ValueError, match="was empty or did not exist: there is nothing to resume"):
            run(folder, clip_processor, resume=True)
        assert not any(folder.glob("task-*"))


def test_resume_of_a_run_killed_in_its_first_task_starts_over_with_a_notice(tmp_path, clip_processor, caplog):
    tmp_path.mkdir(exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        result = run(tmp_path, clip_processor, resume=True)
    assert "holds no finished task checkpoint: starting from the first task" in caplog.text
    assert len(result.accuracy_matrix) == 2


@pytest.mark.parametrize("edit, message", [
    (dict(finished_task=5), "finished_task is 5 but the folder is task 0's"),
    (dict(finished_task="0"), "finished_task is '0'"),
    (dict(task_names=[]), r"task_names \[\] does not name task 0"),
    (dict(steps_done=-3), "steps_done is -3"),
    (dict(evaluated="yes"), "`evaluated` true or false"),
    (dict(matrices={"oracle": [[1000.0]]}), r"matrices.oracle has the row \[1000.0\]"),
    (dict(matrices={"oracle": []}), r"matrices.oracle must have 1 row\(s\)"),
    (dict(matrices=[]), "`matrices` .* must be objects"),
])
def test_an_impossible_progress_file_is_named(tmp_path, clip_processor, edit, message):
    tasks = tasks_named("first")
    run(tmp_path, clip_processor, tasks=tasks)
    path = tmp_path / "task-00-first" / "continual_progress.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=f"continual_progress.json: .*{message}.*was it edited"):
        run(tmp_path, clip_processor, tasks=tasks, resume=True)


# ----- task definitions ----------------------------------------------------------------------------------------------
def image_split(labels, image=None, features=None):
    image = image or Image.new("RGB", (8, 8), (10, 20, 30))
    return Dataset.from_dict({"image": [image] * len(labels), "label": labels}, features=features)


def simple_task(**changes):
    task = ContinualTask("t", image_split([0, 1, 2]), image_split([0, 1, 2]), ["red", "green", "blue"])
    for key, value in changes.items():
        setattr(task, key, value)
    return task


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
    (["blue", "red", "green"], r"label 0 is 'blue' there but classnames\[0\] is 'red'"),
    (["Red", "Blue", "Green"], r"label 1 is 'Blue' there but classnames\[1\] is 'green'"),
    (["red", "green", "blue"], None),
    (["n01", "n02", "n03"], None),  # other names (e.g. WordNet ids): nothing to compare
])
def test_class_labels_in_another_order_than_the_class_names_are_refused(names, message):
    task = simple_task(train_dataset=class_label_split(names), eval_dataset=class_label_split(names))
    if message is None:
        task.validate()
        return
    with pytest.raises(ValueError, match=f"ClassLabel names are the task's class names in another order .*{message}"):
        task.validate()


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


def test_class_names_cut_to_the_same_prompt_are_refused_before_training(tmp_path, clip_processor):
    task = colour_task("long")
    task.classnames = ["redredredredredred", "redredredredredreg", "blue"]  # equal in the first 16 tokens
    model = moe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="the classes 'redredredredredred' and 'redredredredredreg' give the same "
                                         r"tokens with every template \(the tokenizer cuts prompts at 16 tokens\)"):
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


def test_a_nan_base_weight_is_named_before_training(tmp_path, clip_processor):
    model = moe_model()
    with torch.no_grad():
        model.base_model.model.vision_model.post_layernorm.weight[3] = math.nan
    with pytest.raises(ValueError, match="vision_model.post_layernorm.weight holds NaN or infinite values before any "
                                         "training: the base model .* is damaged"):
        run(tmp_path, clip_processor, model=model)
    assert not any(tmp_path.glob("task-*"))


# ----- options -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("ddas_quantile", 2.0, r"`ddas_quantile` must be a finite number in \(0, 1\], got 2.0"),
    ("ddas_quantile", 0.0, "`ddas_quantile` must be a finite number in"),
    ("ddas_quantile", math.nan, "`ddas_quantile` must be a finite number in"),
    ("ddas_learning_rate", -1e-3, "`ddas_learning_rate` must be a finite number > 0"),
    ("ddas_learning_rate", math.inf, "`ddas_learning_rate` must be a finite number > 0"),
    ("ddas_threshold", math.nan, "`ddas_threshold` must be None or a finite number > 0, got nan"),
    ("ddas_threshold", -0.1, "`ddas_threshold` must be None or a finite number > 0"),
    ("ddas_threshold", 0.0, "`ddas_threshold` must be None or a finite number > 0, got 0.0"),
    ("ddas_threshold", "0.06", "`ddas_threshold` must be None or a finite number"),
    ("ddas_max_images", 0, "`ddas_max_images` must be an integer >= 1, got 0"),
    ("ddas_hidden_dim", 0, "`selector.hidden_dim` must be an integer >= 1"),  # deprecated: SelectorConfig's
    ("ddas_task_steps", 0, "`ddas_task_steps` must be an integer >= 1"),
    ("ddas_reference_steps", 1.5, "`ddas_reference_steps` must be an integer >= 1"),
    ("ddas_max_images", True, "`ddas_max_images` must be an integer"),
])
def test_ddas_options_out_of_range_are_refused(option, value, message):
    from hf_moe_cl.continual.methods import DDASArguments

    with pytest.raises(ValueError, match=message):
        DDASArguments(ddas=True, **{option: value})


def test_missing_alexnet_weights_fail_before_the_first_task(tmp_path, clip_processor):
    from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters

    from conftest import noise_images

    ddas = DDASArguments(ddas=True, ddas_feature_extractor="alexnet", ddas_alexnet_weights=str(tmp_path / "no.pth"),
                         ddas_task_steps=2, ddas_reference_steps=2)
    method = MoEAdapters(moe_model(), ddas=ddas, ddas_reference=noise_images(4, 0))
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path / "run"), processing_class=clip_processor)
    with pytest.raises(OSError, match=r"ddas_alexnet_weights='.*no.pth'\) cannot be loaded: .*pass its path"):
        trainer.train_tasks(tasks_named("first", "second"))
    assert not any((tmp_path / "run").glob("task-*"))


def mtil_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtil_example", os.path.join(os.path.dirname(SRC), "examples",
                                                                                "mtil.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--max_step", "1"], "unrecognized arguments: --max_step 1"),
    (["--per_device_train_batch", "4"], "unrecognized arguments: --per_device_train_batch 4"),
    (["--learning_rat", "1e-3"], "unrecognized arguments"),
    (["--method", "condu", "--ddas", "true"], "--ddas true applies to --method moe-adapters; condu does not use"),
    (["--method", "lora", "--ddas", "true"], "--ddas true applies to --method moe-adapters"),
])
def test_example_refuses_abbreviated_flags_and_ddas_without_a_selector(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        mtil_example().parse_args(["--output_dir", str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_explicit_task_learning_rates_are_not_overwritten_silently(tmp_path):
    from hf_moe_cl.experiments.experiment import MethodArguments, prepare_method

    args = continual_args(tmp_path, task_learning_rates=[1e-3, 2e-3])
    with pytest.raises(ValueError, match="task_learning_rates and use_task_learning_rates=False disagree"):
        prepare_method(MethodArguments(method="zero-shot", use_task_learning_rates=False), tiny_clip(),
                       tasks_named("a", "b"), args)
    _, kept = prepare_method(MethodArguments(method="zero-shot"), tiny_clip(), tasks_named("a", "b"), args)
    assert kept.task_learning_rates == [1e-3, 2e-3]


# ----- task ids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_ids", [
    torch.tensor([[0, 1], [1, 0]]), torch.tensor([], dtype=torch.long), torch.zeros(4, dtype=torch.long,
                                                                                    device="meta"),
    torch.tensor([[0, 1, 1, 0]]),
])
def test_task_ids_of_another_shape_or_without_values_are_refused(task_ids, clip_inputs):
    with pytest.raises(ValueError, match=r"task_ids must be a non-empty 1-D tensor with values .* got shape"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=task_ids)


# ----- saved ConDU files ---------------------------------------------------------------------------------------------
def condu_save(folder):
    from hf_moe_cl.condu.checkpoint import model_fingerprint, save_folder
    from hf_moe_cl.condu.store import DeltaStore

    generator = torch.Generator().manual_seed(0)
    store = DeltaStore("official")
    for t in range(2):
        store.add_task({"w": torch.randn(4, 6, generator=generator)},
                       {"image_mean": torch.randn(3, 16, generator=generator)},
                       {"name": f"task{t}", "classnames": ["a", "b", "c"], "templates": ["{}"]})
    save_folder(folder, store, model_fingerprint(tiny_clip()), {"arguments": {}})
    return folder


def edit_condu_config(folder, edit):
    path = folder / "condu_config.json"
    header = json.loads(path.read_text())
    path.write_text(json.dumps(edit(header)))


def rewrite_triggers(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "condu_triggers.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def drop_last_task(header):
    header["tasks"] = header["tasks"][:1]
    return header


@pytest.mark.parametrize("damage, message", [
    (lambda f: edit_condu_config(f, lambda h: [h]), "should hold a JSON object .* not a list"),
    (lambda f: (f / "condu_config.json").write_text('{"format": '), "condu_config.json is not valid JSON"),
    (lambda f: edit_condu_config(f, lambda h: {k: v for k, v in h.items() if k != "tasks"}), r"it lacks \['tasks'\]"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "shapes": {"w": "4x6"}}), "`shapes` must map tensor names"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "fine_tune": "half"}), "fine_tune is 'half'"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": []}), "`tasks` must be a non-empty list"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": [{**h["tasks"][0], "rescaler": math.nan},
                                                              h["tasks"][1]]}),
     r"tasks\[0\] must be an object with a finite `rescaler`"),
    (lambda f: edit_condu_config(f, lambda h: {**h, "tasks": [{**h["tasks"][0], "classnames": "abc"},
                                                              h["tasks"][1]]}),
     r"tasks\[0\].classnames must be a list of strings"),
    (lambda f: edit_condu_config(f, drop_last_task), r"lists 1 task\(s\) but condu_triggers.safetensors holds "
                                                     r"triggers of tasks \[0, 1\]"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.1.image_mean": torch.zeros(3, 8)})),
     r"prototype.1.image_mean has shape \(3, 8\), not \(3, 16\)"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.zeros(2, 16)})),
     r"prototype.0.image_mean has shape \(2, 16\), not \(3, 16\)"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.full((3, 16), math.nan)})),
     "holds prototype.0.image_mean of dtype torch.float32 with non-finite"),
    (lambda f: rewrite_triggers(f, lambda t: t.update({"prototype.0.image_mean": torch.zeros(3, 16,
                                                                                            dtype=torch.int32)})),
     "holds prototype.0.image_mean of dtype torch.int32"),
])
def test_a_damaged_condu_save_is_named(tmp_path, damage, message):
    from hf_moe_cl.condu.checkpoint import load_folder, model_fingerprint

    folder = condu_save(tmp_path / "save")
    store, _ = load_folder(folder, model_fingerprint(tiny_clip()))  # intact: loads
    assert store.num_tasks == 2
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_folder(folder, model_fingerprint(tiny_clip()))


# ----- saved adapter files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]},  # 4 elements need 16 bytes
    {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]},
    {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
])
def test_a_safetensors_header_whose_tensor_does_not_fit_its_offsets_is_named(tmp_path, entry):
    from hf_moe_cl.files import check_safetensors_file

    path = tmp_path / "adapter_model.safetensors"
    raw = json.dumps({"w": entry}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors has a malformed safetensors header: tensor 'w' "
                                         r"\(dtype .*\) does not fit its data offsets"):
        check_safetensors_file(path)


@pytest.mark.parametrize("task_info", [
    "first", [{"name": 3, "classnames": ["a"], "templates": ["{}"]}], [{"name": "a", "classnames": "ab",
                                                                         "templates": ["{}"]}],
    [{"name": "a"}], [None, None, None], [["a", ["b"], ["{}"]]],
])
def test_a_task_info_of_the_wrong_type_or_length_is_named(tmp_path, task_info):
    from peft import PeftModel

    from hf_moe_cl import MoELoraConfig

    with pytest.raises(ValueError, match="`task_info` must be a list of at most num_tasks=2 entries"):
        MoELoraConfig(num_tasks=2, task_info=task_info)
    moe_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "task_info": task_info}))
    with pytest.raises(ValueError, match="`task_info` must be .* the file was damaged or edited"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_an_unreadable_lock_is_not_taken_over(tmp_path, clip_processor):
    (tmp_path / LOCK_FILE).write_text("")  # e.g. written by a tool that crashed; no pid to check
    with pytest.raises(RuntimeError, match=r"in use by another run: an unknown process \(the lock file is unreadable\)"):
        run(tmp_path, clip_processor)


def test_task_ids_for_another_batch_size_are_refused(clip_inputs):
    with pytest.raises(ValueError, match="3 task ids were given for a batch of 4 samples"):
        moe_model(num_tasks=3).eval()(**clip_inputs, task_ids=torch.tensor([0, 1, 2]))


def test_a_safetensors_file_of_every_common_dtype_passes_the_check(tmp_path):
    from safetensors.torch import save_file

    from hf_moe_cl.files import check_safetensors_file

    tensors = {"bf16": torch.zeros(3, 2, dtype=torch.bfloat16), "empty": torch.zeros(0, 4), "scalar": torch.tensor(1.),
               "bool": torch.zeros(5, dtype=torch.bool), "int": torch.zeros(2, 3, dtype=torch.int64),
               "fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    check_safetensors_file(tmp_path / "ok.safetensors")  # no false refusal


def test_a_missing_path_or_damaged_adapter_config_is_named_before_any_hub_call(tmp_path, monkeypatch):
    """`TaskAgnosticClassifier.from_pretrained` (and the pipeline's loader) on a path that does not exist, or on a
    folder whose adapter_config.json is truncated, name the path or the file, not a Hub or JSON error."""
    from huggingface_hub import HfApi

    from hf_moe_cl import TaskAgnosticClassifier
    from hf_moe_cl.pipeline import MoELoraCLIP

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(HfApi, "model_info", refuse)
    missing = tmp_path / "no-such-run" / "adapter"
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repo id"):
        TaskAgnosticClassifier.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repo id"):
        MoELoraCLIP.from_pretrained(str(missing))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text('{"peft_type": "MOE_LO')
    with pytest.raises(ValueError, match="adapter_config.json"):
        TaskAgnosticClassifier.from_pretrained(str(damaged))


# ----- probes beyond the listed cases: every option, every value read back, the public calls ---------------------------
def option_classes():
    from hf_moe_cl import MoELoraConfig, SelectorConfig
    from hf_moe_cl.continual.methods import ConDUArguments, DDASArguments, LoRAArguments, MoEAdaptersArguments
    from hf_moe_cl.experiments.experiment import AdapterArguments, MethodArguments

    return {"moe": MoEAdaptersArguments, "ddas": DDASArguments, "condu": ConDUArguments, "lora": LoRAArguments,
            "adapter": AdapterArguments,
            "method": MethodArguments, "config": MoELoraConfig,
            "selector": lambda **kw: SelectorConfig(feature_dim=8, **kw),
            "training": lambda **kw: continual_args("/tmp/unused", **kw)}


@pytest.mark.parametrize("kind, option, value, message", [
    ("adapter", "top_k", 30, r"`top_k` \(30\) cannot exceed `num_experts` \(22\)"),
    ("adapter", "num_experts", 0, "`num_experts` must be an integer >= 1, got 0"),
    ("adapter", "noisy_gating", "false", r"`noisy_gating` must be a boolean \(True or False\), got 'false'"),
    ("adapter", "ddas_feature_layer", 0, "`selector.feature_layer` must be None or an integer >= 1"),
    ("adapter", "ddas_feature_extractor", "vgg", r"`selector.feature_extractor` must be one of \('clip', 'alexnet'\)"),
    ("moe", "freeze_experts_per_task", -1, "`freeze_experts_per_task` must be None or an integer >= 0"),
    ("moe", "freeze_images", 0, "`freeze_images` must be None or an integer >= 1"),
    ("moe", "routing_report_images", 2.5, "`routing_report_images` must be an integer"),
    ("moe", "merge_experts_every", math.nan, "`merge_experts_every` must be an integer"),
    ("moe", "shared_router", 1, "`shared_router` must be a boolean"),
    ("ddas", "ddas", "yes", "`ddas` must be a boolean"),
    ("ddas", "ddas_alexnet_weights", 5, "`ddas_alexnet_weights` must be None or a string"),
    ("ddas", "ddas_batch_size", 0, "`ddas_batch_size` must be an integer >= 1"),
    ("condu", "condu_lora_init_std", math.nan, "`condu_lora_init_std` must be a finite number > 0"),
    ("condu", "condu_top_k", 1.5, "`condu_top_k` must be an integer"),
    ("lora", "lora_targets", " , ", "lora_targets names no module"),
    ("method", "rank", 0, "`rank` must be an integer >= 1, got 0"),
    ("method", "method", ["lora"], r"`method` must be a string, got \['lora'\]"),
    ("method", "use_task_learning_rates", "false", "`use_task_learning_rates` must be a boolean"),
    ("config", "expert_bias", "false", "`expert_bias` must be a boolean"),
    ("config", "init_weights", 1, "`init_weights` must be a boolean"),
    ("config", "expert_growth_threshold", True, "`expert_growth_threshold` must be None or a finite number"),
    ("config", "target_modules", 5, "`target_modules` must be None, a string or a list of strings"),
    ("config", "experts_per_module", [1], "`experts_per_module` must be a dict"),
    ("selector", "standardize", "no", "`selector.standardize` must be None or a boolean"),
    ("training", "per_device_train_batch_size", 0, "`per_device_train_batch_size` must be an integer >= 1"),
    ("training", "gradient_accumulation_steps", 0, "`gradient_accumulation_steps` must be an integer >= 1"),
    ("training", "label_smoothing_factor", 1.5, r"`label_smoothing_factor` must be a finite number in \[0, 1\)"),
    ("training", "weight_decay", math.nan, "`weight_decay` must be a finite number >= 0"),
    ("training", "max_grad_norm", -1.0, "`max_grad_norm` must be None or a finite number >= 0"),
    ("training", "adam_beta2", 1.0, r"`adam_beta2` must be a finite number in \[0, 1\)"),
    ("training", "seed", -1, r"`seed` must be an integer in \[0, 4294967295\]"),
    ("training", "save_total_limit", 0, "`save_total_limit` must be None or an integer >= 1"),
    ("training", "task_learning_rates", 1e-3, "`task_learning_rates` must be None or a list"),
    ("training", "train_template", -1, "`train_template` must be an integer >= 0"),
    ("training", "max_steps", 1.5, "`max_steps` must be an integer"),
    ("training", "num_train_epochs", math.nan, "`num_train_epochs` must be a finite number >= 0"),
    ("training", "check_images", "no", "`check_images` must be a boolean"),
])
def test_every_option_refuses_a_wrong_type_or_range_when_made(kind, option, value, message):
    with pytest.raises(ValueError, match=message):
        option_classes()[kind](**{option: value})


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "good"
    moe_model(init_weights=False).save_pretrained(folder)
    return folder


def damaged_copy(saved_adapter, tmp_path, tensor=None, change=None, config=None):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(saved_adapter, folder)
    if tensor is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in sorted(weights) if k.endswith("." + tensor))
        weights[key] = change(weights[key].clone())
        save_file(weights, folder / "adapter_model.safetensors")
    if config is not None:
        values = json.loads((folder / "adapter_config.json").read_text())
        values.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(values))
    return folder


def set_first(value):
    def change(tensor):
        tensor.view(-1)[0] = value
        return tensor
    return change


@pytest.mark.parametrize("tensor, change, message", [
    ("moe_lora_A", set_first(math.nan), "moe_lora_A.default' holds 1 NaN or infinite value"),
    ("moe_lora_B", lambda t: t.fill_(math.inf), "moe_lora_B.default' holds 512 NaN or infinite value"),
    ("moe_lora_router_gate", set_first(-math.inf), "moe_lora_router_gate.default' holds 1 NaN or infinite"),
    ("moe_lora_bias_A", lambda t: t.long(), "moe_lora_bias_A.default' has dtype torch.int64; weights are floating"),
    ("moe_lora_frozen_by", set_first(99), r"frozen_by.default' holds values from -1 to 99; it holds integers in "
                                          r"\[-1, 1\] \(2 task routers\)"),
    ("moe_lora_frozen_by", set_first(-5), r"frozen_by.default' holds values from -5 to -1"),
    ("moe_lora_frozen_by", lambda t: t.float(), "frozen_by.default' has dtype torch.float32"),
    ("moe_lora_counts", set_first(-3), "counts.default' holds values from -3 to 0; it holds integers >= 0"),
    ("moe_lora_router_frozen", lambda t: t.long() + 7, "router_frozen.default' has dtype torch.int64; it holds "
                                                       "booleans"),
])
def test_invalid_values_in_a_saved_adapters_tensors_are_named(saved_adapter, tmp_path, tensor, change, message):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, tensor, change)
    with pytest.raises(ValueError, match=r"checkpoint \(adapter_model.safetensors\) holds invalid values: .*" + message):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_invalid_values_met_when_resuming_name_the_file(saved_adapter, tmp_path):
    from hf_moe_cl.continual.methods import MoEAdapters

    folder = damaged_copy(saved_adapter, tmp_path, "moe_lora_A", set_first(math.nan))
    with pytest.raises(ValueError, match=f"{folder / 'adapter_model.safetensors'}: .* holds 1 NaN"):
        MoEAdapters(moe_model()).load(folder)


@pytest.mark.parametrize("config, message", [
    ({"expert_bias": "false"}, "`expert_bias` must be a boolean"),
    ({"noisy_gating": "false"}, "`noisy_gating` must be a boolean"),
    ({"num_tasks": "2"}, "`num_tasks` must be an integer >= 1, got '2'"),
    ({"experts_per_module": [1]}, "`experts_per_module` must be a dict"),
    ({"target_modules": 5}, "`target_modules` must be None, a string or a list of strings"),
    ({"selector": {"feature_dim": 8, "standardize": "false"}}, "`selector.standardize` must be None or a boolean"),
])
def test_wrongly_typed_values_in_a_saved_adapter_config_name_the_file(saved_adapter, tmp_path, config, message):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, config=config)
    with pytest.raises(ValueError, match=f"{folder / 'adapter_config.json'} holds an invalid value: {message}"):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_experts_per_module_naming_no_adapted_module_is_refused(saved_adapter, tmp_path):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, config={"experts_per_module": {"vision_model.layers.0": 6}})
    with pytest.raises(ValueError, match=r"`experts_per_module` of adapter 'default' names modules the adapter does "
                                         r"not adapt in this model: \['vision_model.layers.0'\]"):
        PeftModel.from_pretrained(tiny_clip(), folder)


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


def test_a_train_template_beyond_a_tasks_templates_is_refused_not_clamped(tmp_path, clip_processor):
    with pytest.raises(ValueError, match=r"train_template=2 but task 'first' has 2 prompt template\(s\)"):
        run(tmp_path, clip_processor, train_template=2)
    assert not any(tmp_path.glob("task-*"))


@pytest.fixture(scope="module")
def agnostic_classifier(module_processor):
    from hf_moe_cl import SelectorConfig, TaskAgnosticClassifier

    model = moe_model()
    model.base_model.enable_selector(SelectorConfig(feature_dim=model.config.projection_dim)).trained[0] = True
    return TaskAgnosticClassifier(model, module_processor)


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


@pytest.mark.parametrize("outer", ["task checkpoint", "run in progress", "finished run"])
def test_an_output_dir_inside_another_run_is_refused(tmp_path, outer):
    checkpoint = tmp_path / "outer" / "task-00-first"
    checkpoint.mkdir(parents=True)
    inner = checkpoint / "inner" if outer == "task checkpoint" else tmp_path / "outer" / "inner"
    if outer == "run in progress":
        (tmp_path / "outer" / LOCK_FILE).write_text("{}")
    else:
        (checkpoint / "continual_progress.json").write_text("{}")
    what = "a task checkpoint of another run" if outer == "task checkpoint" else "the output_dir of another run"
    with pytest.raises(ValueError, match=f"lies inside .*, {what}"):
        with run_lock(inner):
            pass
    assert not inner.exists()
