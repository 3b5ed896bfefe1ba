"""What evaluation costs and whether cheaper evaluation changes the numbers, on mini MTIL (proxy CLIP, CPU).

    python benchmarks/eval_cost.py [--steps_per_task 50] [--assets_dir ../shared/assets]

Trains MoE-Adapters with DDAS on the six mini tasks with every matrix after every task (protocol, per-image,
oracle), then prints:
- image encodings: what the run's three matrices cost (`diagnostics["image_encodings"]`) against what the oracle
  matrix alone needs (its routed encodings plus the pretrained model's cells), and against evaluating each matrix
  on its own as before the evaluation engine (every image through the untouched model for each task-agnostic
  matrix, and routed for each matrix);
- the final model's accuracies in each matrix evaluated in fp32 at batch 128 (the reference), fp32 at batch 512,
  bf16 (autocast) at 128 and at 512: the largest difference to the reference, per matrix.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import load_from_disk
from transformers import CLIPModel, CLIPProcessor

import hf_moe_cl  # noqa: F401
from hf_moe_cl.assets import PROXY_CLIP, REFERENCE_IMAGES, assets_dir
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.evaluation import CellRequest
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters, MoEAdaptersArguments
from hf_moe_cl.experiments.presets import mini_mtil_tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps_per_task", type=int, default=50)
    parser.add_argument("--assets_dir", default=None)
    args = parser.parse_args()
    root = assets_dir(args.assets_dir)
    base = CLIPModel.from_pretrained(root / PROXY_CLIP, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(root / PROXY_CLIP)
    tasks = mini_mtil_tasks(root)
    reference = load_from_disk(str(root / REFERENCE_IMAGES))
    ddas = DDASArguments(ddas=True, ddas_task_steps=1000)
    method = MoEAdapters.from_base(base, [MoEAdaptersArguments(), ddas], num_tasks=len(tasks), rank=64,
                                   reference_images=reference)
    training = ContinualTrainingArguments(output_dir=tempfile.mkdtemp(prefix="eval-cost-"), max_steps=args.steps_per_task,
                                          warmup_steps=max(1, args.steps_per_task // 10), learning_rate=5e-3,
                                          use_cpu=True, report_to="none", disable_tqdm=True, logging_strategy="no",
                                          save_task_checkpoints=False, seed=0)
    trainer = ContinualTrainer(method=method, args=training, processing_class=processor)
    result = trainer.train_tasks(tasks)

    sizes = [len(task.eval_dataset) for task in tasks]
    stages = len(tasks)
    ran = sum(stage["untouched"] + stage["routed"] for stage in result.diagnostics["image_encodings"])
    oracle_alone = sum(sizes[1:]) + sum(sum(sizes[: i + 1]) for i in range(stages))
    separate = oracle_alone + 2 * stages * sum(sizes) * 2  # per task-agnostic matrix: untouched + routed, every stage
    print(f"image encodings of the three matrices: {ran:,}; oracle matrix alone: {oracle_alone:,} "
          f"({ran / oracle_alone:.2f}x; target <= 1.5x); each matrix on its own as before: at most {separate:,}")

    reference_cells = None
    for precision, batch in (("fp32", 128), ("fp32", 512), ("bf16", 128), ("bf16", 512)):
        trainer.args.per_device_eval_batch_size = batch
        trainer.args.bf16_full_eval = precision == "bf16"
        trainer._engine = None
        cells = {}
        for j, task in enumerate(tasks):
            found = trainer.engine.evaluate(task, CellRequest(oracle=j, per_image=True, protocol=True),
                                            trainer.classifier())
            for kind, cell in found.items():
                cells.setdefault(kind, []).append(cell.accuracy)
        if reference_cells is None:
            reference_cells = cells
        worst = {kind: max(abs(a - b) for a, b in zip(cells[kind], reference_cells[kind])) for kind in cells}
        print(f"{precision} batch {batch}: " + ", ".join(
            f"{kind} [{' '.join(f'{a:.1f}' for a in cells[kind])}] max diff {worst[kind]:.2f}" for kind in cells))


if __name__ == "__main__":
    main()
