"""The MoE-Adapters method on a model (`MoEAdapters(model, ...)`, `MoEAdapters.from_base`): it needs a MoE-LoRA model,
and its arguments and DDAS settings are checked against that model's adapter before any work; the adapter's
settings are the model's (or, for `from_base`, its config's)."""

import logging

import pytest
import torch

from hf_moe_cl.continual.methods import MoEAdapters

from conftest import moe_model, tiny_clip


def test_ddas_method_without_a_moe_model_is_refused():
    with pytest.raises(ValueError, match="MoEAdapters needs a MoE-LoRA model"):
        MoEAdapters(tiny_clip())


def test_a_ddas_feature_layer_beyond_the_vision_tower_is_refused_when_the_method_is_built():
    from hf_moe_cl import SelectorConfig
    from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters

    message = r"reads the tokens after `feature_layer`=3 vision blocks, but this model's vision tower has 2: give 1 to 2"
    with pytest.raises(ValueError, match=message):
        MoEAdapters(moe_model(), ddas=DDASArguments(ddas=True), selector=SelectorConfig(feature_layer=3))
    with pytest.raises(ValueError, match=message):
        MoEAdapters.from_base(tiny_clip(), [SelectorConfig(feature_layer=3)], num_tasks=2, rank=2)
    method = MoEAdapters(moe_model(), ddas=DDASArguments(ddas=True), selector=SelectorConfig(feature_layer=2))
    assert method.selector_settings.feature_layer == 2 and method.selector_settings.feature_dim == 96


@pytest.mark.parametrize("values, message", [
    (dict(num_experts=8, top_k=3), r"MoEAdaptersArguments has num_experts=8, top_k=3 but the model's adapter has "
                                   r"num_experts=4, top_k=2: a model given to MoEAdapters keeps its own settings"),
    (dict(noisy_gating=False), r"has noisy_gating=False but the model's adapter has noisy_gating=True"),
    (dict(noisy_gating_eval=True), r"has noisy_gating_eval=True but the model's adapter has noisy_gating_eval=False"),
    (dict(freeze_experts_per_task=10), r"freeze_experts_per_task=10 is more than the 4 experts of this model's "
                                       r"smallest bank: one task would freeze every expert it used. Give at most 3 "
                                       r"to leave later tasks experts to train there \(4 freezes the whole bank"),
])
def test_moe_adapters_arguments_that_do_not_fit_the_model_are_refused(values, message):
    from hf_moe_cl.continual.methods import MoEAdapters, MoEAdaptersArguments

    with pytest.raises(ValueError, match=message):
        MoEAdapters(moe_model(), MoEAdaptersArguments(**values))


def test_moe_adapters_takes_the_adapter_settings_from_the_model_and_from_base_from_its_config():
    from hf_moe_cl import MoELoraConfig
    from hf_moe_cl.continual.methods import MoEAdapters, MoEAdaptersArguments

    method = MoEAdapters(moe_model(), MoEAdaptersArguments(merge_experts_every=2, freeze_experts_per_task=4))
    assert method.fingerprint()["adapter"]["default"]["num_experts"] == 4  # the identity records what runs
    built = MoEAdapters.from_base(tiny_clip(), [MoEAdaptersArguments()], num_tasks=2, rank=2)
    config = built.moe.moe_config
    assert (config.num_experts, config.top_k, config.num_tasks, config.r) == (22, 2, 2, 2)  # the paper's, sized
    built = MoEAdapters.from_base(tiny_clip(), [MoELoraConfig(num_experts=6, top_k=3)], num_tasks=3, rank=2)
    config = built.moe.moe_config
    assert (config.num_experts, config.top_k, config.num_tasks, config.r) == (6, 3, 3, 2)


@pytest.mark.parametrize("values, message", [
    (dict(freeze_coverage=0.5), r"freeze_coverage=0.5 has no effect: an option of the other freeze_policy than top_k"),
    (dict(freeze_images=8), r"freeze_images=8 has no effect: an option of the other freeze_policy than top_k"),
    (dict(freeze_policy="coverage", freeze_experts_per_task=2),
     r"freeze_experts_per_task=2 has no effect: an option of the other freeze_policy than coverage"),
    (dict(shared_router=True, freeze_images=8, freeze_policy="coverage"),
     r"freeze_policy='coverage' has no effect: shared_router=True freezes no expert \(one router learns every task\); "
     r"freeze_images=8 has no effect: shared_router=True freezes no expert"),
    (dict(shared_router=True, freeze_experts_per_task=2), r"freeze_experts_per_task=2 has no effect: shared_router"),
    (dict(routing_report=False, routing_report_images=10),
     r"routing_report_images=10 has no effect: routing_report=False writes no routing report. Leave it at the "
     r"default, or change the option that makes it idle; nothing is ignored silently"),
])
def test_options_the_other_options_leave_idle_are_refused_when_made(values, message):
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    with pytest.raises(ValueError, match=rf"^MoEAdaptersArguments: .*{message}"):
        MoEAdaptersArguments(**values)


@pytest.mark.parametrize("values", [
    dict(freeze_policy="coverage", freeze_coverage=0.5, freeze_images=8),
    dict(freeze_experts_per_task=1, freeze_coverage=1.0),  # an idle option at its default asks for nothing
    dict(shared_router=True, freeze_experts_per_task=0),  # no freezing, as shared_router (the CIL recipe)
    dict(routing_report=False),
])
def test_idle_options_at_values_that_ask_for_nothing_are_accepted(values):
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    assert MoEAdaptersArguments(**values).freeze_policy in ("top_k", "coverage")


def test_a_freeze_of_every_expert_before_more_tasks_is_refused_before_the_first_task(tmp_path, clip_processor, caplog):
    from hf_moe_cl import ContinualTrainer
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    from conftest import continual_args, tasks_named

    method = MoEAdapters(moe_model(), MoEAdaptersArguments(freeze_experts_per_task=4))  # 4 experts per layer
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path), processing_class=clip_processor)
    message = (r"freeze_experts_per_task=4 freezes all 4 experts of this model's smallest bank after the first of "
               r"these 2 tasks \(every expert it selects\): the later ones would train no expert there. Give at most "
               r"3 \(0 disables freezing\), give the bank more experts than top_k, or let it grow")
    with pytest.raises(ValueError, match=message):
        trainer.train_tasks(tasks_named("first", "second"))
    assert all(slots["trainable"] == slots["total"] for slots in method.moe.expert_slots().values())
    assert not method.expert_slots  # no task ended

    # the paper's rule left at top_k = num_experts does the same: said, not refused (the routers still train)
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        ContinualTrainer(method=MoEAdapters(moe_model(num_experts=2)), args=continual_args(tmp_path / "k"),
                         processing_class=clip_processor).train_tasks(tasks_named("first", "second"))
    said = [r.getMessage() for r in caplog.records if "freezes all" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("freeze_experts_per_task=None (top_k=2) freezes all 2 experts")
    assert said[0].endswith("only their routers. To train experts in every task, give at most 1 (0 disables "
                            "freezing), give the bank more experts than top_k, or let it grow "
                            "(MoELoraConfig(expert_growth_threshold=...)).")


def test_a_merge_period_longer_than_a_task_is_refused_before_it_trains(tmp_path, clip_processor):
    from hf_moe_cl import ContinualTrainer
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    from conftest import continual_args, tasks_named

    method = MoEAdapters(moe_model(), MoEAdaptersArguments(merge_experts_every=5))
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path, max_steps=2),
                               processing_class=clip_processor)
    message = (r"merge_experts_every=5 is more than this task's 2 optimizer steps: no merge would happen in it. Give "
               r"at most 2 \(0 disables merging\), or train each task longer \(max_steps\)")
    with pytest.raises(ValueError, match=message):
        trainer.train_tasks(tasks_named("first"))
    assert not method.expert_slots and int(sum(c.sum() for c in method.moe.selection_counts(0).values())) == 0


def test_merging_that_cannot_happen_is_refused_or_named_before_the_task_trains(tmp_path, clip_processor, caplog):
    """A merge averages a task's two most-selected experts into a third, trainable one: a bank of 2 experts is refused
    when the method is made; with hide_frozen_experts, a task left 2 trainable experts (4 experts, top-2, the first
    task froze 2) is named before it trains (both merged nothing, silently)."""
    from hf_moe_cl import ContinualTrainer
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    from conftest import continual_args, tasks_named

    with pytest.raises(ValueError, match=r"merge_experts_every=2 averages a task's two most-selected experts into a "
                                         r"third, but this model's smallest bank has 2 experts: no merge would ever "
                                         r"happen. Give the adapter at least 3"):
        MoEAdapters(moe_model(num_experts=2), MoEAdaptersArguments(merge_experts_every=2, freeze_experts_per_task=0))
    method = MoEAdapters(moe_model(hide_frozen_experts=True), MoEAdaptersArguments(merge_experts_every=2))
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path, max_steps=2),
                               processing_class=clip_processor)
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        trainer.train_tasks(tasks_named("first", "second"))
    named = [record.getMessage() for record in caplog.records if "merges nothing" in record.getMessage()]
    assert len(named) == 1 and named[0].startswith(
        "merge_experts_every: task router 1 merges nothing in 4 layer(s) (e.g. text_model.encoder.layers.0): with "
        "hide_frozen_experts, fewer than 3 of its experts are trainable") and "hide_frozen_experts=False" in named[0]


def test_a_shared_router_continuing_a_model_whose_router_0_froze_is_refused_before_it_trains(tmp_path, clip_processor):
    """Router 0 froze with the first task's experts: a shared-router continuation would route the new tasks through it
    and train no router (it ran, silently); a shared-router model continues with a shared router."""
    from hf_moe_cl import ContinualTrainer
    from hf_moe_cl.continual.methods import MoEAdaptersArguments

    from conftest import continual_args, tasks_named

    def train(model, name, **options):
        method = MoEAdapters(model, MoEAdaptersArguments(**options))
        folder = tmp_path / (("shared-" if options else "") + name)
        ContinualTrainer(method=method, args=continual_args(folder, max_steps=1),
                         processing_class=clip_processor).train_tasks(tasks_named(name))

    shared = dict(shared_router=True, freeze_experts_per_task=0)
    model = moe_model(num_tasks=1)
    train(model, "first")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"Router 0 of this model was frozen with the experts of the task it learned: "
                                         r"with shared_router=True the new tasks would go through it, and no router "
                                         r"would train. Continue it with shared_router=False"):
        train(model, "second", **shared)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not list((tmp_path / "shared-second").glob("task-*"))
    model = moe_model(num_tasks=1)
    train(model, "first", **shared)
    train(model, "second", **shared)
    assert model.base_model.frozen_routers() == []
