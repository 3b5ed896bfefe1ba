"""The task loop carries nothing from one task to the next: each task's settings come from the inputs alone."""

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.continual.methods import MoEAdapters

from conftest import StopAtTask, colour_task, continual_args, moe_model


class RecordRates(TrainerCallback):
    """The learning rate each task's optimizer was built with, and the one its arguments say."""

    def __init__(self):
        self.optimizer, self.arguments = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.arguments.append(args.learning_rate)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1:
            self.optimizer.append(optimizer.param_groups[0]["initial_lr"])


def two_tasks():
    """The first task has an official rate for MoE-Adapters, the second none (it takes `learning_rate`)."""
    first = colour_task("first", n_train=16, n_eval=6, seed=0)
    first.official_learning_rates = {"moe-adapters": 5e-3}
    return [first, colour_task("second", n_train=16, n_eval=6, seed=1, offset=3)]


def run(output_dir, processor, stop_at=None, resume=False):
    model = moe_model()
    args = continual_args(output_dir, learning_rate=1e-3, warmup_steps=0)
    given = copy.deepcopy(args.to_dict())
    rates = RecordRates()
    trainer = ContinualTrainer(method=MoEAdapters(model), args=args, processing_class=processor, callbacks=[rates])
    if stop_at is not None:
        trainer.add_callback(StopAtTask(trainer, stop_at))
        with pytest.raises(KeyboardInterrupt):
            trainer.train_tasks(two_tasks())
        return None, None
    trainer.train_tasks(two_tasks(), resume=resume)
    assert args.to_dict() == given, "a field of the user's arguments changed during the run"
    return model, rates


def test_each_task_trains_at_its_own_rate_and_a_resumed_run_gives_the_same_model(tmp_path, clip_processor):
    """Before 0.3 the second task fell back to `args.learning_rate`, which the first task had overwritten: both
    trained at 5e-3 and the user's arguments said 5e-3 afterwards, while a run resumed after the first task trained
    the second at 1e-3. Now the rates are [5e-3, 1e-3] either way."""
    model, rates = run(tmp_path / "whole", clip_processor)
    assert rates.optimizer == pytest.approx([5e-3, 1e-3]) and rates.arguments == pytest.approx([5e-3, 1e-3])
    run(tmp_path / "stopped", clip_processor, stop_at="second")
    resumed, resumed_rates = run(tmp_path / "stopped", clip_processor, resume=True)
    assert resumed_rates.optimizer == pytest.approx([1e-3])
    expected, got = model.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
