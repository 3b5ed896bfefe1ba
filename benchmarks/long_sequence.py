"""How MoE-Adapters scales with the number of tasks: the `mini-long` preset (30 tasks), freeze policies side by side.

    OMP_NUM_THREADS=2 python benchmarks/long_sequence.py --output_dir runs/long_sequence          # the full run
    python benchmarks/long_sequence.py --num_tasks 3 --steps_per_task 2 --report_at 1,2,3 --eval_images 20 \\
        --ddas_task_steps 5 --ddas_reference_steps 5 --output_dir runs/long_tiny                   # a smoke run

Variants (`--variants`): MoE-Adapters with `freeze_policy` top_k (the paper), coverage 0.9, coverage 1.0,
coverage 1.0 with a growing bank (`expert_growth_threshold`) and the same with `hide_frozen_experts` (each task's
router kept off the experts earlier tasks froze), individual fine-tuning (one model per task from
the base CLIP: the upper bound), and `moe-alone`: each task learned alone by a fresh MoE adapter on the base CLIP, at
the MoE variants' steps and rate (what the adapter reaches on a task with nothing learned before it; no DDAS, so
only the task-aware columns). Every other MoE variant trains DDAS (CLIP features, the assets' Tiny ImageNet reference)
so that the task-agnostic matrices exist. Reported after each task count of `--report_at` (default 6, 12, 18, 24,
30), in results.md / results.json and one PNG per quantity against the number of tasks:

- Last / individual fine-tuning: the mean over the tasks learned so far of their accuracy (task id given), divided
  by the same mean of individual fine-tuning;
- BWT over the tasks learned so far; the newest task's accuracy right after training against its individual
  fine-tune, and the same for the last six tasks together (one per dataset, so less noisy);
- the share of the last six tasks' expert selections (at evaluation, right after each trained) that fall on experts
  earlier tasks froze: what a new task routes through but cannot train;
- trainable expert slots (vision + text: experts frozen by no task) and all expert slots;
- adapter bytes: the saved adapter of a model that learned that many tasks (experts, plus one router per task;
  the DDAS selector is not counted);
- DDAS task identification of the learned tasks' test images, per image and per batch (the paper's protocol);
- task-agnostic inference time of a mixed batch (`TaskAgnosticClassifier`) against plain CLIP on the same batch;
- training step time (median over the steps of the task just learned).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib
import torch
from datasets import load_from_disk
from peft import get_peft_model_state_dict
from timing import StepTimer, median_ms
from transformers import CLIPModel, CLIPProcessor, set_seed

import hf_moe_cl  # noqa: F401
from hf_moe_cl import MoELoraConfig, TaskAgnosticClassifier
from hf_moe_cl.ddas.settings import SELECTOR_KEY
from hf_moe_cl.assets import PROXY_CLIP, REFERENCE_IMAGES, assets_dir
from hf_moe_cl.experiments.experiment import MethodArguments, prepare_method
from hf_moe_cl.classification import image_embeddings, text_embeddings
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters, MoEAdaptersArguments
from hf_moe_cl.experiments.figures import save_png
from hf_moe_cl.files import read_json_file, write_json_atomic, write_text_atomic
from hf_moe_cl.experiments.presets import MINI_LONG_EVAL_IMAGES, MINI_LONG_STEPS, mini_long_names, mini_long_tasks

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PER_TASK_TENSORS = ("moe_lora_router_gate", "moe_lora_router_noise", "moe_lora_counts", "moe_lora_router_frozen")
ROUND = 6  # mini-long's rounds: one task of each dataset
GROWTH = "coverage-1.0+growth"
HIDDEN = "coverage-1.0+growth+hidden"
ALONE = "moe-alone"


def variants(growth_threshold: float) -> dict[str, dict]:
    return {
        "top_k": dict(freeze_policy="top_k"),
        "coverage-0.9": dict(freeze_policy="coverage", freeze_coverage=0.9),
        "coverage-1.0": dict(freeze_policy="coverage", freeze_coverage=1.0),
        GROWTH: dict(freeze_policy="coverage", freeze_coverage=1.0,
                                    adapter=MoELoraConfig(expert_growth_threshold=growth_threshold)),
        HIDDEN: dict(freeze_policy="coverage", freeze_coverage=1.0, adapter=MoELoraConfig(
            expert_growth_threshold=growth_threshold, hide_frozen_experts=True)),
        "individual": None,
        ALONE: None,
    }


def shaping(settings, variant: str):
    """The settings that shape `variant`'s numbers: the growth threshold only the growth variant's, so individual
    fine-tuning measured beside growth 0.3 serves a growth-0.5 folder too (copy its `individual.json` there)."""
    if variant in (GROWTH, HIDDEN) or not isinstance(settings, dict):
        return settings
    return {k: v for k, v in settings.items() if k != "growth_threshold"}


def adapter_bytes(model, learned: int) -> int:
    """Bytes of the saved adapter of a model that learned `learned` tasks: every expert tensor, and of the
    per-task tensors (routers, counts) the rows of those tasks; the DDAS selector is left out."""
    total = 0
    for key, tensor in get_peft_model_state_dict(model).items():
        if SELECTOR_KEY in key:
            continue
        size = tensor.numel() * tensor.element_size()
        if any(name in key for name in PER_TASK_TENSORS):
            size = size // tensor.shape[0] * learned
        total += size
    return total


class MeasuredTrainer(ContinualTrainer):
    """A `ContinualTrainer` that, after the stages of `report_at`, measures the adapter's size and the
    task-agnostic inference time against plain CLIP on a fixed mixed batch."""

    def __init__(self, *args, report_at=(), plain=None, probe=None, repeats=5, **kwargs):
        super().__init__(*args, **kwargs)
        self.report_at, self.plain, self.probe, self.repeats = set(report_at), plain, probe, repeats
        self.measured: dict[int, dict] = {}

    def _evaluate_stage(self, index, tasks, *args, **kwargs):
        encodings = super()._evaluate_stage(index, tasks, *args, **kwargs)
        learned = index + 1
        if learned in self.report_at and isinstance(self.method, MoEAdapters):
            self.measured[learned] = {"adapter_bytes": adapter_bytes(self.method.model, learned),
                                      **self._inference_ms()}
        return encodings

    @torch.no_grad()
    def _inference_ms(self) -> dict:
        if not self.method.selects_routes:
            return {}
        pixels, labels = self.probe
        device = self.args.device
        pixels = pixels.to(device)
        classifier = TaskAgnosticClassifier(self.method, self.processing_class)
        text = text_embeddings(self.plain, self.processing_class.tokenizer, labels, ["a photo of a {}."], device)

        def plain():
            return (image_embeddings(self.plain, pixels) @ text.T).argmax(-1)

        def agnostic():
            return classifier.classify(pixels, candidate_labels=labels)

        times = median_ms({"plain": plain, "agnostic": agnostic}, self.repeats, device)
        return {"plain_ms": times["plain"], "agnostic_ms": times["agnostic"]}


def probe_batch(tasks, processor, size: int):
    """A fixed batch mixing the test images of every task in turn (from the first again when a task has fewer than
    its share), and every class name (zero-shot labels)."""
    datasets = [task.eval_dataset for task in tasks]
    images = [datasets[i % len(tasks)][(i // len(tasks)) % len(datasets[i % len(tasks)])]["image"].convert("RGB")
              for i in range(size)]
    labels = sorted({name for task in tasks for name in task.classnames})
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"], labels


def identification(stages, learned: int) -> float:
    """Share (%) of the learned tasks' test images sent to their own route after `learned` tasks."""
    counts = stages[learned - 1][:learned]
    right = sum(task[j + 1] for j, task in enumerate(counts))
    return 100.0 * right / max(1, sum(sum(task) for task in counts))


def training_arguments(args, output: Path, learning_rate: float) -> ContinualTrainingArguments:
    return ContinualTrainingArguments(
        output_dir=str(output), max_steps=args.steps_per_task, warmup_steps=max(1, args.steps_per_task // 10),
        use_cpu=True, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128, disable_tqdm=True,
        logging_strategy="no", save_task_checkpoints=False, report_to="none", seed=args.seed,
        learning_rate=learning_rate)


def alone_record(args, base, processor, tasks, output: Path) -> dict:
    """`moe-alone`: each task trained as a one-task MoE-Adapters run on the base CLIP (a fresh adapter, the run's
    seed). Its oracle matrix holds in row i every task up to i at the accuracy its own adapter reached, so Last is
    the mean of those and BWT is 0, as for individual fine-tuning."""
    accuracy, step_ms = [], []
    for index, task in enumerate(tasks):
        training = training_arguments(args, output / f"task_{index + 1:02d}", args.learning_rate)
        method, training = prepare_method(MethodArguments(method="moe-adapters", use_task_learning_rates=False),
                                          base, [task], training, options=(DDASArguments(ddas=False),))
        timer = StepTimer(training.device)
        result = ContinualTrainer(method=method, args=training, processing_class=processor,
                                  callbacks=[timer]).train_tasks([task])
        accuracy.append(result.matrices["oracle"][0][0])
        step_ms.append(timer.per_task_ms[0])
        print(f"{ALONE}: task {index + 1} ({task.name}) {accuracy[-1]:.1f}", flush=True)
    oracle = [accuracy[:i + 1] + [None] * (len(tasks) - i - 1) for i in range(len(tasks))]
    return {"matrices": {"oracle": oracle}, "diagnostics": {}, "step_ms": step_ms, "measured": {}}


def variant_record(result, timer, measured) -> dict:
    """What the table needs of one variant's run, in JSON form (saved as <variant>.json so that variants can run in
    separate processes and a finished one is not run again)."""
    keep = ("expert_slots", "route_histogram", "routing_report")
    return {"matrices": result.matrices, "diagnostics": {k: v for k, v in result.diagnostics.items() if k in keep},
            "step_ms": timer.per_task_ms, "measured": {str(n): m for n, m in measured.items()}}


def on_earlier_frozen(record, recent) -> float | None:
    """Share (%) of the `recent` tasks' evaluation-time expert selections, measured right after each trained, that
    fall on experts earlier tasks froze (neither trainable nor frozen by the task itself), the towers averaged."""
    reports = record["diagnostics"].get("routing_report")
    if not reports:
        return None
    shares = [report[tower]["not_own"] - report[tower]["trainable"] for j in recent
              for report in [reports[j][record["tasks"][j]]] for tower in ("vision", "text") if tower in report]
    return 100.0 * sum(shares) / len(shares)


def rows_at(record, individual, report_at) -> dict[int, dict]:
    oracle = record["matrices"]["oracle"]
    diagonal = [individual[j][j] for j in range(len(individual))] if individual else None
    rows = {}
    for n in report_at:
        if n > len(oracle):
            continue
        last = sum(oracle[n - 1][:n]) / n
        row = {"last": last, "newest": oracle[n - 1][n - 1], "step_ms": record["step_ms"][n - 1],
               "bwt": sum(oracle[n - 1][j] - oracle[j][j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0}
        recent = range(max(0, n - ROUND), n)  # one task per dataset: less noisy than the newest alone
        if diagonal and len(diagonal) >= n:
            row["last_over_individual"] = 100.0 * last / (sum(diagonal[:n]) / n)
            row["newest_over_individual"] = 100.0 * oracle[n - 1][n - 1] / diagonal[n - 1]
            row["recent_over_individual"] = 100.0 * sum(oracle[j][j] for j in recent) / sum(diagonal[j] for j in recent)
        row["on_earlier_frozen"] = on_earlier_frozen(record, recent)
        slots = record["diagnostics"].get("expert_slots")
        if slots:
            row["trainable_slots"] = sum(t["trainable"] for t in slots[n - 1].values())
            row["expert_slots"] = sum(t["total"] for t in slots[n - 1].values())
        for kind, label in (("per_image", "ddas_per_image"), ("protocol", "ddas_per_batch")):
            stages = record["diagnostics"].get("route_histogram", {}).get(kind)
            if stages:
                row[label] = identification(stages, n)
        row.update(record["measured"].get(str(n), {}))
        if "agnostic_ms" in row:
            row["agnostic_over_plain"] = row["agnostic_ms"] / row["plain_ms"]
        rows[n] = row
    return rows


COLUMNS = [("last", "Last", "{:.1f}"), ("last_over_individual", "Last / indiv. %", "{:.1f}"),
           ("bwt", "BWT", "{:.2f}"), ("newest_over_individual", "newest / indiv. %", "{:.1f}"),
           ("recent_over_individual", "last 6 new / indiv. %", "{:.1f}"),
           ("on_earlier_frozen", "last 6 on earlier-frozen %", "{:.1f}"),
           ("trainable_slots", "trainable slots", "{:,}"), ("expert_slots", "all slots", "{:,}"),
           ("adapter_bytes", "adapter bytes", "{:,}"), ("ddas_per_image", "DDAS per image %", "{:.1f}"),
           ("ddas_per_batch", "DDAS per batch %", "{:.1f}"), ("agnostic_over_plain", "agnostic / plain", "{:.2f}"),
           ("step_ms", "step ms", "{:.0f}")]


def markdown(table: dict[str, dict[int, dict]], header: str) -> str:
    lines = [header, ""]
    for variant, rows in table.items():
        lines += [f"### {variant}", "", "| tasks | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
                  "| ---: |" + " ---: |" * len(COLUMNS)]
        for n, row in rows.items():
            cells = [form.format(row[key]) if row.get(key) is not None else "" for key, _, form in COLUMNS]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict[str, dict[int, dict]], output: Path) -> list[str]:
    """One PNG per quantity against the number of tasks, and all of them on one page (scaling.png)."""
    panels = []
    for key, label, _ in COLUMNS:
        series = {v: [(n, r[key]) for n, r in rows.items() if r.get(key) is not None] for v, rows in table.items()}
        series = {v: points for v, points in series.items() if points}
        if series:
            panels.append((key, label, series))

    def draw(axis, label, series):
        for variant, points in series.items():
            axis.plot([n for n, _ in points], [value for _, value in points], marker="o", label=variant)
        axis.set_xlabel("tasks learned")
        axis.set_ylabel(label)
        axis.set_title(f"mini-long: {label}", fontsize=9)
        axis.legend(fontsize=6)

    written = []
    for key, label, series in panels:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        draw(axis, label, series)
        figure.tight_layout()
        save_png(figure, output / f"{key}.png", dpi=120)
        plt.close(figure)
        written.append(f"{key}.png")
    if panels:
        columns = 3
        rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
        for axis, (_, label, series) in zip(axes.flat, panels):
            draw(axis, label, series)
        for axis in list(axes.flat)[len(panels):]:
            axis.set_visible(False)
        figure.tight_layout()
        save_png(figure, output / "scaling.png", dpi=80)
        plt.close(figure)
        written.append("scaling.png")
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets_dir", default=None)
    parser.add_argument("--output_dir", default="runs/long_sequence")
    parser.add_argument("--num_tasks", type=int, default=30, help="the first N tasks of mini-long")
    parser.add_argument("--report_at", default="6,12,18,24,30")
    parser.add_argument("--variants", default=",".join(variants(0.3)))
    parser.add_argument("--steps_per_task", type=int, default=MINI_LONG_STEPS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-3, help="MoE-Adapters")
    parser.add_argument("--individual_learning_rate", type=float, default=5e-5, help="individual full fine-tuning")
    parser.add_argument("--eval_images", type=int, default=MINI_LONG_EVAL_IMAGES, help="test images per task")
    parser.add_argument("--growth_threshold", type=float, default=0.3, help="the two growth variants")
    parser.add_argument("--ddas_task_steps", type=int, default=300)
    parser.add_argument("--ddas_reference_steps", type=int, default=1000)
    parser.add_argument("--probe_batch", type=int, default=64, help="images of the inference-time batch")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data order, noise, initialisation)")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: build results.md from the <variant>.json files already in output_dir")
    args = parser.parse_args()

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    counts = args.report_at.split(",")
    if not all(n.strip().isdigit() and int(n) >= 1 for n in counts):
        parser.error(f"--report_at must be task counts separated by commas (e.g. 6,12,18), got {args.report_at!r}")
    report_at = sorted({int(n) for n in counts} | {args.num_tasks})
    known = variants(args.growth_threshold)
    chosen = args.variants.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose among {', '.join(known)}")
    if not 1 <= args.num_tasks <= len(mini_long_names()):
        parser.error(f"--num_tasks must be between 1 and {len(mini_long_names())}")
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "output_dir", "report_only")}
    records = {}
    for variant in chosen:
        saved = output / f"{variant}.json"
        if saved.is_file():
            try:
                record = read_json_file(saved)
            except ValueError as error:
                parser.error(f"{error} Once it is deleted, {variant} is measured again.")
            if not isinstance(record, dict) or shaping(record.get("settings"), variant) != shaping(settings, variant):
                parser.error(f"{saved} was measured with other settings ({record.get('settings')}); "
                             f"delete it or use another --output_dir")
            records[variant] = record
            print(f"{variant}: measured before, read from {saved}", flush=True)
    todo = [] if args.report_only else [v for v in chosen if v not in records]
    if args.report_only and not records:
        parser.error(f"--report_only: {output} holds no <variant>.json of {', '.join(chosen)}: nothing to report. Run "
                     "the variants first (without --report_only), or name the folder that holds them.")
    if todo:  # the assets only now: the options and the saved records are checked without them
        root = assets_dir(args.assets_dir)
        base = CLIPModel.from_pretrained(root / PROXY_CLIP, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(root / PROXY_CLIP)
        tasks = mini_long_tasks(root, mini_long_names()[:args.num_tasks], eval_images=args.eval_images)
        reference = load_from_disk(str(root / REFERENCE_IMAGES))
        probe = probe_batch(tasks, processor, args.probe_batch)
        plain = copy.deepcopy(base).eval()
    for variant in todo:
        start = time.perf_counter()
        if variant == ALONE:
            measured = alone_record(args, base, processor, tasks, output / variant)
        else:
            rate = args.individual_learning_rate if variant == "individual" else args.learning_rate
            training = training_arguments(args, output / variant, rate)
            options = ()
            if known[variant]:  # the variant's options; `settings` stays the run's (saved in each record)
                chosen_options = dict(known[variant])
                options = (MoEAdaptersArguments(**{k: v for k, v in chosen_options.items() if k != "adapter"}),
                           chosen_options.get("adapter", MoELoraConfig()),
                           DDASArguments(ddas=True, ddas_task_steps=args.ddas_task_steps,
                                         ddas_reference_steps=args.ddas_reference_steps))
            method_args = MethodArguments(method="individual-finetune" if variant == "individual" else "moe-adapters",
                                          use_task_learning_rates=False)
            set_seed(args.seed)
            method, training = prepare_method(method_args, base, tasks, training, options=options,
                                              reference_images=reference if known[variant] else None)
            timer = StepTimer(training.device)
            trainer = MeasuredTrainer(method=method, args=training, processing_class=processor, callbacks=[timer],
                                      report_at=report_at, plain=plain, probe=probe)
            measured = variant_record(trainer.train_tasks(tasks), timer, trainer.measured)
        records[variant] = {"settings": settings, "tasks": [t.name for t in tasks], **measured,
                            "seconds": time.perf_counter() - start}
        write_json_atomic(output / f"{variant}.json", records[variant])
        print(f"{variant}: {records[variant]['seconds']:.0f} s", flush=True)

    everything = {p.stem: json.loads(p.read_text()) for p in sorted(output.glob("*.json"))
                  if p.stem in known and p.stem not in records}
    records.update({v: r for v, r in everything.items() if shaping(r.get("settings"), v) == shaping(settings, v)})
    individual = records.get("individual", {}).get("matrices", {}).get("oracle")
    table = {variant: rows_at(records[variant], individual, report_at) for variant in known if variant in records}
    header = (f"mini-long, first {args.num_tasks} tasks, {args.steps_per_task} steps per task, batch "
              f"{args.batch_size}, lr {args.learning_rate:g} (individual {args.individual_learning_rate:g}), "
              f"{args.eval_images} test images per task, growth threshold {args.growth_threshold:g}; seconds: "
              + ", ".join(f"{v} {r['seconds']:.0f}" for v, r in records.items()))
    write_json_atomic(output / "results.json", {"arguments": vars(args), "table": table})
    report = markdown(table, header)
    figures = plot(table, output)
    report += "\nFigures: " + ", ".join(figures) + "\n"
    write_text_atomic(output / "results.md", report)
    print(report)


if __name__ == "__main__":
    main()
