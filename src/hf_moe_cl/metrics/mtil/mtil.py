"""MTIL continual-learning metrics as an `evaluate` metric: Transfer, Average, Last (ZSCL / MoE-Adapters), backward
transfer and the drop of each task, from an accuracy matrix.

    import evaluate, hf_moe_cl.metrics
    mtil = evaluate.load(hf_moe_cl.metrics.MTIL)          # a local folder of the installed package: no Hub access
    mtil.compute(accuracies=[[80, 20], [70, 85]], task_names=["a", "b"])

Each example is one row of the matrix: `accuracies[i][j]` is the accuracy on task j after training task i. This file
is the implementation hf-moe-cl's reports use too (`hf_moe_cl.experiments.metrics` imports its functions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import datasets
import evaluate

_DESCRIPTION = """Transfer = mean over tasks j >= 2 of the mean of A[i][j] over the stages i < j (zero-shot ability on
tasks not trained yet); Average = mean over tasks of each column's mean; Last = mean of the last row; BWT (Lopez-Paz &
Ranzato, 2017) = mean over j < T of A[T][j] - A[j][j]; drop of task j = A[j][j] - A[T][j]. Column means first, as
ZSCL (Zheng et al., ICCV 2023) and MoE-Adapters (Yu et al., CVPR 2024) compute them."""

_KWARGS_DESCRIPTION = """
Args:
    accuracies: the rows of a square accuracy matrix, one per training stage: percentages in [0, 100], None for a
        cell not evaluated (NaN and values outside [0, 100] are refused).
    task_names: optional distinct names of the tasks, in order; the drops are then keyed by name.
Returns:
    transfer, average, last (present when the matrix has every cell they read; transfer needs two tasks), and,
    when the diagonal and the last row are known and there are two tasks or more, bwt and drop (one per task).
Example:
    >>> mtil = evaluate.load("path/to/hf_moe_cl/metrics/mtil")
    >>> mtil.compute(accuracies=[[80, 20, 30], [70, 85, 35], [60, 75, 90]])["bwt"]
    -15.0
"""

_CITATION = """@inproceedings{zheng2023zscl, title={Preventing Zero-Shot Transfer Degradation in Continual Learning
of Vision-Language Models}, author={Zheng, Zangwei and Ma, Mingyuan and Wang, Kai and Qin, Ziheng and Yue, Xiangyu
and You, Yang}, booktitle={ICCV}, year={2023}}"""


def _check_matrix(matrix: Sequence[Sequence[float]]) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) != tasks for row in matrix):
        zero_shot = tasks >= 2 and all(len(row) == tasks - 1 for row in matrix)  # a table that starts with it
        raise ValueError("The accuracy matrix must be square (one row per trained task, one column per task), got "
                         f"{tasks} row(s) of {sorted({len(row) for row in matrix})} value(s)" + (
                             ": drop the first row, the zero-shot accuracies before any training (Transfer reads "
                             "them from the cells above the diagonal)." if zero_shot else "."))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None and not 0 <= value <= 100:  # NaN fails every comparison
                raise ValueError(f"Accuracy A[{i}][{j}] is {value!r}: accuracies are percentages in [0, 100] (scale "
                                 "fractions by 100) and a cell not evaluated is None, not NaN.")
    return tasks


def _check_names(names: Sequence[str], tasks: int) -> None:
    if len(names) != tasks:
        raise ValueError(f"{len(names)} task names for a matrix of {tasks} tasks.")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"Task names {repeated} repeat: each task needs its own name (the drops are keyed by it).")


# The cells each metric reads, and how its refusal names them when some were not evaluated (None).
_CELLS = {"transfer": lambda tasks: [(i, j) for j in range(1, tasks) for i in range(j)],
          "average": lambda tasks: [(i, j) for i in range(tasks) for j in range(tasks)],
          "last": lambda tasks: [(tasks - 1, j) for j in range(tasks)],
          "forgetting": lambda tasks: [(j, j) for j in range(tasks)] + [(tasks - 1, j) for j in range(tasks)]}
_NEEDS = {"transfer": "Transfer needs every cell above the diagonal (each task before it trained)",
          "average": "Average needs every cell of the matrix", "last": "Last needs the last row of the matrix",
          "forgetting": "Forgetting needs the diagonal and the last row of the matrix"}


def _check_cells(matrix: Sequence[Sequence[Optional[float]]], metric: str) -> int:
    """The number of tasks, once every cell `metric` reads is known; else a ValueError naming the missing cells."""
    tasks = _check_matrix(matrix)
    missing = sorted({(i, j) for i, j in _CELLS[metric](tasks) if matrix[i][j] is None})
    if missing:
        raise ValueError(f"{_NEEDS[metric]}; cells {missing} were not evaluated (train with "
                         "evaluate_all_tasks=True).")
    return tasks


def transfer(matrix: Sequence[Sequence[float]]) -> float:
    """Zero-shot transfer: for each task j >= 2 (1-based), the mean of A[i][j] over the stages i before it."""
    tasks = _check_cells(matrix, "transfer")
    if tasks < 2:
        raise ValueError("Transfer needs at least two tasks.")
    columns = [sum(matrix[i][j] for i in range(j)) / j for j in range(1, tasks)]
    return sum(columns) / len(columns)


def average(matrix: Sequence[Sequence[float]]) -> float:
    """Average: the mean over tasks of each column's mean over all stages."""
    tasks = _check_cells(matrix, "average")
    return sum(sum(matrix[i][j] for i in range(tasks)) / tasks for j in range(tasks)) / tasks


def last(matrix: Sequence[Sequence[float]]) -> float:
    """Last: the mean accuracy over all tasks after the final stage."""
    tasks = _check_cells(matrix, "last")
    return sum(matrix[-1]) / tasks


def mtil_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    return {"transfer": transfer(matrix), "average": average(matrix), "last": last(matrix)}


def task_drops(matrix: Sequence[Sequence[Optional[float]]]) -> list[float]:
    """Per task j: A[j][j] - A[T-1][j], what the task lost between right after it trained and the end of the
    sequence (positive: forgotten; the last task's drop is 0 by definition)."""
    tasks = _check_cells(matrix, "forgetting")
    return [matrix[j][j] - matrix[-1][j] for j in range(tasks)]


def backward_transfer(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): the mean over tasks j < T of A[T-1][j] - A[j][j]; negative: forgetting."""
    drops = task_drops(matrix)
    if len(drops) < 2:
        raise ValueError("Backward transfer needs at least two tasks.")
    return sum(-drop for drop in drops[:-1]) / (len(drops) - 1)


def forgetting(matrix: Sequence[Sequence[Optional[float]]], names: Sequence[str]) -> dict:
    """`{"bwt": ..., "drop": {task name: drop}}` of a matrix, as reports and model cards write it."""
    _check_names(names, len(matrix))
    return {"bwt": backward_transfer(matrix), "drop": dict(zip(names, task_drops(matrix)))}


def _known(matrix, metric: str) -> bool:
    return all(matrix[i][j] is not None for i, j in _CELLS[metric](len(matrix)))


def summary(matrix: Sequence[Sequence[Optional[float]]], names: Optional[Sequence[str]] = None) -> dict:
    """Every metric the matrix's evaluated cells allow (see `_KWARGS_DESCRIPTION`)."""
    tasks = _check_matrix(matrix)
    if names is not None:
        _check_names(names, tasks)
    result = {}
    if tasks >= 2 and _known(matrix, "transfer"):
        result["transfer"] = transfer(matrix)
    if _known(matrix, "average"):
        result["average"] = average(matrix)
    if _known(matrix, "last"):
        result["last"] = last(matrix)
    if tasks >= 2 and _known(matrix, "forgetting"):
        result.update(forgetting(matrix, list(names) if names is not None else [str(j) for j in range(tasks)]))
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mtil(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracies": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://github.com/Thunderbeee/ZSCL", "https://github.com/JiazuoYu/MoE-Adapters4CL"])

    def _compute(self, accuracies, task_names=None):
        return summary([list(row) for row in accuracies], task_names)
