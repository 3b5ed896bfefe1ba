"""A run's output folder: a new run refuses a folder of task checkpoints unless told to overwrite them, a task
checkpoint appears whole or not at all, task folders stay inside the output folder whatever the task's name, one run
at a time holds it (`.run.lock`), no run nests inside another, and all of this also with `save_task_checkpoints=False`.
A refusal leaves every saved file as it was."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from hf_moe_cl.continual.checkpoints import LOCK_FILE, run_lock, task_folder

from conftest import SRC, colour_task, run, tasks_named, trainer_for, tree_bytes


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----- task checkpoints ----------------------------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_of_checkpoints_unless_asked(tmp_path, clip_processor):
    run(tmp_path, clip_processor)
    saved = folder_bytes(tmp_path / "task-00-first")
    with pytest.raises(ValueError, match="already holds task checkpoints"):
        run(tmp_path, clip_processor, learning_rate=1e-2)
    assert folder_bytes(tmp_path / "task-00-first") == saved
    run(tmp_path, clip_processor, learning_rate=1e-2, overwrite_output_dir=True)
    assert folder_bytes(tmp_path / "task-00-first") != saved


def test_a_new_run_refuses_a_folder_holding_another_runs_adapter_card_or_results_unless_asked(
        tmp_path, clip_processor):
    """Without task checkpoints a finished run leaves its adapter, card and results at the root: a new run there
    (or in a folder with a user's README.md) is refused before it trains, and every byte stays; asked, it replaces."""
    done = tmp_path / "done"
    trainer = trainer_for(done, clip_processor, save_task_checkpoints=False)
    trainer.train_tasks(tasks_named("first", "second"))
    trainer.save_model()
    trainer.save_metrics("all", {"oracle_last": 1.0})
    saved, inode = tree_bytes(done), (done / "adapter_model.safetensors").stat().st_ino
    with pytest.raises(ValueError, match=r"already holds adapter_config.json, adapter_model.safetensors, README.md, "
                                         r"all_results.json, as another run leaves them.*overwrite_output_dir=True"):
        trainer_for(done, clip_processor).train_tasks(tasks_named("first", "second"))
    assert tree_bytes(done) == saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my project")
    with pytest.raises(ValueError, match="already holds README.md"):
        run(mine, clip_processor)
    assert files_under(mine) == ["README.md"] and (mine / "README.md").read_text() == "# my project"
    replacing = trainer_for(done, clip_processor, overwrite_output_dir=True)
    replacing.train_tasks(tasks_named("first", "second"))
    replacing.save_model()
    assert (done / "adapter_model.safetensors").stat().st_ino != inode  # written again, atomically


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path, clip_processor):
    leftover = tmp_path / ".task-01-second.tmp-abcdef12"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    run(tmp_path, clip_processor)
    assert not leftover.exists() and (tmp_path / "task-01-second").is_dir()


def test_save_total_limit_keeps_the_latest_task_checkpoints(tmp_path, clip_processor):
    run(tmp_path, clip_processor, save_total_limit=1)
    assert sorted(p.name for p in tmp_path.glob("task-*")) == ["task-01-second"]


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


def test_an_unreadable_lock_is_not_taken_over(tmp_path, clip_processor):
    (tmp_path / LOCK_FILE).write_text("")  # e.g. written by a tool that crashed; no pid to check
    with pytest.raises(RuntimeError, match=r"in use by another run: an unknown process \(the lock file is unreadable\)"):
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


# ----- save_task_checkpoints=False keeps every protection of the output folder ---------------------------------------
def two_tasks():
    return [colour_task("first", n_train=16, n_eval=6, seed=0),
            colour_task("second", n_train=16, n_eval=6, seed=1, offset=3)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, module_processor):
    """A finished run with task checkpoints and its final adapter at the root (`save_model`)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    trainer = trainer_for(folder, module_processor)
    trainer.train_tasks(two_tasks())
    trainer.save_model()
    return folder


@pytest.fixture
def run1(finished_run, tmp_path):
    """A copy of the finished run for one test to try to damage, with its bytes before the test."""
    folder = tmp_path / "run1"
    shutil.copytree(finished_run, folder)
    return folder, tree_bytes(folder)


@pytest.mark.parametrize("inner", ["task-00-first", "task-00-first/inner", "inner"])
def test_without_task_checkpoints_an_output_dir_inside_another_run_is_refused(run1, module_processor, inner):
    folder, saved = run1
    what = "a task checkpoint of another run" if "/" in inner else "the output_dir of another run"
    with pytest.raises(ValueError, match=f"output_dir .* lies inside .*, {what}: .* Choose an output_dir outside it"):
        trainer_for(folder / inner, module_processor, save_task_checkpoints=False)
    assert tree_bytes(folder) == saved  # nothing created or replaced, not even the empty folder
    resumed = trainer_for(folder, module_processor).train_tasks(two_tasks(), resume=True)
    assert len(resumed.accuracy_matrix) == 2  # run 1 still resumes from its own checkpoints


def test_without_task_checkpoints_a_new_run_refuses_a_folder_of_checkpoints_unless_asked(run1, module_processor):
    folder, saved = run1
    with pytest.raises(ValueError, match=r"already holds task checkpoints \(.*task-00-first.*\)\. Resume them with "
                                         r"resume=True .* or set overwrite_output_dir=True to replace them"):
        trainer_for(folder, module_processor, seed=9, save_task_checkpoints=False).train_tasks(two_tasks())
    assert tree_bytes(folder) == saved
    trainer = trainer_for(folder, module_processor, seed=9, save_task_checkpoints=False, overwrite_output_dir=True)
    trainer.train_tasks(two_tasks())
    trainer.save_model()
    assert not list(folder.glob("task-*")) and not (folder / LOCK_FILE).exists()  # old checkpoints gone, lock freed
    assert (folder / "adapter_model.safetensors").read_bytes() != saved["adapter_model.safetensors"]


def test_without_task_checkpoints_a_folder_in_use_is_refused(tmp_path, module_processor):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = {"pid": 1, "host": "another-host", "started": "2025-01-01 00:00:00 +0000"}
    (folder / LOCK_FILE).write_text(json.dumps(holder))
    saved = tree_bytes(folder)
    with pytest.raises(RuntimeError, match=r"in use by another run: process 1 on another-host, started 2025-01-01"):
        trainer_for(folder, module_processor, save_task_checkpoints=False).train_tasks(two_tasks())
    assert tree_bytes(folder) == saved


def test_resume_without_task_checkpoints_is_refused(run1, module_processor):
    folder, saved = run1
    with pytest.raises(ValueError, match=r"^resume=True continues from the task checkpoints in output_dir, but "
                                         r"save_task_checkpoints=False neither writes nor reads them\. Set "
                                         r"save_task_checkpoints=True to resume, or start the run without "
                                         r"resume=True\.$"):
        trainer_for(folder, module_processor, save_task_checkpoints=False).train_tasks(two_tasks(), resume=True)
    assert tree_bytes(folder) == saved


def test_the_advice_after_a_refused_resume_is_right_with_overwrite_output_dir(run1, module_processor):
    folder, saved = run1
    with pytest.raises(ValueError, match=r"written by another run\. What differs \(checkpoint -> now\): seed: 3 -> 5\. "
                                         r".*, use another output_dir, or start over: run without resume=True and with "
                                         r"overwrite_output_dir=True\.$"):
        trainer_for(folder, module_processor, seed=5, overwrite_output_dir=True).train_tasks(two_tasks(), resume=True)
    assert tree_bytes(folder) == saved
