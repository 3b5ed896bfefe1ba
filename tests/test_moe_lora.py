import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import hf_moe_cl
from hf_moe_cl import MOE_LORA, MoELoraConfig, MoELoraModel, register_moe_lora
from hf_moe_cl.tuners.moe_lora.gating import noisy_top_k
from hf_moe_cl.tuners.moe_lora import MoELoraBlock, MoELoraLinear, TaskRoute

from conftest import tiny_clip

VISION0 = "vision_model.encoder.layers.0"


def small_config(**kwargs):
    defaults = dict(num_tasks=3, num_experts=5, top_k=2, r=4)
    defaults.update(kwargs)
    return MoELoraConfig(**defaults)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits_per_image


def test_registration_is_idempotent_and_refuses_a_clash(monkeypatch):
    register_moe_lora()
    register_moe_lora()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[MOE_LORA] is MoELoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[MOE_LORA] is MoELoraModel
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, MOE_LORA, torch.nn.Linear)
    with pytest.raises(KeyError, match="already has a method"):
        register_moe_lora()


def test_peft_entry_points_build_the_method():
    model = get_peft_model(tiny_clip(), small_config())
    assert isinstance(model, PeftModel) and isinstance(model.base_model, MoELoraModel)
    layers = model.base_model.moe_layers()
    assert sorted(layers) == [
        "text_model.encoder.layers.0",
        "text_model.encoder.layers.1",
        "vision_model.encoder.layers.0",
        "vision_model.encoder.layers.1",
    ]
    assert all(isinstance(layer, MoELoraBlock) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moe_lora_" in n for n in trainable)


def test_parameter_shapes_and_count():
    model = get_peft_model(tiny_clip(), small_config())
    layer = model.base_model.moe_layers()[VISION0]
    assert layer.moe_lora_A["default"].shape == (5, 4, 48)
    assert layer.moe_lora_B["default"].shape == (5, 4, 48)
    assert layer.moe_lora_bias_A["default"].shape == (5, 4)
    assert layer.moe_lora_bias_B["default"].shape == (5, 48)
    assert layer.moe_lora_router_gate["default"].shape == (3, 48, 5)
    assert layer.moe_lora_counts["default"].shape == (3, 5)
    per_layer = {48: 5 * (48 * 4 * 2 + 4 + 48) + 2 * 3 * 48 * 5, 32: 5 * (32 * 4 * 2 + 4 + 32) + 2 * 3 * 32 * 5}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * per_layer[48] + 2 * per_layer[32]


def test_default_init_and_zero_shot_path_equal_the_base_model(clip_inputs):
    reference = logits(tiny_clip(), clip_inputs)
    fresh = get_peft_model(tiny_clip(), small_config())
    fresh.set_task(0)  # zero-initialised up-projections and routers: every task equals the base model
    assert torch.equal(logits(fresh, clip_inputs), reference)
    model = get_peft_model(tiny_clip(), small_config(init_weights=False)).eval()
    with pytest.raises(ValueError, match="no route was chosen"):  # several routers: a route must be chosen
        logits(model, clip_inputs)
    model.set_task(0)
    assert not torch.allclose(logits(model, clip_inputs), reference)
    single = get_peft_model(tiny_clip(), small_config(num_tasks=1, init_weights=False)).eval()
    assert not torch.allclose(logits(single, clip_inputs), reference)  # one router: it is the route
    for no_task in (None, -1):
        model.set_task(no_task)
        assert torch.equal(logits(model, clip_inputs), reference)
    model.set_task(1)
    with model.disable_adapter():
        assert torch.equal(logits(model, clip_inputs), reference)


def test_noisy_top_k_picks_the_largest_logits_and_softmaxes_them():
    router_input = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gate = torch.tensor([[0.1, 0.9, 0.5, -1.0], [2.0, -2.0, 1.0, 0.0]])
    routing = noisy_top_k(router_input, gate, torch.zeros_like(gate), top_k=2, noisy=False, noise_epsilon=0.01)
    assert routing.experts.tolist() == [[1, 2], [0, 2]]
    expected = torch.softmax(torch.tensor([[0.9, 0.5], [2.0, 1.0]]), dim=-1)
    assert torch.allclose(routing.weights, expected)
    torch.manual_seed(0)
    noisy = noisy_top_k(router_input, gate, torch.zeros_like(gate), top_k=2, noisy=True, noise_epsilon=0.01,
                        with_balance_loss=True)
    assert noisy.experts.shape == (2, 2) and noisy.balance_loss.ndim == 0


def test_sparse_dispatch_matches_a_dense_mixture():
    model = get_peft_model(tiny_clip(), small_config(init_weights=False, expert_dropout=0.0)).eval()
    layer = model.base_model.moe_layers()[VISION0]
    x = torch.randn(3, 5, 48)
    model.set_task(2)
    with torch.no_grad():
        sparse = layer.moe_delta(x, TaskRoute(task=2))
        gate = layer.moe_lora_router_gate["default"][2]
        weights = torch.zeros(3, 5)
        top = (x[:, 0] @ gate).topk(2, dim=-1)
        weights.scatter_(1, top.indices, torch.softmax(top.values, dim=-1))
        dense = torch.zeros_like(sparse)
        for e in range(5):
            hidden = torch.relu(x @ layer.moe_lora_A["default"][e].T + layer.moe_lora_bias_A["default"][e])
            out = hidden @ layer.moe_lora_B["default"][e] + layer.moe_lora_bias_B["default"][e]
            dense += weights[:, e, None, None] * out
    assert torch.allclose(sparse, 0.1 * dense, atol=1e-6)


def test_per_sample_task_ids_route_each_image_through_its_own_router(clip_inputs):
    model = get_peft_model(tiny_clip(), small_config(init_weights=False)).eval()
    pixels = clip_inputs["pixel_values"]
    task_ids = torch.tensor([2, -1, 0, 1])
    with torch.no_grad(), model.routing(task_ids):
        mixed = model.get_image_features(pixel_values=pixels).pooler_output
    for row, task in enumerate(task_ids.tolist()):
        model.set_task(task)
        with torch.no_grad():
            alone = model.get_image_features(pixel_values=pixels[row : row + 1]).pooler_output
        assert torch.allclose(mixed[row], alone[0], atol=1e-5), row
    model.set_task(0)
    with torch.no_grad():
        via_forward = model(**clip_inputs, task_ids=task_ids).image_embeds
    assert torch.allclose(via_forward, torch.nn.functional.normalize(mixed, dim=-1), atol=1e-5)


def test_selection_counts_are_per_task_and_count_top_k(clip_inputs):
    model = get_peft_model(tiny_clip(), small_config(init_weights=False)).train()
    model.set_task(1)
    model(**clip_inputs)
    counts = model.base_model.selection_counts()
    for name, table in counts.items():
        assert table[1].sum() == 4 * 2, name
        assert table[0].sum() == 0 and table[2].sum() == 0
    model.eval()
    model(**clip_inputs)
    assert model.base_model.selection_counts(1)[VISION0].sum() == 8


def train_steps(model, inputs, task, steps=5, lr=1e-2):
    model.train()
    model.set_task(task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.5)
    for _ in range(steps):
        out = model(**inputs)
        loss = out.logits_per_image.logsumexp(-1).mean() - out.logits_per_image.diagonal().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_frozen_experts_and_router_stay_bit_identical_through_a_later_task(clip_inputs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), small_config(init_weights=False, num_tasks=2))
    train_steps(model, clip_inputs, task=0)
    frozen = model.base_model.freeze_most_selected(0, k=2)
    assert all(len(experts) >= 1 for experts in frozen.values())
    before = {n: {k: v.clone() for k, v in model.base_model.expert_parameters(n).items()} for n in frozen}
    gate_before = {n: l.bank("default", "moe_lora_router_gate")[0].clone()
                   for n, l in model.base_model.moe_layers().items()}
    train_steps(model, clip_inputs, task=1, steps=8)
    state = model.state_dict()
    changed = 0
    for name, experts in frozen.items():
        after = model.base_model.expert_parameters(name)
        for tensor_name, value in after.items():
            for e in range(5):
                if e in model.base_model.frozen_experts()[name]:
                    assert torch.equal(value[e], before[name][tensor_name][e]), (name, tensor_name, e)
                    key = f"base_model.model.{name}.{tensor_name}.default"
                    assert torch.equal(state[key][e], before[name][tensor_name][e])
                elif not torch.equal(value[e], before[name][tensor_name][e]):
                    changed += 1
        layer = model.base_model.moe_layers()[name]
        assert torch.equal(layer.bank("default", "moe_lora_router_gate")[0], gate_before[name])
    assert changed > 0, "the unfrozen experts should have trained"
    assert model.base_model.frozen_routers() == [0]


def test_merge_writes_the_average_of_the_top_two_into_the_least_selected_trainable_expert():
    model = get_peft_model(tiny_clip(), small_config(init_weights=False))
    layer = model.base_model.moe_layers()[VISION0]
    with torch.no_grad():
        for e in range(5):
            layer.moe_lora_A["default"][e].fill_(float(e))
            layer.moe_lora_B["default"][e].fill_(10.0 * e)
        layer.moe_lora_counts["default"][1] = torch.tensor([5, 40, 0, 30, 1])
    layer._rebuild("default")  # the trainable rows from the banks just written
    layer.freeze_experts("default", [2], task=0)
    trainable = layer.moe_lora_trainable_A["default"]  # experts 0, 1, 3, 4
    optimizer = torch.optim.AdamW([trainable])
    trainable.grad = torch.ones_like(trainable)
    optimizer.step()
    with torch.no_grad():
        for row, e in enumerate((0, 1, 3, 4)):
            trainable[row].fill_(float(e))
    merged = model.base_model.merge_experts(1, optimizer=optimizer)
    assert merged[VISION0] == ([1, 3], 4)  # expert 2 is least selected but frozen
    A = layer.bank("default", "moe_lora_A")
    assert torch.all(A[4] == 2.0) and torch.all(layer.bank("default", "moe_lora_B")[4] == 20.0)
    assert torch.all(A[0] == 0.0) and torch.all(A[1] == 1.0) and torch.all(A[2] == 2.0)
    moments = optimizer.state[trainable]
    assert torch.all(moments["exp_avg"][3] == 0) and torch.all(moments["exp_avg_sq"][3] == 0)  # expert 4's row
    assert torch.all(moments["exp_avg"][0] != 0)


def test_save_and_load_give_identical_logits_frozen_sets_and_counts(tmp_path, clip_inputs):
    model = get_peft_model(tiny_clip(), small_config(init_weights=False))
    train_steps(model, clip_inputs, task=0, steps=3)
    model.base_model.freeze_most_selected(0)
    new_task = model.base_model.add_task()
    assert new_task == 3
    train_steps(model, clip_inputs, task=2, steps=3)
    model.eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_tasks"] == 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == MOE_LORA
    assert isinstance(PeftConfig.from_pretrained(tmp_path), MoELoraConfig)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).eval()
    for task in (0, 2, 3, None):
        model.set_task(task)
        loaded.set_task(task)
        with torch.no_grad():
            a, b = model(**clip_inputs), loaded(**clip_inputs)
        assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds), task
    assert loaded.base_model.frozen_experts() == model.base_model.frozen_experts()
    assert loaded.base_model.frozen_routers() == [0]
    for name, counts in model.base_model.selection_counts().items():
        assert torch.equal(loaded.base_model.selection_counts()[name], counts)
    trainable = PeftModel.from_pretrained(tiny_clip(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    train_steps(trainable, clip_inputs, task=1, steps=2)
    for name, experts in trainable.base_model.frozen_experts().items():
        for e in experts:
            for key, value in trainable.base_model.expert_parameters(name).items():
                assert torch.equal(value[e], model.base_model.expert_parameters(name)[key][e])


def test_linear_placement_without_activation_is_a_plain_lora():
    config = small_config(num_experts=1, top_k=1, target_modules=["q_proj", "v_proj"], expert_activation=None,
                          expert_bias=False, expert_dropout=0.0, init_weights=False)
    model = get_peft_model(tiny_clip(), config).eval()
    model.set_task(0)
    layers = model.base_model.moe_layers()
    assert len(layers) == 8 and all(isinstance(l, MoELoraLinear) for l in layers.values())
    layer = layers["vision_model.encoder.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = layer.base_layer(x) + 0.1 * (x @ layer.moe_lora_A["default"][0].T) @ layer.moe_lora_B["default"][0]
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_load_balancing_loss_is_collected_when_enabled(clip_inputs):
    model = get_peft_model(tiny_clip(), small_config(init_weights=False, load_balancing_coef=0.01)).train()
    model.set_task(0)
    model(**clip_inputs)
    loss = model.base_model.aux_loss()
    assert loss is not None and loss.requires_grad and loss.item() >= 0
    plain = get_peft_model(tiny_clip(), small_config()).train()
    plain.set_task(0)
    plain(**clip_inputs)
    assert plain.base_model.aux_loss() is None


# ----- bad input -----------------------------------------------------------------------------------------------------
def test_config_validation_messages():
    with pytest.raises(ValueError, match="top_k.*cannot exceed"):
        MoELoraConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="`r` must be an integer >= 1, got 0"):
        MoELoraConfig(r=0)
    with pytest.raises(ValueError, match="expert_activation"):
        MoELoraConfig(expert_activation="nope")
    with pytest.raises(ValueError, match="expert_dropout"):
        MoELoraConfig(expert_dropout=1.0)


def test_task_id_out_of_range_is_a_clear_error(clip_inputs):
    model = get_peft_model(tiny_clip(), small_config())
    with pytest.raises(ValueError, match="out of range.*3 task routers"):
        model.set_task(3)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[-1, 2\]"):
        with model.routing(torch.tensor([0, 7, 1, 1])):
            pass
    with pytest.raises(ValueError, match="3 task ids were given for a batch of 4"):
        with model.routing(torch.tensor([0, 1, 1])):
            model.get_image_features(pixel_values=clip_inputs["pixel_values"])


def test_unsupported_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported by MoE-LoRA"):
        get_peft_model(tiny_clip(), small_config(target_modules=["layer_norm1"]))


def test_checkpoint_for_another_model_is_a_clear_error(tmp_path):
    get_peft_model(tiny_clip(), small_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="created on a base model of another layout"):
        PeftModel.from_pretrained(tiny_clip(vision_width=64), tmp_path)


def test_truncated_safetensors_file_is_a_clear_error(tmp_path):
    get_peft_model(tiny_clip(), small_config()).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        hf_moe_cl.check_safetensors_file(weights)
    weights.write_bytes(data)
    hf_moe_cl.check_safetensors_file(weights)
    assert os.path.getsize(weights) == len(data)


def test_merge_and_unload_refuses_and_unload_restores_the_base(clip_inputs):
    reference = logits(tiny_clip(), clip_inputs)
    model = get_peft_model(tiny_clip(), small_config(init_weights=False))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert torch.equal(logits(base, clip_inputs), reference)


def test_push_to_hub_uploads_the_folder_peft_saves(tmp_path, monkeypatch, clip_inputs):
    import shutil
    import types

    import transformers.utils.hub as hub

    uploaded = tmp_path / "uploaded"
    fake_api = types.SimpleNamespace(create_repo=lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub, "hf_api", lambda: fake_api)
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda *a, **kw: types.SimpleNamespace(save=lambda path: open(path, "w").write("card")))
    monkeypatch.setattr(PeftModel, "_upload_modified_files",
                        lambda self, folder, repo_id, **kw: shutil.copytree(folder, uploaded))
    model = get_peft_model(tiny_clip(), small_config(init_weights=False)).eval()
    model.push_to_hub("someone/moe-clip")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(uploaded))
    loaded = PeftModel.from_pretrained(tiny_clip(), uploaded).eval()
    model.set_task(1)
    loaded.set_task(1)
    assert torch.equal(logits(loaded, clip_inputs), logits(model, clip_inputs))


def routed_gradients(clip_inputs, checkpointing, **enable_kwargs):
    """Gradients and selection counts of one training step routed per call (task ids 2, -1, 0, 1)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_clip(), small_config(init_weights=False)).train()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(**enable_kwargs)
    torch.manual_seed(1)
    out = model(**clip_inputs, task_ids=torch.tensor([2, -1, 0, 1]))
    (out.logits_per_image.logsumexp(-1).mean() - out.logits_per_image.diagonal().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, model.base_model.selection_counts()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_routes_the_recomputation_like_the_forward(clip_inputs, reentrant):
    """The call's route ends with the forward; the backward's recomputation must still route each sample as the
    forward did, and count its selections once."""
    plain, plain_counts = routed_gradients(clip_inputs, False)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    checkpointed, counts = routed_gradients(clip_inputs, True, **kwargs)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert any("router_gate" in name for name in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
    for name in plain_counts:
        assert torch.equal(plain_counts[name], counts[name]), name


def test_per_call_routing_of_checkpointed_linear_experts_is_refused_in_training(clip_inputs):
    config = small_config(target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_peft_model(tiny_clip(), config).train()
    model.base_model.model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="needs the block placement"):
        model(**clip_inputs, task_ids=torch.tensor([0, 1, 2, 0]))
    model.set_task(1)
    model(**clip_inputs).logits_per_image.sum().backward()  # a session route is fine
