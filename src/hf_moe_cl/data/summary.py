"""What a data source reports about one dataset before any image is read, and the error when it cannot serve it."""

from __future__ import annotations

from dataclasses import dataclass

from .labels import LabelMap


class SourceError(ValueError):
    """A data source cannot give what the official experiment needs; the message names the dataset and the fix."""


@dataclass(frozen=True)
class SourceSummary:
    """Sizes per role ("train", "test", or "all" before the random split) and the label mapping of a source."""

    source: str
    sizes: dict[str, int]
    label_map: LabelMap
