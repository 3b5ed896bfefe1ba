"""benchmarks/seed_summary.py: mean, range and paired differences over seeds against hand-computed numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_summary  # noqa: E402

TASKS = ["a", "b"]


def write_run(folder: Path, last_row: list[float], histogram=None) -> str:
    """A two-task run: zero-shot 10 / 20, the first task learned to 50 then kept at last_row[0]."""
    matrix = [[50.0, 20.0], last_row]
    metrics = {"m (oracle)": {"transfer": 20.0, "average": (50 + 20 + sum(last_row)) / 4,
                              "last": sum(last_row) / 2, "bwt": last_row[0] - 50.0}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "tasks": TASKS, "matrices": {"m (oracle)": matrix}, "metrics": metrics,
        "route_histogram": {} if histogram is None else {"m": histogram}}))
    return str(folder)


def test_groups_give_mean_range_and_pairs(tmp_path, capsys, monkeypatch):
    off = [write_run(tmp_path / f"off{i}", row) for i, row in enumerate([[48.0, 60.0], [46.0, 64.0]])]
    on = [write_run(tmp_path / f"on{i}", row) for i, row in enumerate([[49.0, 61.0], [46.0, 67.0]])]
    monkeypatch.setattr(sys, "argv", ["seed_summary", "off=" + ",".join(off), "on=" + ",".join(on),
                                      "--baseline", "off"])
    seed_summary.main()
    out = capsys.readouterr().out
    # Average = (50 + 20 + last row) / 4: 44.5 and 45; Last 54 and 55; on: Average 45 and 45.75, Last 55 and 56.5;
    # BWT off -2 and -4; drops of task a: 2 and 4 -> 3.0
    assert "| off | m (oracle) | 2 | 20.0 (20.0 to 20.0) | 44.8 (44.5 to 45.0) | 54.5 (54.0 to 55.0) | " \
           "-3.0 (-4.0 to -2.0) | 3.0 0.0 |" in out
    # paired: Last +1.0 and +1.5, BWT +1 and 0
    assert "| on | m (oracle) | 2 | 0.0 (0.0 to 0.0) | 0.6 (0.5 to 0.8) | 1.2 (1.0 to 1.5) | 0.5 (0.0 to 1.0) |" in out


def test_selection_shares_are_averaged_over_seeds(tmp_path, capsys, monkeypatch):
    # stage 0: task b unseen, 3 of its 4 images to zero-shot; after the last task a: 2/4 right, b: 4/4 right
    first = [[[1, 3, 0], [3, 1, 0]], [[1, 2, 1], [0, 0, 4]]]
    second = [[[0, 4, 0], [1, 3, 0]], [[0, 4, 0], [0, 1, 3]]]
    runs = [write_run(tmp_path / "r0", [48.0, 60.0], first), write_run(tmp_path / "r1", [48.0, 60.0], second)]
    monkeypatch.setattr(sys, "argv", ["seed_summary", "x=" + ",".join(runs)])
    seed_summary.main()
    out = capsys.readouterr().out
    assert "| x (m) | 75.0 (50.0 to 100.0) | 87.5 (75.0 to 100.0) | 50.0 (25.0 to 75.0) |" in out


@pytest.mark.parametrize("argv, message", [
    (["nameonly"], "A group is NAME=FOLDER"),
    (["x={missing}"], "has not finished"),
    (["x={one}", "--baseline", "y"], "--baseline 'y' names no group"),
    (["x={one}", "y={one},{one}", "--baseline", "x"], "pairing needs the same seeds"),
])
def test_bad_groups_are_named(tmp_path, monkeypatch, argv, message):
    one = write_run(tmp_path / "one", [48.0, 60.0])
    argv = [a.format(one=one, missing=tmp_path / "nothing") for a in argv]
    monkeypatch.setattr(sys, "argv", ["seed_summary", *argv])
    with pytest.raises(SystemExit, match=message):
        seed_summary.main()
