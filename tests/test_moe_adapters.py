"""The MoE-Adapters method on a model (`MoEAdapters(model, ...)`, `MoEAdapters.from_base`): it needs a MoE-LoRA model,
and its arguments and DDAS settings are checked against that model's adapter before any work; the adapter's
settings are the model's (or, for `from_base`, its config's)."""

import pytest

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
                                       r"smallest bank: one task would freeze every expert it used. Give at most 4"),
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
