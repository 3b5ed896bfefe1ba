"""Task checkpoints of a continual run: one folder per finished task, written atomically, tied to the run.

`output_dir/task-NN-name/` holds what the method saves, `trainer_state.json` and `continual_progress.json`; the
folder is filled under a temporary name and renamed into place, so a folder that exists is complete. Its progress
file records the run's identity (method, adapter, seed, learning rates, tasks, base model), the matrices so far and
whether the task's row of the matrices was evaluated; resuming refuses a folder written by another run.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..tuners.moe_lora.base_weights import base_weights_fingerprint
from ..files import (atomic_folder, check_file_hashes, file_hashes, is_temporary, read_json_file, temporary_sibling,
                     write_json_atomic)
from ..options import is_finite_number, short_repr

logger = logging.getLogger("hf_moe_cl")

PROGRESS_FILE = "continual_progress.json"
LOCK_FILE = ".run.lock"
# what a run writes at the root of output_dir: saved model or adapter, model card, results and report
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "condu_config.json", "model.safetensors",
               "config.json", "README.md", "all_results.json", "metrics.md")
TASK_FOLDER = re.compile(r"task-(\d+)-(.+)")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# What to do instead of resuming a folder of another run (`overwrite_output_dir` alone does not apply to a resume).
START_OVER = "or start over: run without resume=True and with overwrite_output_dir=True"


def is_plain_name(name: Any) -> bool:
    """A string usable as a file name on every platform and unable to leave its folder: letters, digits, `.`, `_`,
    `-`, at most 64 characters, starting with a letter or digit and not ending with a dot."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and not name.endswith(".")


def task_folder(output_dir: str | Path, index: int, name: str) -> Path:
    """`output_dir/task-NN-name`: the task's name when it is a plain file name (`is_plain_name`), else a slug of it
    and a hash of the whole name (`task-00-org-dataset-1a2b3c4d`), so no name can leave `output_dir` and the folder
    is the same at every resume."""
    if not is_plain_name(name):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")[:40]
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{slug}-{digest}" if slug else digest
    return Path(output_dir) / f"task-{index:02d}-{name}"


def jsonable(value: Any) -> Any:
    """`value` with sets sorted into lists, tuples as lists and dataclasses as dicts, for comparison as JSON."""
    if isinstance(value, enum.Enum):  # transformers' option enums (OptimizerNames, SchedulerType) as their values
        value = value.value
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
    return [] if stored == current else [f"{path}: {short_repr(stored)} -> {short_repr(current)}"]


def finished_folders(output_dir: str | Path) -> dict[int, Path]:
    """Task index -> folder for every task folder with a progress file under `output_dir`."""
    root = Path(output_dir)
    matches = [(TASK_FOLDER.fullmatch(path.name), path) for path in root.iterdir()] if root.is_dir() else []
    return {int(match.group(1)): path for match, path in matches if match and (path / PROGRESS_FILE).is_file()}


def remove_temporary(output_dir: str | Path) -> None:
    """Delete what an interrupted atomic write left behind (hidden `.*.tmp-*` siblings)."""
    root = Path(output_dir)
    for path in root.iterdir() if root.is_dir() else []:
        if is_temporary(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_progress(folder: Path) -> dict:
    """The progress file of a task folder, checked: a value that no run writes is named with its file."""
    path = folder / PROGRESS_FILE
    progress = read_json_file(path)
    if not isinstance(progress, dict) or "finished_task" not in progress or "run" not in progress:
        raise ValueError(f"{path} is not a continual progress file of this version (no "
                         f"`finished_task` / `run`). Use another output_dir, {START_OVER}.")
    problem = _progress_problem(progress, int(TASK_FOLDER.fullmatch(folder.name).group(1)))
    if problem:
        raise ValueError(f"{path}: {problem}; no run writes that (was it edited?). Delete {folder.name} to retrain "
                         f"from the task before it, use another output_dir, {START_OVER}.")
    return progress


def _progress_problem(progress: dict, index: int) -> Optional[str]:
    finished, names = progress["finished_task"], progress.get("task_names")
    if isinstance(finished, bool) or not isinstance(finished, int) or finished != index:
        return f"finished_task is {finished!r} but the folder is task {index}'s"
    if not isinstance(names, list) or len(names) <= finished or not all(isinstance(n, str) for n in names):
        return f"task_names {short_repr(names)} does not name task {finished}"
    if not isinstance(progress["run"], dict) or not isinstance(progress.get("evaluated"), bool):
        return "`run` must be an object and `evaluated` true or false"
    steps = progress.get("steps_done")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"steps_done is {steps!r}, not a step count"
    matrices, histograms = progress.get("matrices"), progress.get("route_histogram")
    if not isinstance(matrices, dict) or not isinstance(histograms, dict) or "oracle" not in matrices:
        return "`matrices` (with `oracle`) and `route_histogram` must be objects"
    rows = finished + int(progress["evaluated"])
    for kind, matrix in matrices.items():
        if not isinstance(matrix, list) or len(matrix) != rows:
            return f"matrices.{kind} must have {rows} row(s) after task {finished}, not {short_repr(matrix)}"
        for row in matrix:
            if not isinstance(row, list) or len(row) != len(names) or not all(
                    value is None or (is_finite_number(value) and 0 <= value <= 100) for value in row):
                return f"matrices.{kind} has the row {short_repr(row)}, not {len(names)} accuracies (0-100 or null)"
    return None


def run_identity(method, args, tasks, learning_rates: list[float]) -> dict:
    """What makes a checkpoint folder a run's (the method and its options, the base model and its weights, every
    training argument that changes numbers, the tasks): compared before resuming."""
    base, dtype = method.model.config, str(method.model.dtype).removeprefix("torch.")
    return jsonable({
        "method": method.fingerprint(),
        "base_model": {"name_or_path": getattr(base, "_name_or_path", None), "model_type": base.model_type,
                       "vision": [base.vision_config.hidden_size, base.vision_config.num_hidden_layers],
                       "text": [base.text_config.hidden_size, base.text_config.num_hidden_layers],
                       "projection_dim": base.projection_dim,
                       "weights": base_weights_fingerprint(method.model),
                       **({"dtype": dtype} if dtype != "float32" else {})},  # as recorded before 0.3 for float32
        "seed": args.seed, "max_steps": args.max_steps,
        "num_train_epochs": args.num_train_epochs if args.max_steps == -1 else None,
        "batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "warmup_steps": args.warmup_steps,
        "optimizer": {"optim": args.optim, "optim_args": args.optim_args, "adam_beta1": args.adam_beta1,
                      "adam_beta2": args.adam_beta2, "adam_epsilon": args.adam_epsilon},
        "max_grad_norm": args.max_grad_norm, "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "lr_scheduler_type": args.lr_scheduler_type, "weight_decay": args.weight_decay,
        "label_smoothing": args.label_smoothing_factor, "train_template": args.train_template,
        "train_augmentation": args.train_augmentation, "evaluate_all_tasks": args.evaluate_all_tasks,
        "task_agnostic_eval": args.task_agnostic_eval, "protocol_unit": args.protocol_unit,
        "eval_precision": "bf16" if args.bf16_full_eval else "fp16" if args.fp16_full_eval else "fp32",
        "learning_rates": learning_rates,
        # Trainer settings recorded when set (checkpoints of runs that leave them alone resume as before)
        **{name: getattr(args, name) for name in ("data_seed", "dataloader_drop_last", "lr_scheduler_kwargs", "tf32",
                                                  "full_determinism") if getattr(args, name) not in (None, False, {})},
        "tasks": [{"name": t.name, "classnames": t.classnames, "templates": t.templates} for t in tasks],
    })


def check_same_run(folder: Path, progress: dict, run: dict) -> list[str]:
    """Refuse to resume from a checkpoint of another run, naming what differs. The learning rates of the tasks not
    trained yet may change (e.g. lowered after a task diverged); those changes are returned as lines to log."""
    finished = progress["finished_task"]
    stored, current = dict(progress["run"]), dict(run)
    stored_rates, rates = stored.pop("learning_rates", None), current.pop("learning_rates", None)
    changed = differences(stored, current)
    later = []
    if isinstance(stored_rates, list) and isinstance(rates, list) and len(stored_rates) == len(rates):
        changed += differences(stored_rates[: finished + 1], rates[: finished + 1], "learning_rates")
        names = [task.get("name") for task in current.get("tasks", [{}] * len(rates))]
        later = [f"task {i + 1} ({names[i]}) is not trained yet: learning rate {stored_rates[i]:g} -> {rates[i]:g}"
                 for i in range(finished + 1, len(rates)) if stored_rates[i] != rates[i]]
    else:
        changed += differences(stored_rates, rates, "learning_rates")
    if changed:
        listed = "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else "")
        raise ValueError(
            f"Cannot resume from {folder}: it was written by another run. What differs (checkpoint -> now): {listed}. "
            "Resume with the same settings (only the learning rates of tasks not trained yet may change), use another "
            f"output_dir, {START_OVER}.")
    return later


def resume_point(output_dir, names: list[str], run: dict, resume: bool, overwrite: bool, main: bool
                 ) -> tuple[Optional[Path], Optional[dict]]:
    """The task checkpoint a run of the tasks `names` continues from (with its progress), or (None, None) to start
    at the first task. Without `resume`, existing checkpoints are refused unless `overwrite` (the main process
    then deletes them); a checkpoint of another task sequence or of another run (`run`, see `check_same_run`) is
    refused."""
    folders = finished_folders(output_dir)
    if folders and not resume:
        if not overwrite:
            raise ValueError(
                f"{output_dir} already holds task checkpoints ({', '.join(p.name for p in folders.values())}). "
                "Resume them with resume=True (--resume), write to another output_dir, or set "
                "overwrite_output_dir=True to replace them.")
        if main:
            for folder in folders.values():
                shutil.rmtree(folder)
        return None, None
    expected = {i: task_folder(output_dir, i, name) for i, name in enumerate(names)}
    strangers = [folder for i, folder in folders.items() if expected.get(i) != folder]
    if strangers:
        raise ValueError(f"Cannot resume in {output_dir}: {strangers[0].name} is not a task of this sequence "
                         f"{names}. Use another output_dir or the same task sequence.")
    if not folders:
        if resume:
            logger.warning("resume=True, but %s holds no finished task checkpoint: starting from the first task.",
                           output_dir)
        elif not overwrite:
            check_no_outputs(output_dir)
        return None, None
    last = folders[max(folders)]
    progress = read_progress(last)
    check_file_hashes(last, progress.get("file_sha256"), str(last / PROGRESS_FILE),
                      f"Delete {last} to train task {max(folders) + 1} again from the checkpoint before it (or from "
                      f"the start), then resume, {START_OVER}.")
    if progress["task_names"] != names:
        raise ValueError(f"Cannot resume from {last}: it belongs to the task sequence {progress['task_names']}, not "
                         f"{names}. Use the same tasks or another output_dir.")
    for line in check_same_run(last, progress, run):
        logger.warning("Resuming with a changed setting: %s.", line)
    return last, progress


def save_results(output_dir, split: str, metrics: dict, combined: bool = True) -> None:
    """`output_dir/<split>_results.json`, and the same merged into `all_results.json` (`combined`), as the Trainer's
    `save_metrics` writes them, atomically."""
    if not is_plain_name(split):  # it names a file in output_dir: "../x" would write outside
        raise ValueError(f"save_metrics: the split {short_repr(split)} names the file <split>_results.json in "
                         "output_dir, so it must be a plain file name (letters, digits, '.', '_', '-'; at most 64 "
                         "characters), e.g. 'all' or 'eval'.")
    output = Path(output_dir)
    write_json_atomic(output / f"{split}_results.json", metrics)
    if combined:
        merged = read_json_file(output / "all_results.json") if (output / "all_results.json").is_file() else {}
        write_json_atomic(output / "all_results.json", {**merged, **metrics})


def save_task(folder: Path, write_model: Callable[[Path], None], progress: dict) -> None:
    """Write a task checkpoint atomically: the model files and the progress file (with their sha256, checked at resume)
    appear together or not at all."""
    with atomic_folder(folder) as temporary:
        write_model(temporary)
        progress["file_sha256"] = file_hashes(temporary)
        write_json_atomic(temporary / PROGRESS_FILE, progress)


def prune(output_dir: str | Path, keep: Optional[int]) -> None:
    """Keep only the `keep` latest task checkpoints (`save_total_limit`, None: all); resume needs just the last one."""
    if keep is None:
        return
    folders = finished_folders(output_dir)
    for index in sorted(folders)[:-keep]:
        shutil.rmtree(folders[index])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _describe(holder: Any) -> str:
    if not isinstance(holder, dict):
        return "an unknown process (the lock file is unreadable)"
    return f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def check_no_outputs(output_dir: str | Path) -> None:
    """Refuse to start a new run in a folder that holds what a run writes at its root (another run's adapter or
    model, model card and results, or a user's files of those names): the new run would replace them."""
    found = [name for name in RUN_OUTPUTS if (Path(output_dir) / name).exists()]
    if found:
        raise ValueError(f"{output_dir} already holds {', '.join(found)}, as another run leaves them, and a new run "
                         "writes its own under these names. Write to a new output_dir, resume that run with "
                         "resume=True (--resume), or set overwrite_output_dir=True to replace them.")


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output_dir that is a file, or that lies inside a task checkpoint or inside another run's output_dir:
    that run replaces or prunes its task folders whole, and would delete this run's files with them."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"output_dir {output_dir} is a file, not a folder: give a folder path for the checkpoints "
                         "(or move the file away).")
    for folder in Path(output_dir).resolve().parents:
        if (folder / PROGRESS_FILE).is_file():
            what = "a task checkpoint of another run"
        elif (folder / LOCK_FILE).is_file() or finished_folders(folder):
            what = "the output_dir of another run"
        else:
            continue
        raise ValueError(f"output_dir {output_dir} lies inside {folder}, {what}: that run replaces and prunes its "
                         "task folders whole, which would delete this run's checkpoints. Choose an output_dir outside "
                         "it.")


@contextmanager
def run_lock(output_dir: str | Path) -> Iterator[Path]:
    """Hold `output_dir/.run.lock` while the block runs: a second run on the same folder is refused with the
    holder's pid, host and start time. A lock left by a process of this host that no longer exists (a killed run)
    is taken over, with a log line."""
    root = Path(output_dir)
    check_output_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    path, host = root / LOCK_FILE, socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    while True:
        staged = temporary_sibling(path)
        try:
            staged.write_text(json.dumps(mine))
            os.link(staged, path)  # atomic, with its content: fails if another run holds the lock
            break
        except FileExistsError:
            pass
        except FileNotFoundError:  # the staged file was cleared by the holder's start-up; try again
            continue
        finally:
            staged.unlink(missing_ok=True)
        try:
            holder = read_json_file(path)
        except FileNotFoundError:
            continue  # released meanwhile
        except ValueError:
            holder = None
        if isinstance(holder, dict) and holder.get("host") == host and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"]):
            logger.warning("Taking over %s: its run (%s) no longer exists.", path, _describe(holder))
            path.unlink(missing_ok=True)
            continue
        raise RuntimeError(
            f"{root} is in use by another run: {_describe(holder)} holds {path}. Two runs in one output_dir would "
            f"replace each other's checkpoints. Wait for it to finish or use another output_dir; if that run is gone "
            f"(e.g. killed on another machine), delete {path}.")
    try:
        yield path
    finally:
        try:
            if read_json_file(path) == mine:
                path.unlink()
        except (OSError, ValueError):
            pass
