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
from datasets import ClassLabel, Dataset, Features, Value
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
    from hf_moe_cl.continual.checkpoints import base_weights_fingerprint

    torch.manual_seed(0)
    first = moe_model()
    second = moe_model(init_weights=False)  # other adapter values, same base
    assert base_weights_fingerprint(first) == base_weights_fingerprint(second) == base_weights_fingerprint(
        tiny_clip())
    assert base_weights_fingerprint(tiny_clip(seed=1)) != base_weights_fingerprint(tiny_clip())


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
