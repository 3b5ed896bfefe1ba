"""Reports of a finished run, for people to read: per matrix kind the accuracy matrix (JSON with its metrics and
forgetting, CSV, a Markdown table, a heatmap PNG), where the method sent images without a task id (JSON and a
figure), and one `metrics.md` over all kinds. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import numbers
from pathlib import Path
from typing import Optional, Sequence

from ..continual.result import (METRIC_COLUMNS, METRIC_LABELS, MATRIX_KINDS, MATRIX_TITLES,  # noqa: F401 (names
                                ContinualResult, markdown_table, markdown_text, matrix_label,  # the reports had)
                                matrix_summary, metrics_markdown)
from ..files import write_json_atomic, write_text_atomic
from .figures import accuracy_heatmap, save_png, selection_heatmap


def selection_summary(stages: Sequence[Sequence[Sequence[int]]], names: Sequence[str],
                      routes: Optional[Sequence[str]] = None, own: Optional[Sequence[int]] = None) -> dict:
    """From `route_histogram[kind]` (stage x task x [zero-shot, route 0, ...]): the counts after the last task, each
    task's share sent to its own route, and the share of not-yet-learned tasks' images sent to zero-shot. `routes`
    names the routes and `own` gives each task's (default: the tasks, in order; a model with more routers than the
    run's tasks, or a continued one, has others: the run's diagnostics `route_names` and `task_routes`)."""
    routes, own = list(routes or names), list(own or range(len(names)))
    last = [list(counts) for counts in stages[-1]]
    if len(routes) + 1 != len(last[0]) or len(own) != len(names):
        raise ValueError(f"The route histogram has {len(last[0]) - 1} routes besides zero-shot, but {len(routes)} "
                         f"route names and {len(own)} task routes were given for {len(names)} tasks: pass the run's "
                         "diagnostics['route_names'] and ['task_routes'].")
    correct = {name: 100.0 * counts[route + 1] / max(1, sum(counts)) for name, counts, route in zip(names, last, own)}
    unseen = [stages[i][j] for i in range(len(stages)) for j in range(i + 1, len(names))]
    total = sum(sum(counts) for counts in unseen)
    return {"routes": ["zero-shot", *routes], "own_routes": own, "counts_after_last_task": last, "correct": correct,
            "unseen_sent_to_zero_shot": 100.0 * sum(c[0] for c in unseen) / total if total else None,
            "route_histogram": [[list(c) for c in stage] for stage in stages]}


def selection_measured(stages: Optional[Sequence]) -> bool:
    """Whether a route histogram has every cell (with `evaluate_all_tasks=False` a stage measures only the task just
    trained, so the route selection after the last task is not known for the others)."""
    return bool(stages) and all(counts is not None for stage in stages for counts in stage)


SELECTION_FILES = ("route_selection.json", "route_selection.png")
REPORT_FILES = ("accuracy_matrix.json", "accuracy_matrix.csv", "accuracy_matrix.png", "metrics.md", *SELECTION_FILES)


def remove_files(folder: Path, names: Sequence[str]) -> None:
    """Delete the report files `names` an earlier report left in `folder` (e.g. a run replaced with
    overwrite_output_dir), and `folder` itself if that empties it; other files stay."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


UNMEASURED_SELECTION = ("Route selection: not reported, since evaluate_all_tasks=False measured each stage on the "
                        "task just trained only.")


def selection_table(summary: dict, names: Sequence[str]) -> str:
    """Rows: images of a task; columns: where they were sent (% of the task's test images), then the correct share."""
    lines = ["| images of | " + " | ".join(map(markdown_text, summary["routes"])) + " | correct |",
             "| --- |" + " ---: |" * (len(summary["routes"]) + 1)]
    for name, counts in zip(names, summary["counts_after_last_task"]):
        shares = [100.0 * c / max(1, sum(counts)) for c in counts]
        lines.append(f"| {markdown_text(name)} | " + " | ".join(f"{s:.1f}" for s in shares)
                     + f" | {summary['correct'][name]:.1f} |")
    if summary["unseen_sent_to_zero_shot"] is not None:
        lines += ["", f"Images of tasks not yet learned sent to zero-shot CLIP (all stages): "
                      f"{summary['unseen_sent_to_zero_shot']:.1f} %"]
    return "\n".join(lines)


def write_report(output_dir: str | Path, method: str, names: Sequence[str], matrix, kind: str = "oracle",
                 route_histogram: Optional[Sequence] = None, routes: Optional[Sequence[str]] = None,
                 own: Optional[Sequence[int]] = None) -> dict[str, float]:
    """One matrix into `output_dir`: accuracy_matrix.{json,csv,png} and metrics.md (Transfer / Average / Last /
    BWT and the drop per task), plus route_selection.{json,png} when `route_histogram` (stage x task x route
    counts) is given. Returns Transfer / Average / Last (those whose cells were evaluated)."""
    output_dir = Path(output_dir)
    names = list(names)
    # plain floats (None where not evaluated), so a NumPy matrix or NumPy numbers are written as JSON too
    matrix = [[float(v) if isinstance(v, numbers.Real) else v for v in row] for row in matrix]
    metrics, lost = matrix_summary(names, matrix)
    record = {"method": method, "kind": kind, "tasks": names, "accuracy_matrix": matrix, "metrics": metrics,
              "forgetting": lost}
    write_json_atomic(output_dir / "accuracy_matrix.json", record)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["after \\ on"] + names)
    writer.writerows([name] + ["" if v is None else f"{v:.2f}" for v in row] for name, row in zip(names, matrix))
    write_text_atomic(output_dir / "accuracy_matrix.csv", table.getvalue())
    text = (f"# {markdown_text(method)}: {matrix_label(kind)}\n\n"
            + metrics_markdown({method: (metrics, lost)}, names, "method"))
    figure_metrics = {**metrics, **({"bwt": lost["bwt"]} if lost else {})}
    save_png(accuracy_heatmap(matrix, names, method, kind, figure_metrics), output_dir / "accuracy_matrix.png")
    if not (route_histogram and selection_measured(route_histogram)):  # no earlier report's figure left beside it
        remove_files(output_dir, SELECTION_FILES)
    if route_histogram and not selection_measured(route_histogram):
        text += "\n\n" + UNMEASURED_SELECTION
    elif route_histogram:
        summary = selection_summary(route_histogram, names, routes, own)
        write_json_atomic(output_dir / "route_selection.json",
                          {"method": method, "kind": kind, "tasks": names, **summary})
        save_png(selection_heatmap(summary["counts_after_last_task"], names, method, kind, summary["routes"][1:],
                                   summary["own_routes"]),
                 output_dir / "route_selection.png")
        text += "\n\n## Route selection after the last task\n\n" + selection_table(summary, names)
    write_text_atomic(output_dir / "metrics.md", text + "\n")
    return metrics


def write_result_report(output_dir: str | Path, result: ContinualResult, method: str) -> dict[str, dict[str, float]]:
    """Every matrix of `result` into `output_dir/<kind>/` (see `write_report`; kinds with route histograms also get
    route_selection.{json,png}), and `output_dir/metrics.md` listing all kinds, protocol first, then per_image,
    then oracle; the report folder of a kind `result` lacks, left by an earlier run in `output_dir`, is removed.
    Returns, per kind, Transfer / Average / Last / BWT (those that could be computed)."""
    output_dir = Path(output_dir)
    names = list(result.task_names)
    kinds = [kind for kind in MATRIX_KINDS if kind in result.matrices]
    kinds += [kind for kind in result.matrices if kind not in kinds]
    for kind in set(MATRIX_KINDS) - set(kinds):
        remove_files(output_dir / kind, REPORT_FILES)
    histograms = result.diagnostics.get("route_histogram", {})
    routes, own = result.diagnostics.get("route_names"), result.diagnostics.get("task_routes")
    rows, returned, sections = {}, {}, []
    for kind in kinds:
        write_report(output_dir / kind, method, names, result.matrices[kind], kind, histograms.get(kind), routes, own)
        metrics, lost = matrix_summary(names, result.matrices[kind])
        rows[f"{kind}: {MATRIX_TITLES.get(kind, kind)}"] = (metrics, lost)
        returned[kind] = {**metrics, **({"bwt": lost["bwt"]} if lost else {})}
        sections.append(f"![{kind}]({kind}/accuracy_matrix.png)")
        if histograms.get(kind) and not selection_measured(histograms[kind]):
            sections.append(f"### {kind}\n\n{UNMEASURED_SELECTION}")
        elif histograms.get(kind):
            sections.append(f"### Route selection after the last task, {kind}\n\n"
                            + selection_table(selection_summary(histograms[kind], names, routes, own), names)
                            + f"\n\n![{kind} route selection]({kind}/route_selection.png)")
    headline = f"Headline numbers: the {matrix_label(result.headline)}" + (
        " (the paper's protocol)." if result.headline == "protocol" else "; this run has no protocol matrix.")
    text = (f"# {markdown_text(method)} on {len(names)} tasks: {markdown_text(', '.join(names))}\n\n"
            f"{headline}\n\n"
            + metrics_markdown(rows, names, "matrix")
            + "\n\n## Figures and route selection\n\n" + "\n\n".join(sections) + "\n")
    write_text_atomic(output_dir / "metrics.md", text)
    return returned
