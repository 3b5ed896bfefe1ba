"""Projected wall time of MTIL Order I as the paper runs it (11 tasks x 1000 steps, MoE-Adapters with DDAS, the
protocol, per-image and oracle matrices after every task), from a scaled run of the real harness.

    python benchmarks/order1_cost.py --model vit-b16-random --scale 0.01 --device cuda --bf16
    python benchmarks/order1_cost.py --model tiny-random --scale 0.002 --device cpu      # the logic, in ~2 minutes

The run uses the `mtil-order-1` preset's recipe (batch 64, official per-task learning rates, the official DDAS
training with AlexNet features at random weights: its cost, not its decisions) on synthetic datasets with the
official class counts and train/test sizes times `--scale`, JPEG images of `--source_size` pixels (decoded and
resized like real ones). Steps per task and DDAS iterations are scaled the same way. It measures training seconds
per step, DDAS fitting, decoding and preprocessing per test image, and the untouched and routed encodings per
image, then projects each to the full run: 11,000 steps, the official DDAS iterations, 97,200 test images read as
often as the evaluation cache (`--eval_cache_gb`) makes necessary, each encoded once by the untouched model and
routed as often as the scaled run routed per oracle encoding. The last line is `projected: <seconds> s`.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from models import MODELS, load_model
from timing import StepTimer, synchronize
from PIL import Image
from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

from hf_moe_cl.assets import PROXY_CLIP, assets_dir
from hf_moe_cl.classification import RoutedClassifier
from hf_moe_cl.experiments.experiment import AdapterArguments
from hf_moe_cl.experiments.recipes import OFFICIAL_DDAS, preset_recipe
from hf_moe_cl.continual import ContinualTask, ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.evaluation import EvaluationEngine
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters, MoEAdaptersArguments
from hf_moe_cl.experiments.datasets import MTIL_DATASETS, MTIL_ORDER_I

FULL_STEPS = 1000
TINY_IMAGENET_TRAIN = 100_000


@dataclass
class Measured:
    """What the scaled run measured (seconds, counts)."""

    train_s_per_step: float
    task_overhead_s: float  # per task: building its optimiser, schedule and loader, and the method's end of task
    ddas_s: float
    ddas_steps: int  # autoencoder iterations the scaled run trained (reference + tasks)
    read_s_per_image: float
    untouched_s_per_image: float
    routed_s_per_image: float
    routed_per_oracle: float  # routed encodings of the three matrices per routed encoding of the oracle alone
    selection_s_per_image: float  # DDAS features and decisions of a test image
    text_s: float  # text features of every label space through the routes asked for: as many at full size
    other_eval_s_per_image: float  # scoring and bookkeeping per test image evaluated


def full_reads(test_sizes: list[int], image_bytes: int, budget_bytes: float, embedding_bytes: int
               ) -> tuple[int, int]:
    """(test images decoded and preprocessed, untouched encodings) over a full run whose evaluation engine keeps
    test sets and their untouched embeddings while the cache budget lasts, in the order they are first read. A set
    is read once before training (the pretrained model's cells of every task after the first) and once per stage."""
    stages = len(test_sizes)
    used = 0.0
    reads = untouched = 0
    for j, size in enumerate(test_sizes):
        passes = stages + (1 if j > 0 else 0)
        if used + size * image_bytes <= budget_bytes:
            used += size * image_bytes
            reads += size
        else:
            reads += size * passes
        if used + size * embedding_bytes <= budget_bytes:
            used += size * embedding_bytes
            untouched += size
        else:
            untouched += size * passes
    return reads, untouched


def project(measured: Measured, test_sizes: list[int], image_bytes: int, budget_bytes: float,
            embedding_bytes: int, full_ddas_steps: int) -> dict[str, float]:
    """Seconds of each part of the full run, and their total."""
    stages = len(test_sizes)
    reads, untouched = full_reads(test_sizes, image_bytes, budget_bytes, embedding_bytes)
    oracle = sum(sum(test_sizes[: i + 1]) for i in range(stages))
    evaluated = sum(test_sizes) * (stages + 1)
    selected = sum(test_sizes) * stages
    parts = {
        "training": stages * (FULL_STEPS * measured.train_s_per_step + measured.task_overhead_s),
        "DDAS fitting": measured.ddas_s * full_ddas_steps / max(measured.ddas_steps, 1),
        "reading test images": reads * measured.read_s_per_image,
        "untouched encodings": untouched * measured.untouched_s_per_image,
        "routed encodings": oracle * measured.routed_per_oracle * measured.routed_s_per_image,
        "DDAS selection": selected * measured.selection_s_per_image,
        "text features": measured.text_s,
        "scoring": evaluated * measured.other_eval_s_per_image,
    }
    parts["total"] = sum(parts.values())
    return parts


# ----- the scaled run -----------------------------------------------------------------------------------------------
def synthetic_split(n: int, classes: int, size: int, seed: int, tint: int = 0) -> Dataset:
    """`n` JPEG images of `size` pixels: smooth random colour fields (they compress and decode like photos) around a
    colour of their own per `tint`, so that even DDAS on random features tells the tasks apart and routes as a
    trained one would, mostly to one task per test set."""
    rng = np.random.default_rng(seed)
    colour = np.random.default_rng(1000 + tint).integers(0, 255, 3)
    images = []
    for _ in range(n):
        coarse = (0.3 * rng.integers(0, 255, (8, 8, 3)) + 0.7 * colour).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        buffer.seek(0)
        images.append(Image.open(buffer))
    return Dataset.from_dict({"image": images, "label": [i % classes for i in range(n)]})


def scaled_tasks(scale: float, source_size: int) -> list[ContinualTask]:
    tasks = []
    for index, name in enumerate(MTIL_ORDER_I):
        spec = MTIL_DATASETS[name]
        train, test = (max(1, math.ceil(n * scale)) for n in spec.official_sizes)
        tasks.append(ContinualTask(name, synthetic_split(train, spec.num_classes, source_size, 2 * index, index),
                                   synthetic_split(test, spec.num_classes, source_size, 2 * index + 1, index),
                                   list(spec.classnames), list(spec.templates),
                                   official_learning_rates=dict(spec.learning_rates)))
    return tasks


class Stopwatch:
    """Seconds and counts of wrapped calls, synchronising the device around each."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.count = device, {}, {}

    def wrap(self, owner, name: str, label: str, count=lambda result, args: 1):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            self.count[label] = self.count.get(label, 0) + count(result, args)
            return result

        setattr(owner, name, timed)


def timed_loader(watch: Stopwatch, loader):
    """The loader's batches, the time spent producing them (decoding, preprocessing) counted as reading."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        watch.seconds["reading"] = watch.seconds.get("reading", 0.0) + time.perf_counter() - start
        watch.count["reading"] = watch.count.get("reading", 0) + batch["pixel_values"].shape[0]
        yield batch


def run_scaled(args) -> tuple[Measured, dict]:
    device = torch.device(args.device)
    root = assets_dir(args.assets_dir)
    base = load_model(args.model, root)
    size = base.config.vision_config.image_size
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                 crop_size={"height": size, "width": size}),
                              tokenizer=CLIPTokenizer.from_pretrained(root / PROXY_CLIP))
    tasks = scaled_tasks(args.scale, args.source_size)
    reference = synthetic_split(max(2, math.ceil(TINY_IMAGENET_TRAIN * args.scale)), 1, args.source_size, 99, 99)
    recipe = preset_recipe("mtil-order-1")
    steps = max(1, round(FULL_STEPS * args.scale))
    ddas_scale = args.scale if args.ddas_scale is None else args.ddas_scale
    ddas_task_steps = max(1, round(OFFICIAL_DDAS["task_steps"] * ddas_scale))
    ddas_reference_steps = max(1, round(OFFICIAL_DDAS["reference_steps"] * ddas_scale))
    ddas = DDASArguments(**dict(recipe[DDASArguments], ddas_task_steps=ddas_task_steps,
                                ddas_reference_steps=ddas_reference_steps, ddas_alexnet_weights=None))
    training = dict(recipe[ContinualTrainingArguments], max_steps=steps, warmup_steps=max(1, steps // 10),
                    per_device_eval_batch_size=args.eval_batch_size)
    output = Path(tempfile.mkdtemp(prefix="order1-cost-"))
    training_args = ContinualTrainingArguments(
        output_dir=str(output), report_to="none", disable_tqdm=True, logging_strategy="no", seed=0,
        use_cpu=device.type == "cpu", bf16=args.bf16, bf16_full_eval=args.bf16, save_task_checkpoints=False,
        eval_cache_gb=args.eval_cache_gb, check_images=False, dataloader_num_workers=args.num_workers, **training)
    selector = AdapterArguments(**recipe[AdapterArguments]).selector_config()
    method = MoEAdapters.from_base(base, [MoEAdaptersArguments(), ddas, selector], num_tasks=len(tasks), rank=64,
                                   reference_images=reference)
    watch = Stopwatch(device)
    watch.wrap(ContinualTrainer, "_train_one_task", "training")
    watch.wrap(MoEAdapters, "_fit_selector", "ddas")
    watch.wrap(MoEAdapters, "choose_routes", "selection", lambda result, a: a[2].shape[0])
    watch.wrap(RoutedClassifier, "text", "text")
    watch.wrap(EvaluationEngine, "_untouched_of", "untouched", lambda result, a: a[3].shape[0])
    watch.wrap(EvaluationEngine, "_routed", "routed", lambda result, a: a[2].shape[0])
    watch.wrap(ContinualTrainer, "_evaluate_stage", "evaluation")
    loader = EvaluationEngine._loader
    EvaluationEngine._loader = lambda self, task: timed_loader(watch, loader(self, task))
    steps_timer = StepTimer(device)
    trainer = ContinualTrainer(method=method, args=training_args, processing_class=processor, callbacks=[steps_timer])
    start = time.perf_counter()
    result = trainer.train_tasks(tasks)
    wall = time.perf_counter() - start
    test_sizes = [len(task.eval_dataset) for task in tasks]
    oracle = sum(sum(test_sizes[: i + 1]) for i in range(len(tasks)))
    routed = sum(stage["routed"] for stage in result.diagnostics["image_encodings"])
    evaluated = sum(test_sizes) * (len(tasks) + 1)
    accounted = sum(watch.seconds.get(k, 0.0) for k in ("reading", "untouched", "routed", "selection", "text"))
    step_s = steps_timer.step_s
    measured = Measured(
        train_s_per_step=step_s,
        task_overhead_s=max(0.0, watch.seconds["training"] / len(tasks) - steps * step_s),
        ddas_s=watch.seconds["ddas"], ddas_steps=ddas_reference_steps + ddas_task_steps * len(tasks),
        read_s_per_image=watch.seconds["reading"] / watch.count["reading"],
        untouched_s_per_image=watch.seconds["untouched"] / watch.count["untouched"],
        routed_s_per_image=watch.seconds["routed"] / watch.count["routed"],
        routed_per_oracle=routed / oracle,
        selection_s_per_image=watch.seconds["selection"] / watch.count["selection"],
        text_s=watch.seconds["text"],
        other_eval_s_per_image=max(0.0, watch.seconds["evaluation"] - accounted) / evaluated,
    )
    return measured, {"wall_s": wall, "scaled_steps": steps, "images": sum(test_sizes), "image_size": size,
                      "projection_dim": base.config.projection_dim}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="vit-b16-random")
    parser.add_argument("--scale", type=float, default=0.01, help="share of steps, images and DDAS iterations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in training and evaluation")
    parser.add_argument("--ddas_scale", type=float, default=None,
                        help="share of the official DDAS iterations (default --scale; 1 trains the selector fully, "
                        "so it routes as in a real run)")
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--eval_cache_gb", type=float, default=4.0)
    parser.add_argument("--source_size", type=int, default=320, help="side of the synthetic JPEG images")
    parser.add_argument("--num_workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--assets_dir", default=None)
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}.")
    measured, info = run_scaled(args)
    test_sizes = [MTIL_DATASETS[name].official_sizes[1] for name in MTIL_ORDER_I]
    image_bytes = 3 * info["image_size"] ** 2 * 4
    parts = project(measured, test_sizes, image_bytes, args.eval_cache_gb * 2**30, 4 * info["projection_dim"],
                    OFFICIAL_DDAS["reference_steps"] + OFFICIAL_DDAS["task_steps"] * len(MTIL_ORDER_I))
    print(f"model={args.model} device={args.device} precision={'bf16' if args.bf16 else 'fp32'} scale={args.scale} "
          f"({info['scaled_steps']} steps per task, {info['images']} test images; scaled run {info['wall_s']:.0f} s)")
    print(f"measured: {1000 * measured.train_s_per_step:.1f} ms/step (+{measured.task_overhead_s:.1f} s per task), "
          f"read {1000 * measured.read_s_per_image:.2f} "
          f"ms/image, untouched {1000 * measured.untouched_s_per_image:.2f} ms/image, routed "
          f"{1000 * measured.routed_s_per_image:.2f} ms/image, {measured.routed_per_oracle:.2f} routed encodings per "
          f"oracle encoding, DDAS {measured.ddas_s:.1f} s for {measured.ddas_steps} iterations, selection "
          f"{1000 * measured.selection_s_per_image:.2f} ms/image, text features {measured.text_s:.1f} s")
    print(f"projected MTIL Order I ({sum(test_sizes):,} test images, eval cache {args.eval_cache_gb:g} GiB):")
    for name, seconds in parts.items():
        if name != "total":
            print(f"  {name:24s} {seconds:10.0f} s  {100 * seconds / parts['total']:5.1f} %")
    print(f"  {'total':24s} {parts['total']:10.0f} s  ({parts['total'] / 3600:.2f} h)")
    print(f"projected: {parts['total']:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
