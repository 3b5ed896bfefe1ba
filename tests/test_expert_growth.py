"""An expert bank that grows (`expert_growth_threshold`): zero-effect new experts, learned tasks bit-identical,
saved / loaded / resumed / continued with their grown shapes."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_moe_cl import MoELoraConfig
from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.experiments.experiment import AdapterArguments
from hf_moe_cl.continual.methods import MoEAdapters, MoEAdaptersArguments

from conftest import StopAtTask, colour_task, continual_args, tiny_clip

VISION0 = "vision_model.encoder.layers.0"


def config(**kwargs):
    return MoELoraConfig(**{"num_tasks": 3, "num_experts": 4, "top_k": 2, "r": 4, **kwargs})


def train_steps(model, inputs, task, steps=4):
    model.train()
    model.base_model.set_task(task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(**inputs).logits_per_image.logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def outputs(model, inputs, tasks):
    model.eval()
    with torch.no_grad():
        return {t: model(**inputs, task_ids=torch.full((inputs["pixel_values"].shape[0],), t)).logits_per_image
                for t in tasks}


def freeze_all(model, task):
    moe = model.base_model
    for layer in moe.moe_layers().values():
        layer.freeze_experts("default", list(range(layer.expert_count("default"))), task)
        layer.freeze_router("default", task)


def test_new_experts_change_no_learned_task_and_train_for_the_next(clip_inputs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), config(init_weights=False))
    moe = model.base_model
    train_steps(model, clip_inputs, task=0)
    freeze_all(model, 0)  # full coverage: every expert belongs to task 0
    before = outputs(model, clip_inputs, [0])
    added = moe.grow_experts(1, threshold=0.5)
    assert added == {name: 2 for name in moe.moe_layers()}  # 0 of 4 trainable -> 0.5 x 4 = 2 new: 2 of 6
    assert moe.moe_config.experts_per_module == {name: 6 for name in moe.moe_layers()}
    layer = moe.moe_layers()[VISION0]
    assert layer.moe_lora_A["default"].shape == (6, 4, 48) and layer.moe_lora_router_gate["default"].shape[-1] == 6
    assert torch.all(layer.moe_lora_B["default"][4:] == 0) and torch.all(layer.moe_lora_bias_B["default"][4:] == 0)
    assert layer.moe_lora_frozen_by["default"].tolist() == [0] * 4 + [-1] * 2
    assert layer.moe_lora_expert_task["default"].tolist() == [0] * 4 + [1] * 2
    assert layer.visible_experts("default", 0) == 4 and layer.visible_experts("default", 1) == 6
    assert layer.hidden_experts("default", torch.tensor([0])).tolist() == [[False] * 4 + [True] * 2]
    assert not layer.hidden_experts("default", torch.tensor([1, 2])).any()
    assert all(torch.equal(before[0], after) for after in outputs(model, clip_inputs, [0]).values())
    start = layer.moe_lora_B["default"].detach().clone()
    train_steps(model, clip_inputs, task=1, steps=6)
    assert all(torch.equal(before[0], after) for after in outputs(model, clip_inputs, [0]).values())
    assert not torch.equal(layer.moe_lora_B["default"][4:], start[4:])  # the new experts learned task 1
    assert torch.equal(layer.bank("default", "moe_lora_B")[:4], start[:4])
    assert moe.selection_counts(1)[VISION0].shape == (6,)


def test_growth_brings_each_layer_back_to_the_threshold_and_spares_the_others():
    model = get_peft_model(tiny_clip(), config(num_experts=10))
    moe = model.base_model
    layers = moe.moe_layers()
    layers[VISION0].freeze_experts("default", list(range(9)), task=0)  # 1 of 10 trainable
    layers["text_model.encoder.layers.0"].freeze_experts("default", [0, 1, 2], task=0)  # 7 of 10
    assert moe.grow_experts(1, threshold=0.05) == {}
    moe.moe_config.expert_growth_threshold = 0.4
    added = moe.grow_experts(1)
    assert added == {VISION0: 3}  # 1 + 3 = 0.4 x 10 trainable; no more
    assert moe.expert_slots()[VISION0] == {"total": 13, "trainable": 4}
    layers["vision_model.encoder.layers.1"].freeze_experts("default", list(range(10)), task=1)
    assert moe.grow_experts(2, threshold=0.1) == {"vision_model.encoder.layers.1": 2}  # at least top_k


def test_the_trainable_set_stays_bounded_however_many_tasks_froze_theirs():
    """Each task freezing every expert it had: the bank grows by the same count per task, and the trainable set
    (and with it the optimizer's state and a step's cost) stays at threshold x num_experts."""
    model = get_peft_model(tiny_clip(), config(num_tasks=12, num_experts=10, expert_growth_threshold=0.3))
    moe = model.base_model
    for task in range(11):
        layer = moe.moe_layers()[VISION0]
        trainable = [e for e in range(layer.expert_count("default")) if layer.moe_lora_frozen_by["default"][e] < 0]
        layer.freeze_experts("default", trainable, task)
        assert moe.grow_experts(task + 1)[VISION0] == 3
        assert moe.expert_slots()[VISION0] == {"total": 10 + 3 * (task + 1), "trainable": 3}


def test_config_and_arguments_refuse_bad_growth_settings():
    for bad in (0.0, 1.0, -0.5, True, "half"):
        with pytest.raises(ValueError, match="expert_growth_threshold"):
            config(expert_growth_threshold=bad)
    with pytest.raises(ValueError, match="at least `num_experts`"):
        config(experts_per_module={VISION0: 3})
    with pytest.raises(ValueError, match="expert_growth_threshold"):
        AdapterArguments(expert_growth_threshold=1.5)
    model = get_peft_model(tiny_clip(), config())
    with pytest.raises(ValueError, match=r"`threshold` must be None or a finite number in \(0, 1\)"):
        model.base_model.grow_experts(1, threshold=2.0)


def test_a_grown_adapter_loads_with_its_shapes_and_keeps_growing(tmp_path, clip_inputs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), config(init_weights=False, expert_growth_threshold=0.5))
    train_steps(model, clip_inputs, task=0)
    freeze_all(model, 0)
    model.base_model.grow_experts(1)
    train_steps(model, clip_inputs, task=1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["experts_per_module"][VISION0] == 6 and saved["expert_growth_threshold"] == 0.5
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path, is_trainable=True)
    expected, got = outputs(model, clip_inputs, [0, 1]), outputs(loaded, clip_inputs, [0, 1])
    assert all(torch.equal(expected[t], got[t]) for t in (0, 1))
    layer = loaded.base_model.moe_layers()[VISION0]
    assert layer.moe_lora_expert_task["default"].tolist() == [0] * 4 + [1] * 2
    assert loaded.base_model.frozen_experts() == model.base_model.frozen_experts()
    freeze_all(loaded, 1)
    assert loaded.base_model.grow_experts(2)[VISION0] == 2  # config's threshold: 0 of 6 -> 0.5 x 4 new
    assert all(torch.equal(expected[t], got) for t, got in outputs(loaded, clip_inputs, [0, 1]).items())




def growing_method(model_seed=0, **arguments):
    torch.manual_seed(model_seed)
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=1, num_experts=4, top_k=2, r=4,
                                                      expert_growth_threshold=0.5))
    return MoEAdapters(model, MoEAdaptersArguments(**{"freeze_policy": "coverage", **arguments}))


def three_tasks():
    return [colour_task("first", seed=0), colour_task("second", seed=1, offset=3, mode="L"),
            colour_task("third", seed=2, offset=1)]


def test_trainer_grows_before_tasks_resumes_and_a_published_model_keeps_growing(tmp_path, clip_processor,
                                                                                clip_inputs):
    tasks = three_tasks()
    args = dict(max_steps=4, per_device_eval_batch_size=16)
    straight = growing_method()
    expected = ContinualTrainer(method=straight, args=continual_args(tmp_path / "a", **args),
                                processing_class=clip_processor).train_tasks(tasks)
    moe = straight.moe
    slots = expected.diagnostics["expert_slots"]
    assert len(slots) == 3 and slots[0]["vision"]["total"] == 8
    assert expected.diagnostics["expert_growth"][0] == {}  # the first task finds every expert trainable
    grown = [layer for stage in expected.diagnostics["expert_growth"] for layer in stage]
    assert grown and moe.moe_config.experts_per_module  # coverage 1.0 froze enough for the bank to grow

    # interrupted after the second task, resumed: the same matrix and the same grown bank
    interrupted = ContinualTrainer(method=growing_method(), args=continual_args(tmp_path / "b", **args),
                                   processing_class=clip_processor)
    interrupted.add_callback(StopAtTask(interrupted, "third"))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train_tasks(tasks)
    resumed_method = growing_method()
    result = ContinualTrainer(method=resumed_method, args=continual_args(tmp_path / "b", **args),
                              processing_class=clip_processor).train_tasks(tasks, resume=True)
    assert result.accuracy_matrix == expected.accuracy_matrix
    a, b = moe.model.state_dict(), resumed_method.moe.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if ".moe_lora_" in k)

    # published, loaded and continued: learned tasks bit-identical, and the bank still grows
    straight.model.save_pretrained(tmp_path / "published")
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "published", is_trainable=True)
    before = outputs(loaded, clip_inputs, [0, 1, 2])
    continued = MoEAdapters(loaded, MoEAdaptersArguments(freeze_policy="coverage"))
    fourth = colour_task("fourth", seed=3, offset=2)
    total_before = sum(s["total"] for s in loaded.base_model.expert_slots().values())
    ContinualTrainer(method=continued, args=continual_args(tmp_path / "c", **args),
                     processing_class=clip_processor).train_tasks([fourth])
    after = outputs(loaded, clip_inputs, [0, 1, 2])
    assert all(torch.equal(before[t], after[t]) for t in (0, 1, 2))
    assert continued.moe.moe_config.expert_growth_threshold == 0.5
    assert sum(s["total"] for s in loaded.base_model.expert_slots().values()) > total_before


def test_growth_is_refused_with_a_shared_router(tmp_path, clip_processor):
    method = growing_method(shared_router=True, freeze_policy="top_k")  # a shared router freezes nothing
    with pytest.raises(ValueError, match="Expert growth needs one router per task"):
        ContinualTrainer(method=method, args=continual_args(tmp_path), processing_class=clip_processor
                         ).train_tasks([colour_task("only")])


def dispatched_ops(model, inputs, task):
    """The aten ops, by name, of one training forward and backward of a batch of `task`."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    model.train()
    model.base_model.set_task(task)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs).logits_per_image.logsumexp(-1).mean().backward()
    model.zero_grad()
    return Counter(event.name for event in prof.events() if event.name.startswith("aten::"))


def test_a_task_routes_in_one_product_over_its_experts_so_growth_adds_no_ops_and_changes_no_learned_task(
        clip_inputs):
    """A batch of one task projects its router once, over the experts it may select (those the bank had when it
    trained): the newest task of a grown bank dispatches the ops of the first task's step, and a learned task's
    logits stay bit for bit what they were before the bank grew (twice)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), config(init_weights=False, expert_growth_threshold=0.5))
    moe = model.base_model

    def logits(task):
        model.eval()
        moe.set_task(task)
        with torch.no_grad():
            return model(**clip_inputs).logits_per_image

    first_step = dispatched_ops(model, clip_inputs, 0)
    train_steps(model, clip_inputs, task=0)
    learned = {0: logits(0)}
    freeze_all(model, 0)
    assert moe.grow_experts(1)[VISION0] == 2
    assert dispatched_ops(model, clip_inputs, 1) == first_step
    assert torch.equal(logits(0), learned[0])
    train_steps(model, clip_inputs, task=1)
    learned[1] = logits(1)
    freeze_all(model, 1)
    assert moe.grow_experts(2)[VISION0] == 2
    layer = moe.moe_layers()[VISION0]
    assert [layer.visible_experts("default", t) for t in range(3)] == [4, 6, 8]
    assert dispatched_ops(model, clip_inputs, 2) == first_step
    assert all(torch.equal(logits(t), learned[t]) for t in (0, 1))


def test_a_bank_grows_in_task_order_and_a_saved_one_out_of_order_is_refused():
    from hf_moe_cl.tuners.moe_lora.loading import value_problem

    layer = get_peft_model(tiny_clip(), config()).base_model.moe_layers()[VISION0]
    layer.add_experts("default", 2, first_task=2)
    with pytest.raises(ValueError, match="Experts for task 1 cannot follow experts added for task 2: a bank grows in "
                                         "task order"):
        layer.add_experts("default", 1, first_task=1)
    assert layer.expert_count("default") == 6
    assert value_problem("x.moe_lora_expert_task.default", torch.tensor([0, 0, 2, 1]), 3) == (
        "is not in task order; a bank grows in task order, so each expert's task is at least the one before")
    assert value_problem("x.moe_lora_expert_task.default", torch.tensor([0, 0, 1, 1, 2]), 3) is None
