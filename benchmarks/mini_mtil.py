"""Every method of the harness on the `mini` preset (six real datasets, proxy CLIP), one table at the end.

    python benchmarks/mini_mtil.py [--steps_per_task 200] [--assets_dir ../shared/assets] [--output_dir runs/mini]
    python benchmarks/mini_mtil.py --methods condu [--condu_rescaler paper] [--condu_prototypes image] ...

Prints Transfer / Average / Last (ZSCL definitions) and backward transfer per method and the zero-shot accuracy
per task, and writes each method's report (`write_result_report`: per matrix kind the matrix, metrics, forgetting
and heatmap, the route selection of task-agnostic kinds) under output_dir/<method>/ plus results.md. Every option
of `ConDUArguments` and of `DDASArguments` is a flag (ConDU's defaults: the official code's; DDAS's: the library's, e.g.
`--ddas_training official --ddas_feature_extractor alexnet --ddas_threshold 0.0655 --ddas_learning_rate 0.01
--ddas_weight_decay 1e-4 --ddas_include_untrained true` for the official selector); ConDU's storage is reported
beside its metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import CLIPModel, CLIPProcessor, HfArgumentParser

import hf_moe_cl  # noqa: F401
from hf_moe_cl.assets import PROXY_CLIP, REFERENCE_IMAGES, assets_dir
from hf_moe_cl.experiments.experiment import AdapterArguments, MethodArguments, run_method
from hf_moe_cl.experiments.metrics import task_drops
from hf_moe_cl.experiments.presets import mini_mtil_tasks
from hf_moe_cl.experiments.reporting import (
    METRIC_COLUMNS,
    markdown_table,
    selection_summary,
    selection_table,
    write_result_report,
)
from hf_moe_cl.continual import ContinualTrainingArguments
from hf_moe_cl.continual.result import MATRIX_TITLES
from hf_moe_cl.continual.methods import ConDUArguments, DDASArguments, MoEAdaptersArguments
from hf_moe_cl.files import write_text_atomic


MATRIX_NOTE = "Each row names its matrix: " + "; ".join(f"{kind} = {title}" for kind, title in MATRIX_TITLES.items())


def storage_lines(condu: dict) -> list[str]:
    """ConDU's storage after the last task against keeping one delta per task."""
    sizes, tasks = condu["storage_bytes"], len(condu["rescalers"])
    fixed = sizes["unified"] + sizes["origin"]
    lines = [f"ConDU storage after {tasks} tasks: {sizes['stored']:,} bytes = unified {sizes['unified']:,} + origin "
             f"{sizes['origin']:,} + masks {sizes['masks']:,} + prototypes {sizes['prototypes']:,}; per task "
             f"{(sizes['masks'] + sizes['prototypes']) // tasks:,} bytes beside {fixed:,} fixed. One float32 delta per "
             f"task in the same space: {sizes['one_delta_per_task']:,} bytes "
             f"({sizes['one_delta_per_task'] / sizes['stored']:.2f}x)."]
    if "one_weight_delta_per_task" in sizes:
        lines.append(f"One merged float32 weight delta per task: {sizes['one_weight_delta_per_task']:,} bytes "
                     f"({sizes['one_weight_delta_per_task'] / sizes['stored']:.2f}x).")
    lines.append("Rescalers: " + ", ".join(f"{r:.3f}" for r in condu["rescalers"]) + ".")
    return lines + [""]


def summary(header, names, rows, matrices, seconds, selections, leaks, condu=None) -> str:
    """The Markdown report: metrics per method, zero-shot per task, the drop per task, task selection without task
    ids, the routing leak after the last task, ConDU's storage, run times."""
    lines = [header, "", MATRIX_NOTE, "", markdown_table(rows, METRIC_COLUMNS), ""]
    lines += ["Drop per task (accuracy right after its training minus after the last task):", "",
              "| method | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    lines += [f"| {method} | " + " | ".join(f"{d:.1f}" for d in task_drops(matrix)) + " |"
              for method, matrix in matrices.items() if all(v is not None for row in matrix for v in row)]
    lines.append("")
    for method, (report, trainable) in leaks.items():
        lines += [f"Routing leak after the last task ({method}): share of each task's evaluation-time expert "
                  "selections on experts still trainable (vision / text)", "",
                  "| " + " | ".join(report) + " |", "|" + " ---: |" * len(report),
                  "| " + " | ".join(f"{100 * r['vision']['trainable']:.1f} / {100 * r['text']['trainable']:.1f}"
                                    for r in report.values()) + " |", "",
                  f"Expert slots still trainable after the last task ({method}): vision "
                  f"{100 * trainable['vision']:.1f} %, text {100 * trainable['text']:.1f} %", ""]
    if "zero-shot (oracle)" in matrices:
        lines += ["| zero-shot | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
                  "| accuracy | " + " | ".join(f"{v:.1f}" for v in matrices["zero-shot (oracle)"][0]) + " |", ""]
    for method, stages in selections.items():
        lines += [f"Task selection without task ids after the last task ({method}): rows = images of a task, columns "
                  "= where the method sent them (% of the task's test images)", "",
                  selection_table(selection_summary(stages, names), names), ""]
    if condu:
        lines += storage_lines(condu)
    lines.append("| method | seconds |\n| --- | ---: |\n" + "\n".join(f"| {m} | {s:.0f} |" for m, s in seconds.items()))
    return "\n".join(lines)


def main():
    parser = HfArgumentParser([ConDUArguments, DDASArguments, AdapterArguments], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", default=None)
    parser.add_argument("--output_dir", default="runs/mini_mtil")
    parser.add_argument("--steps_per_task", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr_moe", type=float, default=5e-3)
    parser.add_argument("--lr_lora", type=float, default=5e-3)
    parser.add_argument("--lr_full", type=float, default=5e-5)
    parser.add_argument("--lr_condu", type=float, default=None,
                        help="ConDU's learning rate (default: --lr_lora for LoRA, --lr_full for full fine-tuning)")
    parser.add_argument("--methods", default="zero-shot,full-finetune,lora,moe-adapters,individual-finetune")
    parser.add_argument("--task_agnostic", action="store_true",
                        help="MoE-Adapters also trains DDAS (reference: reference/tinyimagenet-ref) and reports the "
                        "task-agnostic matrix, DDAS's task confusion and the unseen-task share sent to zero-shot")
    parser.add_argument("--freeze_policy", default="top_k", help="MoE-Adapters: 'top_k' (paper) or 'coverage'")
    parser.add_argument("--freeze_coverage", type=float, default=1.0)
    parser.add_argument("--merge_experts_every", type=int, default=0, help="MoE-Adapters (Park 2024: 100)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data order, noise, initialisation)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where Trainer trains and evaluates")
    parser.add_argument("--task_checkpoints", action="store_true",
                        help="save a checkpoint after every task and resume from the last one already under "
                        "output_dir/<method> (a long run stopped midway continues where it stopped)")
    condu_args, ddas_args, adapter_args, args = parser.parse_args_into_dataclasses()
    if ddas_args.ddas and not args.task_agnostic:
        parser.error("--ddas true is set by --task_agnostic (which also reports the task-agnostic matrices): use that")
    ddas = dataclasses.replace(ddas_args, ddas=args.task_agnostic)

    root = assets_dir(args.assets_dir)
    base = CLIPModel.from_pretrained(root / PROXY_CLIP, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(root / PROXY_CLIP)
    tasks = mini_mtil_tasks(root)
    reference = load_from_disk(str(root / REFERENCE_IMAGES)) if args.task_agnostic else None
    rates = {"moe-adapters": args.lr_moe, "lora": args.lr_lora, "full-finetune": args.lr_full,
             "individual-finetune": args.lr_full, "zero-shot": args.lr_full,
             "condu": args.lr_condu or (args.lr_lora if condu_args.condu_fine_tune == "lora" else args.lr_full)}
    rows, matrices, seconds, selections, leaks, condu = {}, {}, {}, {}, {}, None
    for method in args.methods.split(","):
        start = time.perf_counter()
        training = ContinualTrainingArguments(
            output_dir=str(Path(args.output_dir) / method), max_steps=args.steps_per_task,
            warmup_steps=max(1, args.steps_per_task // 10), learning_rate=rates[method], use_cpu=args.device == "cpu",
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128, disable_tqdm=True,
            logging_strategy="no", save_task_checkpoints=args.task_checkpoints, seed=args.seed,
        )
        moe = MoEAdaptersArguments(freeze_policy=args.freeze_policy, freeze_coverage=args.freeze_coverage,
                                   merge_experts_every=args.merge_experts_every)
        folder = Path(training.output_dir)
        resume = args.task_checkpoints and folder.is_dir() and any(folder.iterdir())
        result = run_method(MethodArguments(method=method), base, processor, tasks, training, resume=resume,
                            options=(ddas, moe, condu_args, *adapter_args.configs()),
                            reference_images=reference)
        reported = write_result_report(Path(args.output_dir) / method, result, method)
        for kind in result.matrices:  # every row names its matrix
            rows[f"{method} ({kind})"], matrices[f"{method} ({kind})"] = reported[kind], result.matrices[kind]
        if "per_image" in result.matrices:
            selections[method] = result.diagnostics["route_histogram"]["per_image"]
        condu = result.diagnostics.get("condu", condu)
        if "routing_report" in result.diagnostics:
            leaks[method] = (result.diagnostics["routing_report"][-1], result.diagnostics["trainable_experts"][-1])
        seconds[method] = time.perf_counter() - start
        print(f"{method}, {result.headline} matrix: {reported[result.headline]} ({seconds[method]:.0f} s)", flush=True)

    names = [task.name for task in tasks]
    results = {"tasks": names, "matrices": matrices, "metrics": rows, "seconds": seconds, "route_histogram": selections,
               "routing_report": {m: leak for m, (leak, _) in leaks.items()},
               "trainable_experts": {m: trainable for m, (_, trainable) in leaks.items()}, "condu": condu}
    write_text_atomic(Path(args.output_dir) / "results.json", json.dumps(results))
    header = (f"steps per task: {args.steps_per_task}, batch {args.batch_size}, device {args.device}, "
              f"seed {args.seed}, "
              "learning rates: "
              + ", ".join(f"{m} {rates[m]:g}" for m in seconds if m != "zero-shot"))
    if args.task_agnostic:
        changed = {f.name: getattr(group, f.name) for group in (ddas, adapter_args) for f in dataclasses.fields(group)
                   if f.name.startswith("ddas_") and getattr(group, f.name) != f.default}
        header += "; DDAS: " + (", ".join(f"{k[len('ddas_'):]}={v}" for k, v in changed.items()) or "defaults")
    if "condu" in seconds:
        header += "; ConDU: " + ", ".join(f"{k[len('condu_'):]}={v}" for k, v in dataclasses.asdict(condu_args).items())
    report = summary(header, names, rows, matrices, seconds, selections, leaks, condu)
    print(report)
    write_text_atomic(Path(args.output_dir) / "results.md", report + "\n")


if __name__ == "__main__":
    main()
