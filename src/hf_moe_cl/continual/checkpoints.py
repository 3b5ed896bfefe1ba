"""Task checkpoints of a continual run: one folder per finished task, written atomically, tied to the run.

`output_dir/task-NN-name/` holds what the method saves, `trainer_state.json` and `continual_progress.json`; the
folder is filled under a temporary name and renamed into place, so a folder that exists is complete. Its progress
file records the run's identity (method, adapter, seed, learning rates, tasks, base model), the matrices so far and
whether the task's row of the matrices was evaluated; resuming refuses a folder written by another run.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from ..files import atomic_folder, is_temporary, read_json_file, write_json_atomic

PROGRESS_FILE = "continual_progress.json"
TASK_FOLDER = re.compile(r"task-(\d+)-(.+)")


def task_folder(output_dir: str | Path, index: int, name: str) -> Path:
    return Path(output_dir) / f"task-{index:02d}-{name}"


def jsonable(value: Any) -> Any:
    """`value` with sets sorted into lists, tuples as lists and dataclasses as dicts, for comparison as JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def differences(stored: Any, current: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as 'path: stored -> current' lines (at most a few per branch)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in list(stored) + [key for key in current if key not in stored]:
            found += differences(stored.get(key), current.get(key), f"{path}.{key}" if path else key)
        return found
    if isinstance(stored, list) and isinstance(current, list) and stored and current:
        found = [] if len(stored) == len(current) else [f"{path}: {len(stored)} items -> {len(current)} items"]
        for i, (a, b) in enumerate(zip(stored, current)):
            found += differences(a, b, f"{path}[{i}]")
        return found
    return [] if stored == current else [f"{path}: {_short(stored)} -> {_short(current)}"]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finished_folders(output_dir: str | Path) -> dict[int, Path]:
    """Task index -> folder for every task folder with a progress file under `output_dir`."""
    root = Path(output_dir)
    found = {}
    if root.is_dir():
        for path in root.iterdir():
            match = TASK_FOLDER.fullmatch(path.name)
            if match and (path / PROGRESS_FILE).is_file():
                found[int(match.group(1))] = path
    return found


def remove_temporary(output_dir: str | Path) -> None:
    """Delete what an interrupted atomic write left behind (hidden `.*.tmp-*` siblings)."""
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if is_temporary(path):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_progress(folder: Path) -> dict:
    progress = read_json_file(folder / PROGRESS_FILE)
    if not isinstance(progress, dict) or "finished_task" not in progress or "run" not in progress:
        raise ValueError(f"{folder / PROGRESS_FILE} is not a continual progress file of this version (no "
                         "`finished_task` / `run`). Use another output_dir, or overwrite_output_dir=True to start over.")
    return progress


def check_same_run(folder: Path, progress: dict, run: dict) -> None:
    """Refuse to resume from a checkpoint of another run, naming what differs."""
    changed = differences(progress["run"], run)
    if changed:
        listed = "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else "")
        raise ValueError(
            f"Cannot resume from {folder}: it was written by another run. What differs (checkpoint -> now): {listed}. "
            "Resume with the same settings, use another output_dir, or set overwrite_output_dir=True to start over."
        )


def save_task(folder: Path, write_model: Callable[[Path], None], progress: dict) -> None:
    """Write a task checkpoint atomically: the model files and the progress file appear together or not at all."""
    with atomic_folder(folder) as temporary:
        write_model(temporary)
        write_json_atomic(temporary / PROGRESS_FILE, progress)


def update_progress(folder: Path, progress: dict) -> None:
    write_json_atomic(folder / PROGRESS_FILE, progress)


def prune(output_dir: str | Path, keep: Optional[int]) -> None:
    """Keep only the `keep` latest task checkpoints (`save_total_limit`); resume needs just the last one."""
    if keep is None or keep < 1:
        return
    folders = finished_folders(output_dir)
    for index in sorted(folders)[:-keep]:
        shutil.rmtree(folders[index])
