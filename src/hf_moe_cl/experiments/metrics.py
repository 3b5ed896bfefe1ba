"""Continual-learning metrics from an accuracy matrix, as ZSCL / MoE-Adapters report them, and forgetting.

`A[i][j]` is the accuracy on task j after training task i (rows: training stage, columns: evaluated task).
"""

from __future__ import annotations

from typing import Sequence

# the one implementation: the `evaluate` metric module shipped in the package
from ..metrics.mtil.mtil import (average, backward_transfer, forgetting, last, mtil_metrics,  # noqa: F401
                                  summary, task_drops, transfer)


def class_incremental_metrics(step_accuracies: Sequence[float]) -> dict[str, float]:
    """CIL protocol: accuracy over all classes seen so far after each step; Avg is their mean, Last the final one."""
    if not step_accuracies:
        raise ValueError("Need the accuracy after at least one incremental step.")
    return {"average": sum(step_accuracies) / len(step_accuracies), "last": step_accuracies[-1]}
