"""Resuming a run (`train_tasks(..., resume=True)`): the task checkpoints must be this run's (its identity: method,
adapter, training settings, tasks and base model; what differs is named) and their progress files intact; a task that
diverges stops before it is saved, and it may resume at another rate; a folder with nothing to resume is refused,
one whose run was killed in its first task starts over."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_moe_cl.continual.checkpoints import LOCK_FILE

from conftest import colour_task, continual_args, flip_lowest_bits, moe_model, run, tasks_named, tiny_clip


def two_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3)]


# ----- the run's identity --------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("change, named", [
    (dict(gradient_accumulation_steps=2), "another run.*gradient_accumulation_steps: 1 -> 2"),
    (dict(optim="sgd"), "another run.*optimizer.optim: 'adamw_torch.*' -> 'sgd'"),
    (dict(max_grad_norm=1.0), "another run.*max_grad_norm: 0.0 -> 1.0"),
    (dict(adam_beta2=0.98), "another run.*optimizer.adam_beta2: 0.999 -> 0.98"),
    (dict(protocol_unit=1), "another run.*protocol_unit: 128 -> 1"),
    (dict(data_seed=7), "another run.*data_seed: None -> 7"),
    (dict(dataloader_drop_last=True), "another run.*dataloader_drop_last: None -> True"),
    (dict(lr_scheduler_kwargs={"num_cycles": 2}), r"another run.*lr_scheduler_kwargs: None -> .*num_cycles"),
    (dict(bf16_base=True), r"another run.*base_model.weights: '[0-9a-f]+' -> '[0-9a-f]+'; base_model.dtype: None -> "
                           r"'bfloat16'"),
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
    if change.pop("bf16_base", False):
        model = moe_model().to(torch.bfloat16)
    tasks = tasks_named(*change.pop("tasks")) if "tasks" in change else None
    with pytest.raises(ValueError, match=named):
        run(tmp_path, clip_processor, tasks=tasks, model=model, resume=True, **change)


def test_a_checkpoint_of_another_method_does_not_load_silently(tmp_path, clip_processor):
    from hf_moe_cl.continual.methods import ContinualLoRA

    run(tmp_path, clip_processor, tasks=two_tasks()[:1])
    lora = ContinualLoRA(get_peft_model(tiny_clip(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    with pytest.raises(ValueError, match="does not fit this model"):
        lora.load(tmp_path / "task-00-first")


# ----- a task that diverges ------------------------------------------------------------------------------------------
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


def test_a_diverging_first_task_advises_a_new_run_not_a_resume(tmp_path, clip_processor):
    tasks = two_tasks()
    tasks[0].learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"task 1/2: first: .*then run again \(no task checkpoint exists yet: "
                                                 r"nothing to resume\)") as error:
        run(tmp_path, clip_processor, tasks=tasks, max_steps=4)
    assert "resume=True" not in str(error.value)


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


# ----- the progress file ---------------------------------------------------------------------------------------------
def test_a_damaged_progress_file_is_named(tmp_path, clip_processor):
    run(tmp_path, clip_processor, tasks=two_tasks()[:1])
    (tmp_path / "task-00-first" / "continual_progress.json").write_text("")
    with pytest.raises(ValueError, match=r"task-00-first/continual_progress.json is not valid JSON \(0 bytes"):
        run(tmp_path, clip_processor, resume=True)


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


# ----- the checkpoint's files are the ones saved --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["bit flips", "another task's weights copied over after a kill"])
def test_a_damaged_or_swapped_checkpoint_file_is_refused_at_resume(tmp_path, clip_processor, damage):
    run(tmp_path, clip_processor)
    weights = tmp_path / "task-01-second" / "adapter_model.safetensors"
    if damage == "bit flips":  # the lowest bit of every float: size and header unchanged
        flip_lowest_bits(weights)
    else:
        weights.write_bytes((tmp_path / "task-00-first" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"task-01-second/adapter_model.safetensors is not the file that was saved: "
                                         r"its sha256 differs from the one .*task-01-second/continual_progress.json "
                                         r"records .*Delete .*task-01-second to train task 2 again"):
        run(tmp_path, clip_processor, resume=True)


def test_a_condu_checkpoint_with_damaged_triggers_is_refused_at_resume(tmp_path, clip_processor):
    from hf_moe_cl import ContinualTrainer
    from hf_moe_cl.continual.methods import ConDU, ConDUArguments

    def condu_run(resume=False):
        trainer = ContinualTrainer(method=ConDU(tiny_clip(), ConDUArguments(condu_top_k=1), rank=2),
                                   args=continual_args(tmp_path, max_steps=1), processing_class=clip_processor)
        return trainer.train_tasks(tasks_named("first"), resume=resume)

    condu_run()
    flip_lowest_bits(tmp_path / "task-00-first" / "condu_triggers.safetensors")
    with pytest.raises(ValueError, match=r"condu_triggers.safetensors is not the file that was saved"):
        condu_run(resume=True)


# ----- nothing to resume ---------------------------------------------------------------------------------------------
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
