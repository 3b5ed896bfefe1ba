"""`ContinualResult`: the accuracy matrices of a continual run and what the method reported beside them; their
metrics as the reports and the model card print them (Markdown tables of Transfer / Average / Last / BWT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..metrics.mtil.mtil import summary
from ..tuners.moe_lora.card import markdown_text

Matrix = list[list[Optional[float]]]

# The matrices a run can fill, headline first: `protocol` (the paper's: the method picks one model per test batch),
# `per_image` (a decision per image), `oracle` (the true task id).
MATRIX_KINDS = ("protocol", "per_image", "oracle")
MATRIX_TITLES = {"protocol": "task-agnostic, one route per test batch", "per_image": "task-agnostic, route per image",
                 "oracle": "task-aware (true task ids)"}


@dataclass
class ContinualResult:
    """`matrices[kind][i][j]`: accuracy (%) on task j after training task i (None where it was not evaluated).

    `diagnostics` holds what only some methods produce, e.g. `route_histogram[kind][i][j]`: how many of task j's
    test images the method sent to [route -1 (zero-shot), task 0, task 1, ...] after task i.
    """

    task_names: list[str]
    matrices: dict[str, Matrix]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_matrix(self) -> Matrix:
        """The task-aware matrix (true task ids)."""
        return self.matrices["oracle"]

    @property
    def task_agnostic_matrix(self) -> Optional[Matrix]:
        """The per-image task-agnostic matrix, if the method classifies without task ids."""
        return self.matrices.get("per_image")

    @property
    def headline(self) -> str:
        """The matrix the headline numbers come from: `protocol` (the paper's) when the run has one, else `oracle`."""
        return "protocol" if self.matrices.get("protocol") else "oracle"

    @property
    def metrics(self) -> dict[str, float]:
        """Transfer / Average / Last of the headline matrix (`headline`: the paper's protocol when there is one),
        those its evaluated cells allow (as `all_results`: no Transfer for one task, none of a matrix with cells
        not evaluated but Last's row)."""
        found = summary(self.matrices[self.headline], self.task_names)
        return {name: found[name] for name in ("transfer", "average", "last") if name in found}

    def all_results(self) -> dict[str, Any]:
        """The final numbers as transformers' `all_results.json` holds them: `headline_matrix` (the matrix the
        headline comes from) and `<matrix>_<metric>` for Transfer / Average / Last / BWT of every matrix (those its
        evaluated cells allow), e.g. `protocol_last`."""
        results: dict[str, Any] = {"headline_matrix": self.headline}
        kinds = [k for k in MATRIX_KINDS if k in self.matrices] + [k for k in self.matrices if k not in MATRIX_KINDS]
        for kind in kinds:
            metrics = summary(self.matrices[kind], self.task_names)
            results.update({f"{kind}_{name}": value for name, value in metrics.items() if name != "drop"})
        return results


METRIC_LABELS = {"transfer": "Transfer", "average": "Average", "last": "Last", "bwt": "BWT"}
METRIC_COLUMNS = ("transfer", "average", "last", "bwt")
DROP_NOTE = ("Drop per task: accuracy right after training the task minus accuracy after the last task "
             "(positive: forgotten; BWT is minus their mean over all tasks but the last).")


def matrix_label(kind: str) -> str:
    """How every report names a matrix: `protocol matrix, task-agnostic, one route per test batch`."""
    return f"{kind} matrix, {MATRIX_TITLES[kind]}" if kind in MATRIX_TITLES else f"{kind} matrix"


def markdown_table(rows: dict[str, dict[str, float]], columns: Sequence[str] = ("transfer", "average", "last"),
                   first: str = "method") -> str:
    """One row per entry of `rows`: `| method | Transfer | Average | Last |` ("-" where a value is missing)."""
    header = f"| {first} | " + " | ".join(markdown_text(METRIC_LABELS.get(c, c)) for c in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    for name, values in rows.items():
        cells = [f"{values[c]:.1f}" if values.get(c) is not None else "-" for c in columns]
        lines.append(f"| {markdown_text(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_summary(names: Sequence[str], matrix) -> tuple[dict[str, float], Optional[dict]]:
    """Transfer / Average / Last, each where the cells it reads were evaluated (Transfer: two tasks or more), as
    `all_results` gives them, and the forgetting (`{"bwt", "drop"}`) if the diagonal and the last row were (two
    tasks or more); empty / None otherwise."""
    found = summary(matrix, names)  # every metric the evaluated cells allow
    metrics = {name: found[name] for name in ("transfer", "average", "last") if name in found}
    return metrics, ({"bwt": found["bwt"], "drop": found["drop"]} if "bwt" in found else None)


def metrics_markdown(rows: dict[str, tuple[dict, Optional[dict]]], names: Sequence[str], first: str) -> str:
    """Transfer / Average / Last / BWT per row of `rows` (`matrix_summary` pairs), then the drop per task."""
    metrics = {row: {**values, "bwt": lost["bwt"] if lost else None} for row, (values, lost) in rows.items()}
    text = markdown_table(metrics, METRIC_COLUMNS, first)
    drops = {row: lost["drop"] for row, (_, lost) in rows.items() if lost}
    if drops:
        text += "\n\n" + DROP_NOTE + "\n\n" + markdown_table(drops, names, first)
    return text
