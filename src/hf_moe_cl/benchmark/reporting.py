"""Writes a finished run: the accuracy matrix as JSON and CSV, a Markdown metrics table and a heatmap PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from .metrics import mtil_metrics


def markdown_table(rows: dict[str, dict[str, float]], columns: Sequence[str] = ("transfer", "average", "last")) -> str:
    """One row per method: `| method | Transfer | Average | Last |`."""
    header = "| method | " + " | ".join(c.capitalize() for c in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * len(columns)]
    for method, values in rows.items():
        cells = [f"{values[c]:.1f}" if values.get(c) is not None else "-" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _colour(value: float) -> tuple[int, int, int]:
    """White (0 %) to dark blue (100 %)."""
    t = max(0.0, min(1.0, value / 100.0))
    return int(247 - 239 * t), int(251 - 203 * t), int(255 - 148 * t)


def heatmap_png(matrix: Sequence[Sequence[Optional[float]]], names: Sequence[str], path: Path, cell: int = 56) -> None:
    """The matrix as a labelled heatmap: rows = after training task i, columns = evaluated task j."""
    label_width, label_height = 8 * max(len(n) for n in names) + 16, 8 * max(len(n) for n in names) + 16
    size = (label_width + cell * len(names) + 8, label_height + cell * len(names) + 8)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for j, name in enumerate(names):
        text = Image.new("RGB", (label_height - 6, 14), "white")
        ImageDraw.Draw(text).text((2, 1), name, fill="black")
        image.paste(text.rotate(90, expand=True), (label_width + j * cell + cell // 2 - 7, 0))
    for i, row in enumerate(matrix):
        draw.text((4, label_height + i * cell + cell // 2 - 5), names[i], fill="black")
        for j, value in enumerate(row):
            box = (label_width + j * cell, label_height + i * cell)
            fill = _colour(value) if value is not None else (230, 230, 230)
            draw.rectangle([box, (box[0] + cell - 1, box[1] + cell - 1)], fill=fill, outline="white")
            if value is not None:
                ink = "white" if value > 55 else "black"
                draw.text((box[0] + cell // 2 - 12, box[1] + cell // 2 - 5), f"{value:.1f}", fill=ink)
    image.save(path)


def write_report(output_dir: str | Path, method: str, names: Sequence[str], matrix) -> dict[str, float]:
    """Save accuracy_matrix.{json,csv}, metrics.md and accuracy_matrix.png; return the metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    complete = all(value is not None for row in matrix for value in row)
    metrics = mtil_metrics(matrix) if complete and len(names) > 1 else {}
    (output_dir / "accuracy_matrix.json").write_text(
        json.dumps({"method": method, "tasks": list(names), "accuracy_matrix": matrix, "metrics": metrics}, indent=1)
    )
    with open(output_dir / "accuracy_matrix.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["after \\ on"] + list(names))
        for name, row in zip(names, matrix):
            writer.writerow([name] + ["" if v is None else f"{v:.2f}" for v in row])
    table = markdown_table({method: metrics}) if metrics else ""
    (output_dir / "metrics.md").write_text(table + "\n")
    heatmap_png(matrix, names, output_dir / "accuracy_matrix.png")
    return metrics
