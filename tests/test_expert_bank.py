"""Where experts and routers live: what learned tasks froze is outside autograd and the optimizer, read in place,
bit-identical through later tasks, and saved in the layout of every release."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_moe_cl import MoELoraConfig
from hf_moe_cl.tuners.moe_lora.bank import EXPERT_PARAMS, ROUTER_PARAMS, TRAINABLE
from hf_moe_cl.tuners.moe_lora.gating import EXPERT_CHUNK, _project

from conftest import tiny_clip


def model(**overrides):
    values = dict(num_tasks=3, num_experts=6, top_k=2, r=4, init_weights=False)
    values.update(overrides)
    return get_peft_model(tiny_clip(), MoELoraConfig(**values))


def step(peft_model, clip_inputs, task, optimizer=None):
    peft_model.train()
    peft_model.base_model.set_task(task)
    out = peft_model(**clip_inputs).logits_per_image
    (out.logsumexp(-1).mean() - out.diagonal().mean()).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def learn(peft_model, clip_inputs, task, steps=3, weight_decay=0.1):
    """A task trained with AdamW (momentum and weight decay: what could move a frozen slice), then frozen."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        step(peft_model, clip_inputs, task, optimizer)
    peft_model.base_model.freeze_most_selected(task)
    return optimizer


def test_frozen_experts_and_learned_routers_are_no_parameters(clip_inputs):
    peft_model = model()
    moe = peft_model.base_model
    layer = next(iter(moe.moe_layers().values()))
    before = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    learn(peft_model, clip_inputs, 0)
    frozen = int((layer.moe_lora_frozen_by["default"] >= 0).sum())
    assert frozen == 2 and layer.moe_lora_router_frozen["default"].tolist() == [True, False, False]
    for name in EXPERT_PARAMS:
        assert getattr(layer, TRAINABLE[name])["default"].shape[0] == 6 - frozen  # only what can still train
        assert getattr(layer, name)["default"].shape[0] == 6 and not getattr(layer, name)["default"].requires_grad
    for name in ROUTER_PARAMS:
        assert getattr(layer, TRAINABLE[name])["default"].shape[0] == 2  # the routers of tasks 1 and 2
    after = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    per_expert = sum(getattr(layer, name)["default"][0].numel() for name in EXPERT_PARAMS)
    assert after < before and peft_model.get_nb_trainable_parameters()[0] == after
    # the next task's optimizer holds state for the trainable rows only
    optimizer = learn(peft_model, clip_inputs, 1)
    state = sum(t.numel() for entry in optimizer.state.values() for t in entry.values() if t.dim())
    assert state == 2 * after and per_expert > 0


def test_frozen_rows_stay_bit_identical_through_later_tasks_with_momentum_and_weight_decay(clip_inputs):
    peft_model = model()
    moe = peft_model.base_model
    learn(peft_model, clip_inputs, 0)
    frozen = {name: {tensor: layer.bank("default", tensor).clone() for tensor in EXPERT_PARAMS + ROUTER_PARAMS}
              for name, layer in moe.moe_layers().items()}
    masks = {name: layer.moe_lora_frozen_by["default"] >= 0 for name, layer in moe.moe_layers().items()}
    learn(peft_model, clip_inputs, 1)
    learn(peft_model, clip_inputs, 2)
    for name, layer in moe.moe_layers().items():
        for tensor in EXPERT_PARAMS:
            now = layer.bank("default", tensor)
            assert torch.equal(now[masks[name]], frozen[name][tensor][masks[name]])
        for tensor in ROUTER_PARAMS:
            assert torch.equal(layer.bank("default", tensor)[0], frozen[name][tensor][0])  # task 0's router


def test_gradients_reach_only_what_can_train_and_equal_a_dense_bank(clip_inputs):
    """The gather reads the bank once; its gradient is the dense bank's gradient restricted to trainable rows."""
    peft_model = model()
    moe = peft_model.base_model
    learn(peft_model, clip_inputs, 0, steps=1)
    torch.manual_seed(3)
    step(peft_model, clip_inputs, 1)
    layer = next(iter(moe.moe_layers().values()))
    trainable = layer.moe_lora_frozen_by["default"] < 0
    grad = layer.moe_lora_trainable_A["default"].grad
    assert grad.shape[0] == int(trainable.sum())

    dense = model()  # the same weights as one dense parameter, frozen rows included
    dense.load_state_dict(peft_model.state_dict(), strict=False)
    dense_layer = next(iter(dense.base_model.moe_layers().values()))
    bank = torch.nn.Parameter(dense_layer.bank("default", "moe_lora_A").clone())
    rows = torch.arange(bank.shape[0])
    original = dense_layer.expert_rows

    def dense_rows(adapter, name, index):
        return bank.index_select(0, index) if name == "moe_lora_A" else original(adapter, name, index)

    dense_layer.expert_rows = dense_rows
    torch.manual_seed(3)
    step(dense, clip_inputs, 1)
    assert torch.allclose(grad, bank.grad[rows[trainable]], atol=1e-6)


def test_the_saved_layout_is_every_releases_and_loads_back(tmp_path, clip_inputs):
    peft_model = model()
    learn(peft_model, clip_inputs, 0)
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not [key for key in saved if "trainable" in key]
    layer = next(iter(peft_model.base_model.moe_layers().values()))
    key = next(key for key in saved if key.endswith("moe_lora_A"))
    assert saved[key].shape == (6, 4, layer.in_features)  # every expert, as 0.2 saved them
    assert next(v for k, v in saved.items() if k.endswith("moe_lora_router_gate")).shape[0] == 3
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path, is_trainable=True).eval()
    peft_model.eval()
    for task in (0, 1):
        peft_model.base_model.set_task(task)
        loaded.base_model.set_task(task)
        with torch.no_grad():
            assert torch.equal(peft_model(**clip_inputs).logits_per_image, loaded(**clip_inputs).logits_per_image)
    loaded_layer = next(iter(loaded.base_model.moe_layers().values()))
    assert loaded_layer.moe_lora_trainable_A["default"].shape[0] == 4 and loaded_layer.moe_lora_trainable_A[
        "default"].requires_grad


def test_a_growing_bank_keeps_every_earlier_experts_logit_bit_for_bit():
    """The experts a bank grew by are projected in one product of fixed-shape pieces after the first experts' own
    product: as the bank grows, logits of experts it had are unchanged, shared or per-sample routers alike."""
    torch.manual_seed(0)
    first = 6
    x = torch.randn(16, 48)
    shared, per_sample = torch.randn(48, first + 5 * EXPERT_CHUNK), torch.randn(16, 48, first + 5 * EXPERT_CHUNK)
    plain = x @ shared[:, :first]
    assert torch.equal(_project(x, shared[:, :first], first), plain)  # before growing: the plain projection
    seen = {}
    for width in (first, first + 2, first + 9, first + EXPERT_CHUNK, first + EXPERT_CHUNK + 3, first + 4 * EXPERT_CHUNK):
        for name, weight in (("shared", shared[:, :width]), ("per sample", per_sample[..., :width])):
            logits = _project(x, weight, first)
            for known, earlier in seen.get(name, {}).items():
                assert torch.equal(logits[:, :known], earlier), (name, known, width)
            seen.setdefault(name, {})[width] = logits


def test_a_parameter_written_in_evaluation_is_the_value_the_forward_uses(clip_inputs):
    """The banks are refreshed before every forward, not only in training: an edit made after `eval()` counts."""
    peft_model = model().eval()
    peft_model.base_model.set_task(0)
    with torch.no_grad():
        before = peft_model(**clip_inputs).logits_per_image
        for name, param in peft_model.named_parameters():
            if TRAINABLE["moe_lora_B"] in name:
                param.add_(1.0)
        after = peft_model(**clip_inputs).logits_per_image
        reference = model().eval()  # the same edit made in training mode, then evaluated
        reference.load_state_dict(peft_model.state_dict())
        reference.base_model.set_task(0)
        expected = reference(**clip_inputs).logits_per_image
    assert not torch.allclose(before, after)
    assert torch.equal(after, expected)


def test_counts_histograms_and_indices_given_to_the_bookkeeping_are_checked_before_anything_changes():
    """Counts that no training produces (negative, fractional, another length, a scalar broadcast to every expert, a
    layer left out or unknown) and expert or task indices outside the layer are refused; nothing is stored, so a
    save still loads. Shares of a histogram (floats) freeze the experts they cover."""
    peft_model = model(num_experts=4)
    moe = peft_model.base_model
    names = list(moe.moe_layers())
    before = {name: counts.clone() for name, counts in moe.selection_counts().items()}
    bad_counts = {"negative": torch.tensor([-3, 1, 2, 0]), "fractional": torch.tensor([0.7, 1.9, 2.2, 0.0]),
                  "longer": torch.tensor([5, 4, 0, 0, 0, 1]), "scalar": torch.tensor(3), "list": [1, 2, 3, 4]}
    for kind, value in bad_counts.items():
        for call in (lambda counts: moe.set_selection_counts(0, counts),
                     lambda counts: moe.merge_experts(0, counts=counts)):
            with pytest.raises(ValueError, match=r"counts\['.*'\] must be a 1-D tensor of 4 non-negative integer "
                                                 r"counts \(one per expert of the layer\), got"):
                call({name: value for name in names})
    with pytest.raises(ValueError, match=r"keyed by this model's MoE layer names .* missing \['"):
        moe.set_selection_counts(0, {names[0]: torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        moe.freeze_covering(0, {"nope": torch.ones(4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"histogram must be a dict"):
        moe.freeze_covering(0, None)
    with pytest.raises(ValueError, match=r"histogram\['.*'\] must be a 1-D tensor of 4 non-negative finite"):
        moe.freeze_covering(0, {names[0]: torch.tensor([-5, 1, 1, 1])})
    layer = moe.moe_layers()[names[0]]
    for experts, task, message in (([-1], 0, "expert to freeze must be an int from 0 to 3 .* got -1"),
                                   ([4], 0, "expert to freeze must be an int from 0 to 3 .* got 4"),
                                   ([0], 3, "task to freeze must be an int from 0 to 2 .* got 3"),
                                   ([True], 0, "expert to freeze .* got True")):
        with pytest.raises(ValueError, match=message):
            layer.freeze_experts("default", experts, task)
    assert moe.frozen_experts() == {name: {} for name in names} and moe.frozen_routers() == []
    assert all(torch.equal(before[name], counts) for name, counts in moe.selection_counts().items())
    newly = moe.freeze_covering(0, {names[0]: torch.tensor([0.6, 0.3, 0.0, 0.0])})
    assert newly[names[0]] == [0, 1] and moe.frozen_routers() == [0]
