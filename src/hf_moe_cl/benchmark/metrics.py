"""Continual-learning metrics from an accuracy matrix, as ZSCL / MoE-Adapters report them.

`A[i][j]` is the accuracy on task j after training task i (rows: training stage, columns: evaluated task).
"""

from __future__ import annotations

from typing import Sequence


def _check_matrix(matrix: Sequence[Sequence[float]]) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) != tasks for row in matrix):
        raise ValueError("The accuracy matrix must be square (one row per trained task, one column per task).")
    return tasks


def transfer(matrix: Sequence[Sequence[float]]) -> float:
    """Zero-shot transfer: for each task j >= 2 (1-based), the mean of A[i][j] over the stages i before it."""
    tasks = _check_matrix(matrix)
    if tasks < 2:
        raise ValueError("Transfer needs at least two tasks.")
    columns = [sum(matrix[i][j] for i in range(j)) / j for j in range(1, tasks)]
    return sum(columns) / len(columns)


def average(matrix: Sequence[Sequence[float]]) -> float:
    """Average: the mean over tasks of each column's mean over all stages."""
    tasks = _check_matrix(matrix)
    return sum(sum(matrix[i][j] for i in range(tasks)) / tasks for j in range(tasks)) / tasks


def last(matrix: Sequence[Sequence[float]]) -> float:
    """Last: the mean accuracy over all tasks after the final stage."""
    tasks = _check_matrix(matrix)
    return sum(matrix[-1]) / tasks


def mtil_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    return {"transfer": transfer(matrix), "average": average(matrix), "last": last(matrix)}


def class_incremental_metrics(step_accuracies: Sequence[float]) -> dict[str, float]:
    """CIL protocol: accuracy over all classes seen so far after each step; Avg is their mean, Last the final one."""
    if not step_accuracies:
        raise ValueError("Need the accuracy after at least one incremental step.")
    return {"average": sum(step_accuracies) / len(step_accuracies), "last": step_accuracies[-1]}
