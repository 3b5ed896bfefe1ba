"""Continual-learning metrics from an accuracy matrix, as ZSCL / MoE-Adapters report them, and forgetting.

`A[i][j]` is the accuracy on task j after training task i (rows: training stage, columns: evaluated task).
"""

from __future__ import annotations

from typing import Optional, Sequence


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


def task_drops(matrix: Sequence[Sequence[Optional[float]]]) -> list[float]:
    """Per task j: A[j][j] - A[T-1][j], what the task lost between right after it trained and the end of the
    sequence (positive: forgotten; the last task's drop is 0 by definition)."""
    tasks = _check_matrix(matrix)
    needed = [(j, j) for j in range(tasks)] + [(tasks - 1, j) for j in range(tasks)]
    missing = sorted({cell for cell in needed if matrix[cell[0]][cell[1]] is None})
    if missing:
        raise ValueError(f"Forgetting needs the diagonal and the last row of the matrix; cells {missing} were not "
                         "evaluated (train with evaluate_all_tasks=True).")
    return [matrix[j][j] - matrix[-1][j] for j in range(tasks)]


def backward_transfer(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): the mean over tasks j < T of A[T-1][j] - A[j][j]; negative: forgetting."""
    drops = task_drops(matrix)
    if len(drops) < 2:
        raise ValueError("Backward transfer needs at least two tasks.")
    return sum(-drop for drop in drops[:-1]) / (len(drops) - 1)


def forgetting(matrix: Sequence[Sequence[Optional[float]]], names: Sequence[str]) -> dict:
    """`{"bwt": ..., "drop": {task name: drop}}` of a matrix, as reports and model cards write it."""
    if len(names) != len(matrix):
        raise ValueError(f"{len(names)} task names for a matrix of {len(matrix)} tasks.")
    return {"bwt": backward_transfer(matrix), "drop": dict(zip(names, task_drops(matrix)))}


def class_incremental_metrics(step_accuracies: Sequence[float]) -> dict[str, float]:
    """CIL protocol: accuracy over all classes seen so far after each step; Avg is their mean, Last the final one."""
    if not step_accuracies:
        raise ValueError("Need the accuracy after at least one incremental step.")
    return {"average": sum(step_accuracies) / len(step_accuracies), "last": step_accuracies[-1]}
