"""Mean and range over seeds of `benchmarks/long_sequence.py` runs: one output folder per seed.

    python benchmarks/long_sequence_seeds.py runs/long_sequence/seed0 runs/long_sequence/seed1 \\
        runs/long_sequence/seed2 [--at 30]

Reads each folder's `results.json` (written by `long_sequence.py`, `--report_only` rebuilds it) and prints, per
variant, at `--at` tasks: Last, Last / individual fine-tuning, BWT, the newest task and the last six new tasks
against their individual fine-tunes, as the mean over the seeds that measured the variant with the range (min-max).
A ratio to individual fine-tuning exists only where the seed's folder holds its own `individual` run: the number
of seeds behind each cell is given, never filled in from another seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = [("last", "Last", "{:.1f}"), ("last_over_individual", "Last / indiv. %", "{:.1f}"), ("bwt", "BWT", "{:.2f}"),
           ("newest_over_individual", "newest / indiv. %", "{:.1f}"),
           ("recent_over_individual", "last 6 new / indiv. %", "{:.1f}")]


def spread(values: list[float], form: str) -> str:
    """`mean (min to max) [n]`, or the single value with [1]."""
    if len(values) == 1:
        return f"{form.format(values[0])} [1]"
    mean, low, high = (form.format(v) for v in (statistics.fmean(values), min(values), max(values)))
    return f"{mean} ({low} to {high}) [{len(values)}]"


def load(folder: str, at: int) -> tuple[dict, dict[str, dict]]:
    """The run's arguments and, per variant, its row at `at` tasks."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run benchmarks/long_sequence.py with --output_dir {folder} first "
                         "(or --report_only there to rebuild it).")
    results = json.loads(path.read_text())
    return results["arguments"], {variant: rows[str(at)] for variant, rows in results["table"].items()
                                  if str(at) in rows}


def summary(folders: list[str], at: int) -> str:
    runs = [load(folder, at) for folder in folders]
    settings = {json.dumps({k: v for k, v in arguments.items()
                            if k not in ("seed", "variants", "output_dir", "report_only", "assets_dir")},
                           sort_keys=True) for arguments, _ in runs}
    if len(settings) != 1:
        raise SystemExit("The folders were measured with different settings (other than the seed): "
                         + " / ".join(sorted(settings)))
    seeds = [arguments["seed"] for arguments, _ in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"Two folders hold the same seed ({seeds}): give one folder per seed.")
    lines = [f"mini-long at {at} tasks, seeds {', '.join(map(str, seeds))}: mean (min to max) [seeds]", "",
             "| variant | " + " | ".join(label for _, label, _ in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    variants = list(dict.fromkeys(variant for _, rows in runs for variant in rows))
    for variant in variants:
        cells = []
        for key, _, form in COLUMNS:
            values = [rows[variant][key] for _, rows in runs if rows.get(variant, {}).get(key) is not None]
            cells.append(spread(values, form) if values else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="one long_sequence.py --output_dir per seed")
    parser.add_argument("--at", type=int, default=30, help="the number of tasks learned (one of --report_at)")
    args = parser.parse_args()
    print(summary(args.folders, args.at))


if __name__ == "__main__":
    main()
