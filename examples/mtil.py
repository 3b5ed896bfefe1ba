#!/usr/bin/env python
"""Continual learning of CLIP on MTIL (or a variant) with one method, through `ContinualTrainer`.

    accelerate launch examples/mtil.py --preset mtil-order-1 --method moe-adapters --output_dir runs/order1
    python examples/mtil.py --preset mini --method moe-adapters --output_dir runs/mini --use_cpu
    python examples/mtil.py config.yaml            # the same arguments from a YAML or JSON file

After the run, `output_dir` holds accuracy_matrix.json/.csv, metrics.md (Transfer / Average / Last) and
accuracy_matrix.png, plus one checkpoint folder per task (`--resume` continues after the last finished one).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from datasets import load_dataset, load_from_disk
from transformers import CLIPModel, CLIPProcessor, HfArgumentParser

import hf_moe_cl  # noqa: F401  (registers MoE-LoRA with peft)
from hf_moe_cl.assets import assets_dir
from hf_moe_cl.benchmark.experiment import MethodArguments, run_method
from hf_moe_cl.benchmark.metrics import class_incremental_metrics
from hf_moe_cl.presets import (
    MTIL_DATASETS,
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    class_incremental_tasks,
    hub_task,
    mini_mtil_tasks,
)
from hf_moe_cl.benchmark.reporting import write_report
from hf_moe_cl.continual import ContinualTrainingArguments
from hf_moe_cl.continual.methods import ConDUArguments, DDASArguments, LoRAArguments, MoEAdaptersArguments

logger = logging.getLogger(__name__)

PRESETS = {
    # name: (tasks, default steps per task, few-shot)
    "mtil-order-1": (MTIL_ORDER_I, 1000, None),
    "mtil-order-2": (MTIL_ORDER_II, 1000, None),
    "fewshot-mtil-order-1": (MTIL_ORDER_I, 500, 5),
    "fewshot-mtil-order-2": (MTIL_ORDER_II, 500, 5),
    "cifar100-cil-10": (10, 1000, None),
    "cifar100-cil-20": (20, 1000, None),
    "cifar100-cil-50": (50, 1000, None),
    "mini": (None, 200, None),
}
HUB_CLIP = "openai/clip-vit-base-patch16"
CIL_EXPERTS = 2  # the paper's class-incremental setting: 2 experts, one router, no freezing


@dataclass
class ExperimentArguments:
    preset: str = field(default="mini", metadata={"help": f"One of {', '.join(PRESETS)}."})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": f"Base CLIP; default {HUB_CLIP}, or the assets' proxy-clip for `mini`."}
    )
    assets_dir: Optional[str] = field(default=None, metadata={"help": "Shared assets (default ../shared/assets)."})
    steps_per_task: Optional[int] = field(default=None, metadata={"help": "Override the preset's steps per task."})
    tasks: Optional[str] = field(default=None, metadata={"help": "Comma-separated subset/order of the preset's tasks."})
    dataset_ids: Optional[str] = field(
        default=None, metadata={"help": "Override Hub dataset ids: 'name=owner/id,name2=owner/id2'."}
    )
    few_shot: int = field(default=5, metadata={"help": "Examples per class in few-shot presets."})
    resume: bool = field(default=False, metadata={"help": "Continue after the last finished task in output_dir."})
    ddas_reference: Optional[str] = field(
        default=None,
        metadata={"help": "With --ddas: reference images (a saved dataset folder or a Hub dataset id with an image "
                  "column); default for `mini`: the assets' reference/tinyimagenet-ref."},
    )

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")


ARGUMENT_GROUPS = (ExperimentArguments, MethodArguments, MoEAdaptersArguments, DDASArguments, LoRAArguments,
                   ConDUArguments, ContinualTrainingArguments)


def parse_args():
    parser = HfArgumentParser(ARGUMENT_GROUPS)
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(sys.argv[1])
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(sys.argv[1])
    return parser.parse_args_into_dataclasses()


def build_tasks(experiment: ExperimentArguments, seed: int):
    names, _, few_shot = PRESETS[experiment.preset]
    if experiment.preset == "mini":
        selected = experiment.tasks.split(",") if experiment.tasks else None
        return mini_mtil_tasks(assets_dir(experiment.assets_dir), selected)
    if isinstance(names, int):
        spec = MTIL_DATASETS["cifar100"]
        data = load_dataset(spec.hub_id).rename_columns({spec.image_column: "image", spec.label_column: "label"})
        classnames = [n.replace("_", " ") for n in data["train"].features["label"].names]
        return class_incremental_tasks(data["train"], data["test"], classnames, steps=names)
    overrides = dict(item.split("=", 1) for item in experiment.dataset_ids.split(",")) if experiment.dataset_ids else {}
    selected = experiment.tasks.split(",") if experiment.tasks else names
    shots = experiment.few_shot if few_shot else None
    return [hub_task(name, hub_id=overrides.get(name), few_shot=shots, seed=seed) for name in selected]


def main():
    experiment, method_args, moe_args, ddas_args, lora_args, condu_args, training_args = parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    _, default_steps, _ = PRESETS[experiment.preset]
    training_args.max_steps = experiment.steps_per_task or default_steps
    class_incremental = experiment.preset.startswith("cifar100-cil")
    if class_incremental:
        moe_args.shared_router = True
        training_args.evaluate_all_tasks = False
        if moe_args.num_experts == MoEAdaptersArguments.num_experts:
            moe_args.num_experts = CIL_EXPERTS

    model_path = experiment.model_name_or_path
    if model_path is None:
        model_path = str(assets_dir(experiment.assets_dir) / "proxy-clip") if experiment.preset == "mini" else HUB_CLIP
    base = CLIPModel.from_pretrained(model_path, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(model_path)
    tasks = build_tasks(experiment, training_args.seed)
    logger.info("preset %s, method %s, %d tasks: %s", experiment.preset, method_args.method, len(tasks),
                [t.name for t in tasks])

    reference = None
    if ddas_args.ddas:
        source = experiment.ddas_reference or str(assets_dir(experiment.assets_dir) / "reference" / "tinyimagenet-ref")
        reference = load_from_disk(source) if Path(source).is_dir() else load_dataset(source, split="train")
    result = run_method(method_args, base, processor, tasks, training_args, resume=experiment.resume,
                        options=(moe_args, ddas_args, lora_args, condu_args), reference_images=reference)
    if not training_args.process_index == 0:
        return
    output = Path(training_args.output_dir)
    if class_incremental:
        steps = [result.accuracy_matrix[i][i] for i in range(len(tasks))]
        metrics = class_incremental_metrics(steps)
        output.mkdir(parents=True, exist_ok=True)
        (output / "class_incremental.json").write_text(json.dumps({"step_accuracy": steps, "metrics": metrics}))
    else:
        metrics = write_report(output, method_args.method, result.task_names, result.accuracy_matrix)
        print((output / "metrics.md").read_text())
        if result.task_agnostic_matrix is not None:
            agnostic = write_report(output / "task_agnostic", f"{method_args.method} task-agnostic",
                                    result.task_names, result.task_agnostic_matrix)
            metrics.update({f"task_agnostic_{name}": value for name, value in agnostic.items()})
        print(json.dumps({"tasks": result.task_names, "accuracy_matrix": result.accuracy_matrix}, indent=1))
    print(json.dumps({"method": method_args.method, **metrics}))


if __name__ == "__main__":
    main()
