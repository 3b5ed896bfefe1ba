"""The figures of a continual run, drawn with matplotlib: an accuracy matrix and a route-selection table as heatmaps.

Figures are `matplotlib.figure.Figure` objects on their own Agg canvas: nothing touches pyplot's global state or the
caller's backend, so drawing a report inside a notebook or a training job changes nothing for the user.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..continual.result import METRIC_LABELS, MATRIX_TITLES
from ..files import atomic_path

COLOUR_MAP = matplotlib.colormaps["viridis"].with_extremes(bad="whitesmoke")


def _cells(axes, values: np.ndarray, norm: Normalize, fontsize: float, boxed: Optional[np.ndarray] = None) -> None:
    """Each cell's value, in black or white to stay readable on its colour; `boxed` cells get a patch of their own
    colour behind the value, so hatching does not cross the digits."""
    colours = COLOUR_MAP(norm(np.nan_to_num(values)))
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            axes.text(j, i, "n/a", ha="center", va="center", fontsize=fontsize, color="dimgrey")
            continue
        red, green, blue, _ = colours[i, j]
        ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        box = dict(boxstyle="square,pad=0.2", facecolor=colours[i, j], edgecolor="none") \
            if boxed is not None and boxed[i, j] else None
        axes.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=fontsize, color=ink, bbox=box)


def _heatmap(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], ylabel: str, xlabel: str,
             colour_label: str, fontsize: float, boxed: Optional[np.ndarray] = None) -> tuple[Figure, Any]:
    """A figure of `values` (%) on a fixed 0-100 scale, each cell labelled (see `_cells`), and its axes."""
    width, height = max(5.5, 0.8 * len(columns) + 3.2), max(4.5, 0.62 * len(rows) + 2.9)
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    norm = Normalize(0.0, 100.0)
    image = axes.imshow(np.ma.masked_invalid(values), cmap=COLOUR_MAP, norm=norm)
    _cells(axes, values, norm, fontsize, boxed)
    axes.set_xticks(range(len(columns)), labels=columns, rotation=40, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(rows)), labels=rows)
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.tick_params(length=0)
    axes.spines[:].set_visible(False)
    figure.colorbar(image, ax=axes, label=colour_label, shrink=0.85)
    return figure, axes


def accuracy_heatmap(matrix: Sequence[Sequence[Optional[float]]], names: Sequence[str], method: str,
                     kind: str = "oracle", metrics: Optional[dict[str, float]] = None) -> Figure:
    """`A[i][j]` (%) as a heatmap on a fixed 0-100 scale, so figures of different runs and kinds compare by colour.
    Cells of tasks not trained yet (j > i) are hatched, cells never evaluated read "n/a"; the title names the method,
    the matrix kind and `metrics` (Transfer / Average / Last / BWT)."""
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix])
    unseen = np.triu(np.ones(values.shape, dtype=bool), k=1)
    figure, axes = _heatmap(values, names, names, "after training", "evaluated on", "accuracy (%)",
                            9 if len(names) <= 6 else 7, boxed=unseen)
    for i, j in zip(*np.nonzero(unseen)):
        axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor=(1, 1, 1, 0.45),
                                 linewidth=0.0))
    title = f"{method}: accuracy, {kind} matrix\n{MATRIX_TITLES.get(kind, kind)}"
    if metrics:
        title += "\n" + " · ".join(f"{METRIC_LABELS[name]} {value:.1f}" for name, value in metrics.items())
    figure.suptitle(title, fontsize=10)
    legend = [Patch(facecolor="white", edgecolor="grey", label="trained (j ≤ i)"),
              Patch(facecolor="white", edgecolor="grey", hatch="//", label="not trained yet (j > i)")]
    figure.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def selection_heatmap(counts: Sequence[Sequence[int]], names: Sequence[str], method: str, kind: str,
                      routes: Optional[Sequence[str]] = None, own: Optional[Sequence[int]] = None) -> Figure:
    """Where the method sent each task's test images after the last task, in % of the task's images (rows: images
    of a task; columns: zero-shot, then the routes, `routes` naming them: default the tasks). Each row's own route
    (`own`, default the task's place) is framed."""
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = 100.0 * counts / np.where(totals > 0, totals, 1.0)
    routes, own = ["zero-shot", *(routes or names)], list(own or range(len(names)))
    figure, axes = _heatmap(shares, names, routes, "images of", "sent to", "% of the task's test images",
                            9 if len(routes) <= 7 else 7)
    axes.axvline(0.5, color="white", linewidth=2.0)
    for j, route in enumerate(own):
        axes.add_patch(Rectangle((route + 0.5, j - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6,
                                 clip_on=False))
    correct = [shares[j, route + 1] for j, route in enumerate(own)]
    figure.suptitle(f"{method}: route selection after the last task, {kind} matrix\n"
                    f"{MATRIX_TITLES.get(kind, kind)}\nsent to their own task: {np.mean(correct):.1f} % on average "
                    "(framed)", fontsize=10)
    return figure


def save_png(figure: Figure, path, dpi: Optional[float] = None) -> None:
    """Write `figure` as a PNG, atomically (`dpi`: matplotlib's default when None)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
