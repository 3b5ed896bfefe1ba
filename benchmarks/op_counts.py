"""Top-level aten ops one train step (forward, backward, AdamW) and one eval image forward dispatch, ViT-B/16-sized
CLIP (random weights), batch 4: peft LoRA against MoE-LoRA on the same Linears and MoE-Adapters' blocks, with no
expert frozen and with two frozen per block (the forward then reads them from their snapshots).

    python benchmarks/op_counts.py

On a GPU in eager mode every op is at least one kernel launch: these counts are the launch overhead a step pays.
"""

from __future__ import annotations

import copy

import torch
from models import vit_b16_config
from peft import LoraConfig, get_peft_model
from profiling import aten_ops
from transformers import CLIPModel

from hf_moe_cl import MoELoraConfig


def variants(base):
    targets = ["q_proj", "v_proj"]
    yield "peft LoRA (q,v)", get_peft_model(copy.deepcopy(base), LoraConfig(r=64, lora_alpha=64,
                                                                             target_modules=targets))
    yield "MoE-LoRA (q,v)", get_peft_model(copy.deepcopy(base), MoELoraConfig(
        r=64, target_modules=targets, expert_activation=None, expert_bias=False, expert_dropout=0.0))
    model = get_peft_model(copy.deepcopy(base), MoELoraConfig(num_tasks=2))
    model.set_task(0)
    yield "MoE-Adapters (blocks)", model
    model = get_peft_model(copy.deepcopy(base), MoELoraConfig(num_tasks=2))
    model.base_model.freeze_covering(0, {name: torch.tensor([3, 2] + [0] * 20)
                                         for name in model.base_model.moe_layers()})
    model.set_task(1)
    yield "MoE-Adapters (blocks, 2 frozen)", model


def main():
    torch.manual_seed(0)
    base = CLIPModel(vit_b16_config())
    pixels = torch.randn(4, 3, 224, 224)
    ids = torch.randint(0, 1000, (10, 8))
    labels = torch.randint(0, 10, (4,))
    print(f"{'model':34s} {'train step':>10s} {'eval forward':>12s}")
    for name, model in variants(base):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(input_ids=ids, pixel_values=pixels)
            torch.nn.functional.cross_entropy(out.logits_per_image, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        train = aten_ops(step)
        model.eval()
        with torch.no_grad():
            evaluation = aten_ops(lambda: model.get_image_features(pixel_values=pixels))
        print(f"{name:34s} {train:10d} {evaluation:12d}")


if __name__ == "__main__":
    main()
