"""Train-step time, dispatched ops, trainable parameters and training memory of MoE-LoRA against peft LoRA and full
fine-tuning, each eager and (with --compile) under torch.compile.

Everything is measured in one run on the same batch, so the printed ratios compare like with like:
    python benchmarks/step_time.py [--assets_dir ../shared/assets] [--batch_size 64] [--steps 20] [--device cpu]
                                   [--bf16] [--compile] [--tasks 30]
--model vit-b16-random times a randomly initialised CLIP of the paper's size (use a small --batch_size on CPU).
"ops" counts the top-level aten ops one train step dispatches (forward, backward and AdamW; torch.profiler on the
CPU side), the launch overhead a GPU pays per step in eager mode. --tasks N also times the step of the last of N
tasks, after the earlier ones froze experts as each policy does (top_k, the paper's; coverage 1.0; coverage 1.0 with
a bank that keeps 0.3 x num_experts trainable), against the first task's step of the same adapter (models
interleaved in one run), with the optimizer state and the ops of that step; its last line reads
`ratio to task 1 at N tasks: top_k R, coverage R, growth R`. --tasks_only times those adapters alone (the five
comparisons left out: a ViT-B/16-sized CLIP at 100 tasks does not fit in 24 GiB beside them). --hide_frozen_experts
builds the growth adapters (task 1 and task N) with `MoELoraConfig(hide_frozen_experts=True)`.
On CUDA, memory is the peak allocated during one step of that model (its weights and optimizer state
included, the other models' not); on CPU it is parameters + gradients + AdamW state + tensors saved for backward.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model
from models import MODELS, load_model, vit_b16_config
from profiling import aten_ops
from timing import synchronize
from transformers import CLIPModel, CLIPTokenizer

from hf_moe_cl import MoELoraConfig
from hf_moe_cl.assets import PROXY_CLIP, assets_dir


def make_batch(path, batch_size, image_size, device):
    tokenizer = CLIPTokenizer.from_pretrained(path / PROXY_CLIP)
    prompts = [f"a photo of a {c}." for c in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                               "horse", "ship", "truck"]]
    text = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, len(prompts), (batch_size,), generator=generator).to(device)
    return pixels, text, labels


AUTOCAST = {"enabled": False}


def step_loss(model, pixels, text, labels):
    """The trainer's loss: image-to-prompt cross-entropy with label smoothing, the text tower run with gradients."""
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=AUTOCAST["enabled"]):
        image = model.get_image_features(pixel_values=pixels).pooler_output.float()
        texts = model.get_text_features(**text).pooler_output.float()
    image = torch.nn.functional.normalize(image, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    logits = model.logit_scale.exp() * image @ texts.T
    return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)


LOSSES = {}  # model id -> its loss function (the compiled one for a compiled variant)


def train_step(model, optimizer, pixels, text, labels):
    loss = LOSSES.get(id(model), step_loss)(model, pixels, text, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def resident_bytes(model, optimizer):
    """Parameters and optimizer state of one model: what it holds on the device between steps."""
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])


def training_memory(model, optimizer, batch, device):
    if device.type == "cuda":  # the other models on the device cancel out: peak minus before, plus this one's own
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, *batch)
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before + resident_bytes(model, optimizer)
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, optimizer, *batch)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + 3 * trainable + sum(saved)


def timed_step(model, optimizer, batch, device):
    synchronize(device)
    start = time.perf_counter()
    train_step(model, optimizer, *batch)
    synchronize(device)
    return time.perf_counter() - start


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state (AdamW: two moments per trainable element, and its step counters)."""
    return sum(t.numel() * t.element_size() for entry in optimizer.state.values() for t in entry.values()
               if torch.is_tensor(t))


def measure_all(models, batch, steps, device):
    """Median step time per model, models interleaved step by step so machine noise hits all of them alike."""
    optimizers = {}
    for name, model in models.items():
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        for _ in range(2):
            train_step(model, optimizers[name], *batch)
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            times[name].append(timed_step(model, optimizers[name], batch, device))
    return {
        name: {
            "name": name,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_s": statistics.median(times[name]),
            "memory": training_memory(model, optimizers[name], batch, device),
            "ops": aten_ops(lambda m=model, o=optimizers[name]: train_step(m, o, *batch)),
            "optimizer": optimizer_bytes(optimizers[name]),
        }
        for name, model in models.items()
    }


def after_earlier_tasks(model, tasks: int, policy: str, growth: Optional[float] = None, seed: int = 0):
    """`model` (num_tasks=tasks) as its last task starts training: each earlier task selected `top_k + 2` random
    trainable experts per layer and froze them as `policy` says ('top_k': its two most-selected, the paper;
    'coverage': all it used), the bank growing to keep `growth` x num_experts trainable."""
    moe = model.base_model
    generator = torch.Generator().manual_seed(seed)
    k = moe.moe_config.top_k
    for task in range(tasks - 1):
        if growth is not None:
            moe.grow_experts(task, growth)
        frozen = moe.frozen_experts()
        histogram = {}
        for name, layer in moe.moe_layers().items():
            count = layer.expert_count(moe._adapter())
            trainable = torch.tensor([e for e in range(count) if e not in frozen.get(name, {})], dtype=torch.long)
            if not len(trainable):  # a fixed bank used up: the task selects frozen experts, freezes nothing new
                trainable = torch.arange(count)
            used = trainable[torch.randperm(len(trainable), generator=generator)[:k + 2]]
            histogram[name] = torch.zeros(count, dtype=torch.long).index_put_(
                (used,), torch.randint(1, 100, (len(used),), generator=generator))
        if policy == "coverage":
            moe.freeze_covering(task, histogram, 1.0)
        else:
            moe.set_selection_counts(task, histogram)
            moe.freeze_most_selected(task)
    if growth is not None:
        moe.grow_experts(tasks - 1, growth)
    moe.set_task(tasks - 1)
    return model


def paper_parameter_count():
    """Trainable MoE parameters of the paper's setting (ViT-B/16 CLIP, 11 tasks) on a locally built config."""
    with torch.device("meta"):
        model = get_peft_model(CLIPModel(vit_b16_config()), MoELoraConfig(num_tasks=11))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the weights stay fp32, as Trainer's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every variant's train step under torch.compile (forward and backward)")
    parser.add_argument("--tasks", type=int, default=0,
                        help="also time the step of the last of this many tasks (experts frozen by the earlier ones, "
                        "top_k or coverage with growth) against the first task's")
    parser.add_argument("--tasks_only", action="store_true",
                        help="with --tasks: time only the task-1 and task-N adapters, not the five comparisons")
    parser.add_argument("--hide_frozen_experts", action="store_true",
                        help="with --tasks: the growth adapters' routers select only experts no earlier task froze")
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="proxy-clip",
        help="proxy-clip from the assets, or a randomly initialised ViT-B/16-sized CLIP (timings only)",
    )
    args = parser.parse_args()
    for flag in ("tasks_only", "hide_frozen_experts"):
        if getattr(args, flag) and not args.tasks:
            parser.error(f"--{flag} is about the adapters of --tasks N: give --tasks too")
    torch.manual_seed(0)
    AUTOCAST["enabled"] = args.bf16
    device = torch.device(args.device)
    path = assets_dir(args.assets_dir)
    base = load_model(args.model, path)
    batch = make_batch(path, args.batch_size, base.config.vision_config.image_size, device)
    linear_targets = ["q_proj", "v_proj"]
    candidates = {
        "full fine-tune": lambda: copy.deepcopy(base),
        "peft LoRA (q,v)": lambda: get_peft_model(
            copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=linear_targets)
        ),
        "MoE-LoRA 22e top-2 (q,v)": lambda: get_peft_model(
            copy.deepcopy(base), MoELoraConfig(r=args.rank, target_modules=linear_targets, expert_activation=None,
                                               expert_bias=False, expert_dropout=0.0)
        ),
        "MoE-Adapters 22e top-2 (blocks)": lambda: get_peft_model(copy.deepcopy(base), MoELoraConfig(r=args.rank)),
        "MoE-Adapters 2e top-2 (blocks)": lambda: get_peft_model(
            copy.deepcopy(base), MoELoraConfig(r=args.rank, num_experts=2)
        ),
    }
    if args.tasks_only:
        candidates = {}
    if args.tasks:
        def sequence(policy=None, growth=None, task=args.tasks):
            config = MoELoraConfig(r=args.rank, num_tasks=task, expert_growth_threshold=growth,
                                   hide_frozen_experts=args.hide_frozen_experts and growth is not None)
            model = get_peft_model(copy.deepcopy(base), config)
            if policy is None:
                model.base_model.set_task(0)
                return model
            return after_earlier_tasks(model, task, policy, growth)

        n = args.tasks
        candidates[f"MoE-Adapters, task 1 of {n}"] = sequence
        candidates[f"MoE-Adapters, task 1 of {n}, growing bank"] = lambda: sequence(growth=0.3)
        candidates[f"MoE-Adapters, task {n}, top_k"] = lambda: sequence("top_k")
        candidates[f"MoE-Adapters, task {n}, coverage"] = lambda: sequence("coverage")
        candidates[f"MoE-Adapters, task {n}, growth"] = lambda: sequence("coverage", 0.3)
    models = {name: build() for name, build in candidates.items()}
    if args.compile:
        for name, build in candidates.items():
            twin = build()
            LOSSES[id(twin)] = torch.compile(step_loss)
            models[f"{name} compiled"] = twin
    results = measure_all(models, batch, args.steps, device)
    print(f"model={args.model} device={device} batch={args.batch_size} rank={args.rank} steps={args.steps} "
          f"precision={'bf16 autocast' if args.bf16 else 'fp32'} (median step time, models interleaved)")
    print(f"{'method':46s} {'trainable':>10s} {'step ms':>9s} {'memory MiB':>11s} {'ops':>6s}")
    for r in results.values():
        print(f"{r['name']:46s} {r['trainable']:10,d} {1000 * r['step_s']:9.1f} {r['memory'] / 2**20:11.1f} "
              f"{r['ops']:6d}")

    def ratio(a, b, key):
        return results[a][key] / results[b][key]

    if not args.tasks_only:
        lora, moe_lin = "peft LoRA (q,v)", "MoE-LoRA 22e top-2 (q,v)"
        moe22, moe2, full = "MoE-Adapters 22e top-2 (blocks)", "MoE-Adapters 2e top-2 (blocks)", "full fine-tune"
        print(f"step time  MoE-LoRA(22) / peft LoRA, same layers : {ratio(moe_lin, lora, 'step_s'):.2f}  "
              "(target <= 1.3)")
        print(f"step time  MoE-Adapters(22) / peft LoRA          : {ratio(moe22, lora, 'step_s'):.2f}")
        print(f"step time  MoE(22) / MoE(2), blocks             : {ratio(moe22, moe2, 'step_s'):.2f}  (target <= 1.1)")
        print(f"step time  MoE-Adapters(22) / full fine-tune     : {ratio(moe22, full, 'step_s'):.2f}  (target <= 0.7)")
        print(f"ops        MoE-Adapters(22) / peft LoRA          : {ratio(moe22, lora, 'ops'):.2f}")
        if args.compile:
            print(f"step time  compiled MoE-Adapters(22) / peft LoRA  : "
                  f"{ratio(moe22 + ' compiled', lora + ' compiled', 'step_s'):.2f}  (both compiled)")
            print(f"step time  compiled MoE-Adapters(22) / full FT    : "
                  f"{ratio(moe22 + ' compiled', full + ' compiled', 'step_s'):.2f}  (both compiled)")
        print(f"memory     MoE-LoRA(22) / peft LoRA, same layers : {ratio(moe_lin, lora, 'memory'):.2f}")
        print(f"memory     MoE-Adapters(22) / peft LoRA          : {ratio(moe22, lora, 'memory'):.2f}")
        print(f"paper setting (ViT-B/16 config, 11 tasks): {paper_parameter_count():,d} trainable MoE parameters "
              "(paper: 51.1M)")
    if args.tasks:
        n, ratios = args.tasks, {}
        for policy in ("top_k", "coverage", "growth"):
            first = f"MoE-Adapters, task 1 of {n}" + (", growing bank" if policy == "growth" else "")
            last = f"MoE-Adapters, task {n}, {policy}"
            experts = sum(layer.expert_count("default") for layer in models[last].base_model.moe_layers().values())
            ratios[policy] = ratio(last, first, "step_s")
            print(f"task {n} / task 1, {policy:8s}: step {ratios[policy]:.2f}, ops {ratio(last, first, 'ops'):.2f}, "
                  f"optimizer state {results[last]['optimizer'] / 2**20:.1f} MiB against "
                  f"{results[first]['optimizer'] / 2**20:.1f} MiB ({experts:,} experts in all)")
        print(f"ratio to task 1 at {args.tasks} tasks: "
              + ", ".join(f"{policy} {value:.2f}" for policy, value in ratios.items()))


if __name__ == "__main__":
    main()
