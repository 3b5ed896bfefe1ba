"""Task-agnostic inference cost: MoE-Adapters + DDAS against plain CLIP, on the same batch, in one run.

    python benchmarks/inference_cost.py --model vit-b16-random --batch_size 32 [--repeats 10] [--unseen 0.5]
    python benchmarks/inference_cost.py --model proxy-clip --batch_size 64
    python benchmarks/inference_cost.py --model vit-b16-random --batch_size 32 --device cuda
    python benchmarks/inference_cost.py --model vit-b16-random --batch_size 32 --tasks 30   # a long sequence

The batch mixes images of six datasets, spread over `--tasks` learned tasks (default six); a share `--unseen` of
them comes from tasks the model never learned. DDAS is fitted so that it sends those to zero-shot CLIP and the
others to their task's router. Plain CLIP encodes the batch and scores it against one task's class prompts; the
task-agnostic side computes DDAS features, picks a route per image, finishes the untouched pass for zero-shot images
and runs the routed pass for the others only, then scores each image against its task's prompts (text features are
cached per route, as in a served model). The DDAS feature sources compared: CLIP after 1 block (the untouched pass
is then finished for zero-shot images), the final CLIP embedding (the whole untouched pass, reused for zero-shot
images) and AlexNet (the official extractor, random weights: its cost, not its decisions). Medians of interleaved
repeats; random images of the model's size (ViT-B/16 scale) or real mini-MTIL images (proxy scale).
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_from_disk
from models import MODELS, load_model
from timing import median_ms
from peft import get_peft_model
from transformers import CLIPProcessor

from hf_moe_cl import MoELoraConfig, SelectorConfig, TaskAgnosticClassifier
from hf_moe_cl.assets import MINI_MTIL, PROXY_CLIP, assets_dir
from hf_moe_cl.classification import image_embeddings, text_embeddings
from hf_moe_cl.continual import ContinualTask
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters
from hf_moe_cl.experiments.presets import MINI_TASKS
from hf_moe_cl.ddas.settings import ALEXNET_FEATURES

TASKS = len(MINI_TASKS)


def batch_pixels(root, processor, model, batch_size):
    if model.config.vision_config.image_size != processor.image_processor.crop_size["height"]:
        size = model.config.vision_config.image_size
        return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    images = []
    for index in range(batch_size):
        split = load_from_disk(str(root / MINI_MTIL / MINI_TASKS[index % TASKS]))["test"]
        images.append(split[index // TASKS]["image"].convert("RGB"))
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def task_agnostic(base, processor, labels, pixels, seen, extractor, layer=None, device="cpu", tasks=TASKS):
    """A `tasks`-task MoE model whose DDAS selector sends the `seen` images to their task (image i to task
    i % tasks) and the others to zero-shot; every task has the class names and templates of the task `labels`."""
    model = get_peft_model(base, MoELoraConfig(num_tasks=tasks)).eval()
    if extractor == "alexnet":
        settings = SelectorConfig(feature_dim=ALEXNET_FEATURES, sigmoid_output=True, standardize=False,
                                  feature_extractor="alexnet")
    else:
        width = base.config.projection_dim if layer is None else 2 * base.config.vision_config.hidden_size
        settings = SelectorConfig(feature_dim=width, feature_layer=layer)
    selector = model.base_model.enable_selector(settings)
    model.to(device)
    method = MoEAdapters(model, ddas=DDASArguments(ddas_alexnet_weights=None))  # AlexNet's cost, random weights
    features = method.selector_features(pixels)[0]
    # Fitted on the batch itself, so the decisions are as wanted whatever the (random) weights. A task without an
    # image in the batch is fitted on shifted features, far from every image, so that it is never picked.
    selector.fit_reference(features[~seen], steps=300, lr=1e-2)
    for task in range(tasks):
        rows = torch.nonzero(seen & (torch.arange(len(seen), device=seen.device) % tasks == task)).flatten()
        own = features[rows] if len(rows) else features[seen] + 5.0 * features.std()
        selector.fit_task(task, own, steps=300, lr=1e-2, threshold=float("inf"))
    for task in range(tasks):
        model.base_model.set_task_info(task, f"{MINI_TASKS[task % TASKS]}-{task}", labels.classnames,
                                       labels.templates)
    return TaskAgnosticClassifier(method, processor)


def _autocast(run, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return run()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", default=None)
    parser.add_argument("--model", choices=MODELS, default="proxy-clip")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--unseen", type=float, default=0.5, help="share of the batch from unlearned tasks")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu (the target's setting) or cuda")
    parser.add_argument("--bf16", action="store_true", help="every pipeline under bf16 autocast (weights fp32)")
    parser.add_argument("--tasks", type=int, default=TASKS, help="learned tasks: routers and DDAS autoencoders")
    args = parser.parse_args()
    if args.tasks < 1:
        parser.error(f"--tasks must be at least 1, got {args.tasks}")
    torch.manual_seed(0)
    root = assets_dir(args.assets_dir)
    processor = CLIPProcessor.from_pretrained(root / PROXY_CLIP)
    device = torch.device(args.device)
    plain = load_model(args.model, root).eval().to(device)
    pixels = batch_pixels(root, processor, plain, args.batch_size).to(device)
    seen = (torch.arange(args.batch_size) >= int(round(args.unseen * args.batch_size))).to(device)
    cifar10 = ContinualTask.from_disk(root / MINI_MTIL / "cifar10")
    labels = cifar10.classnames
    text = text_embeddings(plain, processor.tokenizer, labels, cifar10.templates, device)

    @torch.no_grad()
    def plain_clip():
        return (image_embeddings(plain, pixels) @ text.T).argmax(-1)

    candidates = {"plain CLIP": plain_clip}
    routed_share = {}
    for label, extractor, layer in (("DDAS (CLIP after 1 block)", "clip", 1),
                                    ("DDAS (CLIP final embedding)", "clip", None),
                                    ("DDAS (AlexNet, official)", "alexnet", None)):
        classifier = task_agnostic(load_model(args.model, root), processor, cifar10, pixels, seen, extractor, layer,
                                   device, args.tasks)
        routes = classifier.method.select_routes(classifier.core, pixels)[0].selected
        routed_share[label] = float((routes >= 0).float().mean())
        candidates[f"{label} + MoE"] = lambda c=classifier: c.classify(pixels, candidate_labels=labels)
    if args.bf16:
        candidates = {name: (lambda run=run: _autocast(run, device)) for name, run in candidates.items()}
    times = median_ms(candidates, args.repeats, device)
    plain_ms = times["plain CLIP"]
    print(f"model={args.model} tasks={args.tasks} batch={args.batch_size} unseen={args.unseen:.0%} "
          f"precision={'bf16 autocast' if args.bf16 else 'fp32'} (median of {args.repeats} interleaved repeats, "
          f"{device.type})")
    print(f"{'pipeline':42s} {'ms':>8s} {'/ plain':>8s} {'routed':>7s}")
    for name, ms in times.items():
        share = routed_share.get(name.removesuffix(" + MoE"))
        print(f"{name:42s} {ms:8.1f} {ms / plain_ms:8.2f} {'' if share is None else f'{share:.0%}':>7s}")
    print("targets: task-agnostic / plain CLIP <= 1.1 on CPU (batch 32), <= 1.15 on a GPU (batch 128, bf16), "
          "ViT-B/16 scale")


if __name__ == "__main__":
    main()
