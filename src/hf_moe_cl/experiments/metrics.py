"""Continual-learning metrics from an accuracy matrix, as ZSCL / MoE-Adapters report them, and forgetting.

`A[i][j]` is the accuracy on task j after training task i (rows: training stage, columns: evaluated task).
"""

from __future__ import annotations

import numbers
from typing import Sequence

# the one implementation: the `evaluate` metric module shipped in the package
from ..metrics.mtil.mtil import (average, backward_transfer, forgetting, last, mtil_metrics,  # noqa: F401
                                  summary, task_drops, transfer)
from ..options import short_repr


def class_incremental_metrics(step_accuracies: Sequence[float]) -> dict[str, float]:
    """CIL protocol: accuracy over all classes seen so far after each step; Avg is their mean, Last the final one.
    Accuracies are percentages in [0, 100], as in the MTIL matrix; a NumPy array or torch tensor of them is read
    as its list."""
    if hasattr(step_accuracies, "tolist"):  # numpy arrays and torch tensors: their numbers as Python floats
        step_accuracies = step_accuracies.tolist()
    if isinstance(step_accuracies, (str, bytes)) or not isinstance(step_accuracies, Sequence):
        raise ValueError(f"`step_accuracies` must be a list of accuracies (one per step), got "
                         f"{short_repr(step_accuracies)}.")
    if not step_accuracies:
        raise ValueError("Need the accuracy after at least one incremental step.")
    for step, value in enumerate(step_accuracies):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 100:  # NaN fails too
            raise ValueError(f"Accuracy after step {step} is {value!r}: accuracies are percentages in [0, 100] (scale "
                             "fractions by 100); every step needs one, not None or NaN.")
    return {"average": sum(step_accuracies) / len(step_accuracies), "last": step_accuracies[-1]}
