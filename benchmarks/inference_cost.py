"""Task-agnostic inference cost: DDAS + per-image routed MoE-Adapters against plain CLIP on the same batch.

    python benchmarks/inference_cost.py [--assets_dir ../shared/assets] [--batch_size 64] [--repeats 30]

Both sides classify the same preprocessed batch (mixed images of the six mini-MTIL tasks): plain CLIP computes
image features and scores them against one task's class prompts; the task-agnostic side computes DDAS features,
picks a router per image, runs the routed forward pass and scores each image against its task's prompts. Timings
are medians of interleaved repeats. DDAS features come from the untouched CLIP: its full image embedding
(`--feature_layer` unset, the default) or the tokens after the first k vision blocks (cheaper).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from datasets import load_from_disk
from peft import get_peft_model
from transformers import CLIPModel, CLIPProcessor

from hf_moe_cl import MoELoraConfig, SelectorConfig, TaskAgnosticClassifier
from hf_moe_cl.assets import assets_dir
from hf_moe_cl.classification import text_embeddings
from hf_moe_cl.continual.methods import MoEAdapters
from hf_moe_cl.presets import MINI_TASKS


def mixed_batch(root, processor, batch_size):
    images = []
    for index in range(batch_size):
        task = MINI_TASKS[index % len(MINI_TASKS)]
        split = load_from_disk(str(root / "mini-mtil" / task))["test"]
        images.append(split[index // len(MINI_TASKS)]["image"].convert("RGB"))
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def routed_classifier(base, processor, root, pixels, feature_layer):
    """A MoE model with six task routers and a DDAS selector fitted on the batch's own features."""
    model = get_peft_model(base, MoELoraConfig(num_tasks=len(MINI_TASKS))).eval()
    width = base.config.projection_dim if feature_layer is None else 2 * base.config.vision_config.hidden_size
    selector = model.base_model.enable_selector(SelectorConfig(feature_dim=width, feature_layer=feature_layer))
    method = MoEAdapters(model)
    features = method.selector_features(pixels)[0]
    selector.fit_reference(features, steps=50)
    per_task = features.shape[0] // len(MINI_TASKS)
    for task in range(len(MINI_TASKS)):
        selector.fit_task(task, features[task::len(MINI_TASKS)][:per_task], steps=50, threshold=float("inf"))
    for task, name in enumerate(MINI_TASKS):
        meta = json.loads((root / "mini-mtil" / name / "task.json").read_text())
        model.base_model.set_task_info(task, name, meta["classnames"], meta["templates"])
    return TaskAgnosticClassifier(method, processor)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    root = assets_dir(args.assets_dir)
    processor = CLIPProcessor.from_pretrained(root / "proxy-clip")
    plain = CLIPModel.from_pretrained(root / "proxy-clip", dtype=torch.float32).eval()
    pixels = mixed_batch(root, processor, args.batch_size)
    meta = json.loads((root / "mini-mtil" / "cifar10" / "task.json").read_text())
    text = text_embeddings(plain, processor.tokenizer, meta["classnames"], meta["templates"], "cpu")

    @torch.no_grad()
    def plain_clip():
        image = F.normalize(plain.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return (image @ text.T).argmax(-1)

    candidates = {"plain CLIP": plain_clip}
    for layer in (None, 1, 2):
        base = CLIPModel.from_pretrained(root / "proxy-clip", dtype=torch.float32)
        classifier = routed_classifier(base, processor, root, pixels, layer)
        label = "final embedding" if layer is None else f"after {layer} block(s)"
        candidates[f"DDAS ({label}) + MoE"] = (
            lambda c=classifier: c.classify(pixels, candidate_labels=meta["classnames"])
        )
    routes = torch.arange(pixels.shape[0]) % len(MINI_TASKS)

    @torch.no_grad()
    def routed_only(c=classifier):
        with c.method.routed(routes):
            image = F.normalize(c.method.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return (image @ text.T).argmax(-1)

    candidates["MoE routed forward only (routes given)"] = routed_only
    times = {name: [] for name in candidates}
    for run in candidates.values():
        run()
    for _ in range(args.repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    plain_ms = 1000 * statistics.median(times["plain CLIP"])
    print(f"batch {args.batch_size}, median of {args.repeats} interleaved repeats (proxy-clip, CPU)")
    print(f"{'pipeline':40s} {'ms':>8s} {'ratio':>6s}")
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        print(f"{name:40s} {ms:8.1f} {ms / plain_ms:6.2f}")
    print("target: task-agnostic / plain CLIP <= 1.15")


if __name__ == "__main__":
    main()
