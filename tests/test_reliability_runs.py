"""Runs that share or reuse an output folder, and the Trainer options around the task loop: each case ends in a
clear error that names the problem and the fix, with every saved file untouched. The table of cases is
docs/reliability.md."""

import json
import shutil

import pytest
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from hf_moe_cl import ContinualTrainer
from hf_moe_cl.continual.checkpoints import LOCK_FILE

from conftest import colour_task, continual_args, moe_model


def two_tasks():
    return [colour_task("first", n_train=16, n_eval=6, seed=0),
            colour_task("second", n_train=16, n_eval=6, seed=1, offset=3)]


def tree_bytes(root):
    """Every file under `root` (relative path -> bytes) and every folder (-> None)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def trainer_for(output_dir, processor, **overrides):
    return ContinualTrainer(model=moe_model(), args=continual_args(output_dir, max_steps=1, **overrides),
                            processing_class=processor)


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


# ----- save_task_checkpoints=False keeps every protection of the output folder ------------------------------------
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


# ----- Trainer options the task loop does itself ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(save_strategy="steps", save_steps=1), r"`save_strategy='steps'` cannot be used with ContinualTrainer: the "
     r"Trainer's checkpoint-N folders count the steps from 0 in every task.*\(save_task_checkpoints\)\. Leave "
     r"`save_strategy` at 'no'"),
    (dict(save_strategy="epoch"), r"`save_strategy='epoch'` cannot be used"),
    (dict(save_strategy=SaveStrategy.BEST), r"`save_strategy=<SaveStrategy.BEST: 'best'>` cannot be used"),
    (dict(eval_strategy="steps", eval_steps=1), r"`eval_strategy='steps'` cannot be used with ContinualTrainer: the "
     r"Trainer has no eval_dataset; .*call trainer.evaluate\(\) from a callback\. Leave `eval_strategy` at 'no'"),
    (dict(eval_strategy="epoch"), r"`eval_strategy='epoch'` cannot be used"),
    (dict(load_best_model_at_end=True), r"`load_best_model_at_end=True` cannot be used with ContinualTrainer: every "
     r"task keeps its own checkpoint"),
])
def test_trainer_saves_and_evaluations_inside_a_task_are_refused_when_the_arguments_are_made(tmp_path, overrides,
                                                                                              message):
    with pytest.raises(ValueError, match=message):
        continual_args(tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()


def test_the_task_loops_own_strategies_are_accepted(tmp_path):
    args = continual_args(tmp_path, save_strategy=SaveStrategy.NO, eval_strategy=IntervalStrategy.NO, save_steps=1)
    assert args.save_strategy == "no" and args.eval_strategy == "no"


@pytest.mark.parametrize("split", ["../../escaped", "../escaped", "a/b", "an absolute path", "", ".hidden", "..",
                                   "a" * 65, 3, None])
def test_save_metrics_refuses_a_split_that_is_not_a_plain_file_name(tmp_path, module_processor, split):
    split = str(tmp_path / "escaped") if split == "an absolute path" else split
    folder = tmp_path / "a" / "b" / "run"
    trainer = trainer_for(folder, module_processor)
    trainer.save_metrics("all", {"accuracy": 50.0})
    saved = tree_bytes(tmp_path)
    with pytest.raises(ValueError, match=r"save_metrics: the split .* names the file <split>_results.json in "
                                         r"output_dir, so it must be a plain file name"):
        trainer.save_metrics(split, {"accuracy": 1.0})
    assert tree_bytes(tmp_path) == saved


# ----- the task list -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda task: [], lambda task: (), lambda task: None, lambda task: "first", lambda task: task,
    lambda task: ["first"], lambda task: [task.train_dataset], lambda task: (t for t in [task]),
], ids=["empty list", "empty tuple", "None", "a string", "one task", "a name", "a dataset", "a generator"])
def test_train_tasks_refuses_anything_but_a_non_empty_list_of_tasks(tmp_path, module_processor, make):
    folder = tmp_path / "run"
    trainer = trainer_for(folder, module_processor)
    with pytest.raises(ValueError, match=r"(?s)^train_tasks needs a non-empty list of ContinualTask \(one per task, in "
                                         r"training order\), got .*\.$"):
        trainer.train_tasks(make(colour_task("first", n_train=16, n_eval=6)))
    assert tree_bytes(folder) == {}  # no lock, no checkpoint
