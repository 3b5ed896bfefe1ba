"""Every method of the harness on the `mini` preset (six real datasets, proxy CLIP), one table at the end.

    python benchmarks/mini_mtil.py [--steps_per_task 200] [--assets_dir ../shared/assets] [--output_dir runs/mini]
    python benchmarks/mini_mtil.py --methods condu [--condu_rescaler paper] [--condu_prototypes image] ...

Prints Transfer / Average / Last per method (ZSCL definitions) and the zero-shot accuracy per task, and writes
each method's accuracy matrix, metrics and heatmap under output_dir/<method>/ plus results.md. Every option of
`ConDUArguments` is a flag (defaults: the official code's).
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
from hf_moe_cl.assets import assets_dir
from hf_moe_cl.benchmark.experiment import MethodArguments, run_method
from hf_moe_cl.presets import mini_mtil_tasks
from hf_moe_cl.benchmark.reporting import markdown_table, write_report
from hf_moe_cl.continual import ContinualTrainingArguments
from hf_moe_cl.continual.methods import ConDUArguments, DDASArguments


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


def summary(header, names, rows, matrices, seconds, selections, condu=None) -> str:
    """The Markdown report: metrics per method, zero-shot per task, task selection without task ids, ConDU's
    storage, run times."""
    lines = [header, "", markdown_table(rows), ""]
    if "zero-shot" in matrices:
        lines += ["| zero-shot | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
                  "| accuracy | " + " | ".join(f"{v:.1f}" for v in matrices["zero-shot"][0]) + " |", ""]
    for method, stages in selections.items():
        lines += [f"Task selection without task ids after the last task ({method}): rows = images of a task, columns "
                  "= where the method sent them (% of the task's test images)", "",
                  "| images of | zero-shot | " + " | ".join(names) + " | correct |",
                  "| --- |" + " ---: |" * (len(names) + 2)]
        for j, counts in enumerate(stages[-1]):
            share = [100.0 * c / sum(counts) for c in counts]
            lines.append(f"| {names[j]} | " + " | ".join(f"{s:.1f}" for s in share) + f" | {share[j + 1]:.1f} |")
        unseen = [stages[i][j] for i in range(len(names)) for j in range(i + 1, len(names))]
        to_zero_shot = 100.0 * sum(c[0] for c in unseen) / sum(sum(c) for c in unseen)
        lines += ["", f"Images of tasks not yet learned sent to zero-shot CLIP: {to_zero_shot:.1f} %", ""]
    if condu:
        lines += storage_lines(condu)
    lines.append("| method | seconds |\n| --- | ---: |\n" + "\n".join(f"| {m} | {s:.0f} |" for m, s in seconds.items()))
    return "\n".join(lines)


def main():
    parser = HfArgumentParser([ConDUArguments], description=__doc__,
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
    parser.add_argument("--ddas_feature_layer", type=int, default=None)
    parser.add_argument("--ddas_task_steps", type=int, default=300, help="paper: 300")
    condu_args, args = parser.parse_args_into_dataclasses()

    root = assets_dir(args.assets_dir)
    base = CLIPModel.from_pretrained(root / "proxy-clip", dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(root / "proxy-clip")
    tasks = mini_mtil_tasks(root)
    reference = load_from_disk(str(root / "reference" / "tinyimagenet-ref")) if args.task_agnostic else None
    rates = {"moe-adapters": args.lr_moe, "lora": args.lr_lora, "full-finetune": args.lr_full,
             "individual-finetune": args.lr_full, "zero-shot": 0.0,
             "condu": args.lr_condu or (args.lr_lora if condu_args.condu_fine_tune == "lora" else args.lr_full)}
    rows, matrices, seconds, selections, condu = {}, {}, {}, {}, None
    for method in args.methods.split(","):
        start = time.perf_counter()
        training = ContinualTrainingArguments(
            output_dir=str(Path(args.output_dir) / method), max_steps=args.steps_per_task,
            warmup_steps=max(1, args.steps_per_task // 10), learning_rate=rates[method], use_cpu=True,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256, disable_tqdm=True,
            logging_strategy="no", save_task_checkpoints=False, seed=0,
        )
        ddas = DDASArguments(ddas=args.task_agnostic, ddas_feature_layer=args.ddas_feature_layer,
                             ddas_task_steps=args.ddas_task_steps)
        result = run_method(MethodArguments(method=method), base, processor, tasks, training,
                            options=(ddas, condu_args), reference_images=reference)
        condu = result.diagnostics.get("condu", condu)
        rows[method] = write_report(Path(args.output_dir) / method, method, result.task_names, result.accuracy_matrix)
        matrices[method] = result.accuracy_matrix
        if result.task_agnostic_matrix is not None:
            agnostic = f"{method} task-agnostic ({'voting' if method == 'condu' else 'DDAS'})"
            rows[agnostic] = write_report(Path(args.output_dir) / f"{method}-task-agnostic", agnostic,
                                          result.task_names, result.task_agnostic_matrix)
            matrices[agnostic] = result.task_agnostic_matrix
            selections[method] = result.diagnostics["route_histogram"]["per_image"]
        seconds[method] = time.perf_counter() - start
        print(f"{method}: {rows[method]} ({seconds[method]:.0f} s)", flush=True)

    names = [task.name for task in tasks]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps({"tasks": names, "matrices": matrices,
                                                                      "metrics": rows, "seconds": seconds,
                                                                      "route_histogram": selections,
                                                                      "condu": condu}))
    header = (f"steps per task: {args.steps_per_task}, batch {args.batch_size}, learning rates: "
              + ", ".join(f"{m} {rates[m]:g}" for m in seconds if m != "zero-shot"))
    if "condu" in seconds:
        header += "; ConDU: " + ", ".join(f"{k[len('condu_'):]}={v}" for k, v in dataclasses.asdict(condu_args).items())
    report = summary(header, names, rows, matrices, seconds, selections, condu)
    print(report)
    (Path(args.output_dir) / "results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
