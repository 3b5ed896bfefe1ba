"""MoE-LoRA traces into one graph: `torch.compile(fullgraph=True)` runs a train step and an eval forward with the
same outputs, gradients, selection counts and frozen experts as eager, for both placements and both routings, with
the paper's routers and with `hide_frozen_experts`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TEXT_VOCAB, moe_model

PLACEMENTS = {"block": {}, "linear": {"target_modules": ["q_proj", "v_proj"]}}
ROUTINGS = {"set_task": None, "task_ids": torch.tensor([0, 1, -1, 1])}


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, TEXT_VOCAB - 2, (4, 6), generator=generator),
            "pixel_values": torch.randn(4, 3, 16, 16, generator=generator)}


def _step(model, call, inputs, task_ids):
    """One training step of `model` through `call` (the model or its compiled form): outputs, grads, counts."""
    extra = {} if task_ids is None else {"task_ids": task_ids}
    torch.manual_seed(5)  # the same router noise in both runs
    logits = call(**inputs, **extra).logits_per_image
    logits.sum().backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    optimizer.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = {n: b.clone() for n, b in model.named_buffers() if "moe_lora_counts" in n}
    return logits.detach(), grads, counts


@pytest.mark.parametrize("placement, hide", [("block", False), ("linear", False), ("block", True)],
                         ids=["block", "linear", "block-hide_frozen_experts"])  # the routers are the same code
@pytest.mark.parametrize("routing", ROUTINGS)
def test_compiled_fullgraph_equals_eager(placement, hide, routing):
    torch._dynamo.reset()
    eager = moe_model(init_weights=False, hide_frozen_experts=hide, **PLACEMENTS[placement])
    # one task learned and frozen first, so the forward reads frozen experts and routers from their banks
    eager.base_model.freeze_covering(0, {name: torch.tensor([5, 3, 0, 0]) for name in eager.base_model.moe_layers()})
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    task_ids = ROUTINGS[routing]
    for model in (eager, twin):
        model.set_task(1 if task_ids is None else None)
        model.train()
    inputs = _inputs()
    frozen_before = {n: b.detach().clone() for n, b in eager.state_dict().items() if n.endswith("moe_lora_A.default")}
    logits, grads, counts = _step(eager, eager, inputs, task_ids)
    logits_c, grads_c, counts_c = _step(twin, compiled, inputs, task_ids)
    torch.testing.assert_close(logits_c, logits, rtol=0, atol=0)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0)
    for name in counts:
        assert torch.equal(counts_c[name], counts[name])
    assert sum(int(c.sum()) for c in counts.values()) > 0
    state = twin.state_dict()  # frozen experts 0 and 1 did not move under AdamW with weight decay
    for name, before in frozen_before.items():
        assert torch.equal(state[name][:2], before[:2])
        assert not torch.equal(state[name][2:], before[2:])
    for model in (eager, twin):
        model.eval()
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        expected = eager(**inputs, **extra).logits_per_image
        actual = compiled(**inputs, **extra).logits_per_image
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_routing_reads_no_hook_per_call():
    """Calls register no hook: the forward pre-hooks of the model are the same before and after routed calls."""
    model = moe_model()
    inputs = _inputs()

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    model(**inputs, task_ids=torch.tensor([0, 1, 1, 0]))
    model.set_task(1)
    model(**inputs)
    assert hooks() == before
