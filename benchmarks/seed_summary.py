"""Mean and range over seeds of `benchmarks/mini_mtil.py` runs: one group per setting, one run per seed.

    python benchmarks/seed_summary.py "55 experts=runs/e55-s0,runs/e55-s1,runs/e55-s2" \
        "55 experts, merging every 100=runs/m55-s0,runs/m55-s1,runs/m55-s2" [--baseline "55 experts"]

Reads each run's `results.json` and prints, per group and matrix row (e.g. `moe-adapters (oracle)`), Transfer /
Average / Last / BWT as the mean over its runs with the range (min-max), and the mean drop per task. With
`--baseline NAME`, every other group's difference to that group, paired run by run (list the runs of every group in
the same seed order): a difference is only worth reporting when its range excludes 0. For task-agnostic runs it
also prints each task's share of test images the selector identified correctly and the share of unseen-task images
sent to zero-shot, as mean (min-max). The seeds' spread is the point: on the proxy single runs differ by points.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hf_moe_cl.experiments.metrics import task_drops
from hf_moe_cl.experiments.reporting import METRIC_COLUMNS, METRIC_LABELS, selection_summary


def load_group(spec: str) -> tuple[str, list[dict]]:
    """`NAME=dir,dir,...` -> (NAME, the runs' results.json contents)."""
    name, sep, folders = spec.partition("=")
    if not sep or not name.strip() or not folders.strip():
        raise SystemExit(f"A group is NAME=FOLDER,FOLDER,...; got {spec!r}.")
    runs = []
    for folder in folders.split(","):
        path = Path(folder.strip()) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: that run has not finished (or the folder is wrong).")
        runs.append(json.loads(path.read_text()))
    tasks = {tuple(run["tasks"]) for run in runs}
    if len(tasks) != 1:
        raise SystemExit(f"The runs of group {name!r} have different task sequences: {sorted(tasks)}.")
    return name.strip(), runs


def spread(values: list[float]) -> str:
    """`mean (min-max)`, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ({min(values):.1f} to {max(values):.1f})"


def metric_rows(groups: dict[str, list[dict]]) -> list[str]:
    lines = ["| runs | matrix row | seeds | " + " | ".join(METRIC_LABELS[c] for c in METRIC_COLUMNS)
             + " | drop per task (mean) |", "| --- | --- | ---: |" + " ---: |" * len(METRIC_COLUMNS) + " --- |"]
    for name, runs in groups.items():
        for row in runs[0]["metrics"]:
            cells = [spread([run["metrics"][row][c] for run in runs]) for c in METRIC_COLUMNS]
            drops = [statistics.fmean(d) for d in zip(*(task_drops(run["matrices"][row]) for run in runs))]
            lines.append(f"| {name} | {row} | {len(runs)} | " + " | ".join(cells) + " | "
                         + " ".join(f"{d:.1f}" for d in drops) + " |")
    return lines


def paired_rows(groups: dict[str, list[dict]], baseline: str) -> list[str]:
    base = groups[baseline]
    lines = [f"Difference to {baseline!r}, run by run (mean, range over the pairs):", "",
             "| runs | matrix row | pairs | " + " | ".join(METRIC_LABELS[c] for c in METRIC_COLUMNS) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(METRIC_COLUMNS)]
    for name, runs in groups.items():
        if name == baseline:
            continue
        if len(runs) != len(base):
            raise SystemExit(f"Group {name!r} has {len(runs)} runs and the baseline {len(base)}: pairing needs the "
                             "same seeds in the same order.")
        for row in runs[0]["metrics"]:
            cells = [spread([run["metrics"][row][c] - other["metrics"][row][c] for run, other in zip(runs, base)])
                     for c in METRIC_COLUMNS]
            lines.append(f"| {name} | {row} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def selection_rows(groups: dict[str, list[dict]]) -> list[str]:
    lines = []
    for name, runs in groups.items():
        for method in runs[0]["route_histogram"]:
            summaries = [selection_summary(run["route_histogram"][method], run["tasks"]) for run in runs]
            tasks = runs[0]["tasks"]
            if not lines:
                lines = ["Images identified as their own task after the last task (%, per image), and images of tasks "
                         "not learned yet sent to zero-shot (all stages):", "",
                         "| runs | " + " | ".join(tasks) + " | unseen to zero-shot |",
                         "| --- |" + " ---: |" * (len(tasks) + 1)]
            cells = [spread([s["correct"][task] for s in summaries]) for task in tasks]
            unseen = spread([s["unseen_sent_to_zero_shot"] for s in summaries])
            lines.append(f"| {name} ({method}) | " + " | ".join(cells) + f" | {unseen} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="NAME=FOLDER,FOLDER,... (one mini_mtil.py output_dir per seed)")
    parser.add_argument("--baseline", default=None, help="NAME of the group the others are compared with, per seed")
    args = parser.parse_args()
    groups = dict(load_group(spec) for spec in args.groups)
    if args.baseline is not None and args.baseline not in groups:
        raise SystemExit(f"--baseline {args.baseline!r} names no group; the groups are {list(groups)}.")
    sections = [metric_rows(groups)]
    if args.baseline is not None:
        sections.append(paired_rows(groups, args.baseline))
    selection = selection_rows(groups)
    if selection:
        sections.append(selection)
    print("\n\n".join("\n".join(section) for section in sections))


if __name__ == "__main__":
    main()
