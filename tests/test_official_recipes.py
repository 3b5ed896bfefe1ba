"""Official recipe details outside DDAS: CIL noise at evaluation, ConDU's few-shot rates, the global batch."""

import torch

from hf_moe_cl.benchmark.recipes import preset_recipe
from hf_moe_cl.continual.methods import MoEAdaptersArguments

from conftest import moe_model


def test_noisy_gating_eval_keeps_the_router_noise_on_in_evaluation(clip_inputs):
    outputs = {}
    for keep in (False, True):
        model = moe_model(noisy_gating_eval=keep).eval()
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "moe_lora" in name:  # trained-looking experts and routers, and a large learned noise scale
                torch.nn.init.constant_(param, 3.0) if "router_noise" in name else torch.nn.init.normal_(param)
        model.base_model.set_task(0)
        with torch.no_grad():
            outputs[keep] = [model(**clip_inputs).logits_per_image for _ in range(2)]
    assert torch.equal(*outputs[False])
    assert not torch.allclose(*outputs[True])


def test_class_incremental_presets_keep_the_noise_on_in_evaluation():
    for name in ("cifar100-cil-10", "cifar100-cil-20", "cifar100-cil-50"):
        assert preset_recipe(name)[MoEAdaptersArguments]["noisy_gating_eval"] is True
