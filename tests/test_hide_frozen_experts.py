"""`hide_frozen_experts`: a task's router selects only experts no earlier task froze, so every selection of a new
task trains; learned tasks route as before, and a task left fewer than top_k experts is refused before it trains."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_moe_cl import MoELoraConfig
from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.continual.methods import MoEAdapters, MoEAdaptersArguments
from hf_moe_cl.files import json_sha256

from conftest import colour_task, continual_args, tiny_clip

VISION0 = "vision_model.encoder.layers.0"


def hiding_model(hide=True, **kwargs):
    torch.manual_seed(0)
    config = MoELoraConfig(**{"num_tasks": 3, "num_experts": 4, "top_k": 2, "r": 4, "init_weights": False,
                              "hide_frozen_experts": hide, **kwargs})
    return get_peft_model(tiny_clip(), config)


def train(model, inputs, task, steps=3):
    model.train()
    model.base_model.set_task(task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**inputs).logits_per_image.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def evaluate(model, inputs, task_ids):
    """Logits and, per layer, how often each expert was chosen, routed by `task_ids` (a task or per-sample ids)."""
    moe, selections = model.base_model, {}
    model.eval()
    with torch.no_grad(), moe.routing(task_ids, selections=selections):
        logits = model(**inputs).logits_per_image
    return logits, moe.selection_histogram(selections)


def freeze(model, experts, task):
    for layer in model.base_model.moe_layers().values():
        layer.freeze_experts("default", experts, task)
        layer.freeze_router("default", task)


def routes(batch, task):
    """A whole batch of `task`, the same per sample, and `task` mixed with zero-shot samples (-1)."""
    return [task, torch.full((batch,), task), torch.where(torch.arange(batch) % 2 == 0, task, -1)]


def test_a_new_task_selects_only_experts_no_earlier_task_froze(clip_inputs):
    batch = clip_inputs["pixel_values"].shape[0]
    on_frozen = {}
    for hide in (True, False):
        model = hiding_model(hide)
        moe = model.base_model
        train(model, clip_inputs, task=0)
        before = [evaluate(model, clip_inputs, ids)[0] for ids in routes(batch, 0)]
        freeze(model, [0, 1], task=0)
        # a task keeps every expert it froze itself: its routing does not change when it freezes them
        assert all(torch.equal(a, evaluate(model, clip_inputs, ids)[0]) for a, ids in zip(before, routes(batch, 0)))
        layer = moe.moe_layers()[VISION0]
        if hide:
            assert layer.hidden_experts("default", 1).tolist() == [True, True, False, False]
            assert layer.hidden_experts("default", torch.tensor([0, 1, 2])).tolist() == [
                [False] * 4, [True, True, False, False], [True, True, False, False]]
        else:
            assert layer.hidden_experts("default", 1) is None
        moe.check_selectable(1)
        train(model, clip_inputs, task=1)
        # (the mixed batch's zero-shot samples are routed too, for static shapes, and only their output dropped)
        histograms = [evaluate(model, clip_inputs, ids)[1] for ids in routes(batch, 1)[:2]]
        on_frozen[hide] = sum(int(c[:2].sum()) for c in moe.selection_counts(1).values()) + sum(
            int(h[:2].sum()) for histogram in histograms for h in histogram.values())
        assert all(int(h.sum()) > 0 for histogram in histograms for h in histogram.values())
    assert on_frozen[True] == 0  # never: in training, for a batch of task 1, or per sample
    assert on_frozen[False] > 0  # the paper's router does select them


def test_learned_tasks_stay_bit_identical_while_the_bank_grows_later_tasks_train_and_it_is_reloaded(
        tmp_path, clip_inputs):
    batch = clip_inputs["pixel_values"].shape[0]
    model = hiding_model(expert_growth_threshold=0.5)
    moe = model.base_model
    learned = {}
    for task in (0, 1):
        moe.grow_experts(task)
        moe.check_selectable(task)
        train(model, clip_inputs, task=task)
        learned[task] = [evaluate(model, clip_inputs, ids)[0] for ids in routes(batch, task)]
        freeze(model, list(range(4 + 2 * task)), task)  # every expert the task could select: it used them all
    assert moe.grow_experts(2)[VISION0] == 2
    train(model, clip_inputs, task=2)
    assert all(int(c[:6].sum()) == 0 and int(c[6:].sum()) > 0 for c in moe.selection_counts(2).values())
    assert all(int(c[:4].sum()) == 0 for c in moe.selection_counts(1).values())
    learned[2] = [evaluate(model, clip_inputs, ids)[0] for ids in routes(batch, 2)]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].hide_frozen_experts
    for task, logits in learned.items():
        for again in (model, loaded) if task < 2 else (loaded,):
            assert all(torch.equal(a, evaluate(again, clip_inputs, ids)[0])
                       for a, ids in zip(logits, routes(batch, task)))


def route_by_every_way(model, clip_inputs, task):
    """`task`'s router chosen by set_task, by routing() for one sample of a batch, and by the forward's task_ids."""
    moe, batch = model.base_model, clip_inputs["pixel_values"].shape[0]
    moe.set_task(task)
    with moe.routing(torch.tensor([task] + [-1] * (batch - 1))):
        pass
    model(**clip_inputs, task_ids=torch.full((batch,), task))


def test_a_task_left_fewer_than_top_k_experts_is_refused_by_every_way_of_routing_to_it(clip_inputs):
    """set_task, routing() and task_ids check the routes they are given: a router left one expert would mix one
    expert only, and one left none gives NaN (measured before the check), so both are refused before any forward."""
    batch = clip_inputs["pixel_values"].shape[0]
    ways = {"set_task": lambda moe: moe.set_task(1),
            "routing": lambda moe: moe.routing(torch.tensor([1] + [-1] * (batch - 1))).__enter__(),
            "task_ids": lambda moe: moe.model(**clip_inputs, task_ids=torch.full((batch,), 1)),
            "check_selectable": lambda moe: moe.check_selectable(torch.tensor([0, -1, 1]))}
    for frozen, left in (([0, 1, 2], 1), ([0, 1, 2, 3], 0)):
        for hide in (True, False):
            model = hiding_model(hide)
            moe = model.base_model
            freeze(model, frozen, task=0)
            moe.set_task(0)
            if not hide:
                route_by_every_way(model, clip_inputs, 1)  # the paper's router selects frozen experts too
                continue
            for way, call in ways.items():
                with pytest.raises(ValueError, match=rf"With hide_frozen_experts, task router 1 could select only "
                                                     rf"{left} expert\(s\) in .* fewer than top_k=2: earlier tasks "
                                                     r"froze the others\. Grow the bank"):
                    call(moe)
                assert moe.active_task == 0 and not moe._call_routes, way  # nothing of the refused route is kept
            route_by_every_way(model, clip_inputs, 0)  # the task that froze them keeps them all
            assert torch.isfinite(evaluate(model, clip_inputs, torch.tensor([0] + [-1] * (batch - 1)))[0]).all()


def test_a_run_stops_before_the_task_its_earlier_tasks_left_too_few_experts(tmp_path, clip_processor):
    """Coverage freezing every expert the first task used leaves the second too few: the run stops there."""
    model = hiding_model(num_tasks=2, num_experts=2)
    method = MoEAdapters(model, MoEAdaptersArguments(freeze_policy="coverage"))
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path, max_steps=2),
                               processing_class=clip_processor)
    with pytest.raises(ValueError, match="With hide_frozen_experts, task router 1"):
        trainer.train_tasks([colour_task("first"), colour_task("second", seed=1)])
    assert model.base_model.task_info[0]["name"] == "first" and model.base_model.task_info[1] is None


def test_a_sequence_the_top_k_policy_leaves_too_few_experts_is_refused_before_its_first_task(
        tmp_path, clip_processor):
    """4 experts, each task freezing its top 2 that no earlier task froze: a third task would have none left, which
    the options alone tell, so the run stops before any task trains; two tasks, or growth, leave enough."""
    tasks = [colour_task("first"), colour_task("second", seed=1), colour_task("third", seed=2)]
    model = hiding_model()
    trainer = ContinualTrainer(method=MoEAdapters(model, MoEAdaptersArguments()),
                               args=continual_args(tmp_path / "three", max_steps=1), processing_class=clip_processor)
    with pytest.raises(ValueError, match=r"With hide_frozen_experts, 3 tasks freezing 2 expert\(s\) per layer each "
                                         r"leave the last one 0 expert\(s\) of 4, fewer than top_k=2\. Grow the bank"):
        trainer.train_tasks(tasks)
    assert model.base_model.task_info == [None] * 3 and not list((tmp_path / "three").glob("task-*"))
    for name, overrides, sequence in (("two", {}, tasks[:2]), ("growth", {"expert_growth_threshold": 0.5}, tasks)):
        ContinualTrainer(method=MoEAdapters(hiding_model(**overrides), MoEAdaptersArguments()),
                         args=continual_args(tmp_path / name, max_steps=1),
                         processing_class=clip_processor).train_tasks(sequence)


def test_the_option_is_a_checked_flag_and_adapters_saved_before_it_keep_their_settings_hash():
    with pytest.raises(ValueError, match="hide_frozen_experts"):
        MoELoraConfig(hide_frozen_experts="yes")
    config = MoELoraConfig()
    assert config.settings_hash() == json_sha256({"task_info": None, "selector": None, "expert_activation": "relu"})
    assert MoELoraConfig(hide_frozen_experts=True).settings_hash() != config.settings_hash()


def routers_over_trainable_experts(clip_inputs):
    """Four tasks on a growing bank, each freezing up to three experts it used per layer: per task the AdamW state's
    size, the vision block's trainable router shape as the task trained, and the logits of every task at the end."""
    model = hiding_model(num_tasks=4, expert_growth_threshold=0.5)
    moe = model.base_model
    layer = moe.moe_layers()[VISION0]
    states, shapes = [], []
    for task in range(4):
        moe.grow_experts(task)
        model.train()
        moe.set_task(task)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for _ in range(4):
            model(**clip_inputs).logits_per_image.logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        states.append(sum(t.numel() for state in optimizer.state.values() for t in state.values() if t.dim()))
        shapes.append(tuple(layer.moe_lora_trainable_router_gate["default"].shape))
        for each in moe.moe_layers().values():
            counts = each.moe_lora_counts["default"][task]
            each.freeze_experts("default", torch.nonzero(counts).flatten()[:3].tolist(), task)
            each.freeze_router("default", task)
    batch = clip_inputs["pixel_values"].shape[0]
    logits = {(task, i): evaluate(model, clip_inputs, ids)[0] for task in range(4)
              for i, ids in enumerate(routes(batch, task))}
    return states, shapes, logits


def test_trainable_routers_hold_only_the_trainable_experts_columns_and_train_as_full_masked_rows(
        monkeypatch, clip_inputs):
    """With hide_frozen_experts the routers that can still train select only the trainable experts, so their
    parameters hold those columns alone: the optimizer's state does not grow with the bank, and every output is bit
    for bit that of full-width routers whose other columns are masked (weight decay included)."""
    from hf_moe_cl.tuners.moe_lora.bank import ExpertBank

    states, shapes, logits = routers_over_trainable_experts(clip_inputs)
    monkeypatch.setattr(ExpertBank, "_router_columns", lambda self, adapter, name: None)
    full_states, full_shapes, full_logits = routers_over_trainable_experts(clip_inputs)
    assert all(torch.equal(logits[key], full_logits[key]) for key in logits)
    width = tiny_clip().config.vision_config.hidden_size
    assert shapes[0] == full_shapes[0] == (4, width, 4)  # every router and every expert can train at first
    assert [shape[0] for shape in shapes] == [4, 3, 2, 1] and all(shape[1] == width for shape in shapes)
    assert all(shape[2] < full[2] for shape, full in zip(shapes[1:], full_shapes[1:]))  # full: every expert
    assert states[0] == full_states[0] and all(a < b for a, b in zip(states[1:], full_states[1:]))
