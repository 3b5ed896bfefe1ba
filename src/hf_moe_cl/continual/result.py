"""`ContinualResult`: the accuracy matrices of a continual run and what the method reported beside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..metrics.mtil.mtil import mtil_metrics, summary

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
        """Transfer / Average / Last of the headline matrix (`headline`: the paper's protocol when there is one)."""
        return mtil_metrics(self.matrices[self.headline])

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
