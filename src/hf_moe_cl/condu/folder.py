"""ConDU's folder: the unified delta and the task triggers as safetensors + JSON, from a folder or a Hub repo.

    adapter_config.json, adapter_model.safetensors   LoRA fine-tuning: a peft LoRA adapter holding the unified
                                                     model's factors (origin + unified delta)
    condu_delta.safetensors                          full fine-tuning: the unified weight delta, by parameter name
    condu_config.json                                format, options, base-model fingerprint, tensor shapes and
                                                     per task: name, class names, templates, rescaler
    condu_triggers.safetensors                       bit-packed masks, prototype means, the LoRA origin factors

Nothing is pickled; every file is written to a staging folder and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
from peft import LoraConfig
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS
from safetensors.torch import load_file, save_file

from ..files import (FIX, atomic_files, check_file_hashes, check_safetensors_file, file_hashes, json_sha256,
                     read_json_file)
from ..options import check_task_record, is_finite_number, is_shape, short_repr
from .store import DeltaStore
from .unify import UNIFY_RULES

FORMAT, VERSION = "hf-moe-cl/condu", 1
CONFIG_FILE = "condu_config.json"
TRIGGERS_FILE = "condu_triggers.safetensors"
DELTA_FILE = "condu_delta.safetensors"
FILES = (CONFIG_FILE, TRIGGERS_FILE, DELTA_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
TASK_KEYS = ("name", "classnames", "templates", "rescaler", "prototypes")  # one entry of condu_config.json's tasks
PROTOTYPE_MEANS = ("image_mean", "text_mean")  # the per-class means a task's prototypes are made of


def model_fingerprint(model) -> dict:
    """What a ConDU folder must match: the architecture and the widths of the tensors it changes."""
    config = model.config
    return {"model_type": config.model_type, "vision_width": config.vision_config.hidden_size,
            "text_width": config.text_config.hidden_size, "vision_layers": config.vision_config.num_hidden_layers,
            "text_layers": config.text_config.num_hidden_layers, "projection_dim": config.projection_dim}


def save_folder(folder, store: DeltaStore, fingerprint: dict, header: dict, lora: Optional[LoraConfig] = None) -> None:
    """Write `store` under `folder` for the base model of `fingerprint`; `header` (the method's options) goes into
    condu_config.json; with `lora` the unified tensors are written as that peft adapter (LoRA fine-tuning), else as
    condu_delta.safetensors (full fine-tuning)."""
    triggers = {f"origin.{n}": v.contiguous() for n, v in store.origin.items()}
    for task, packed in enumerate(store.packed_masks):
        triggers.update({f"mask.{task}.{n}": p.contiguous() for n, p in packed.items()})
    for task, means in enumerate(store.prototypes):
        triggers.update({f"prototype.{task}.{kind}": p.contiguous().cpu() for kind, p in means.items()})
    unified = {n: v.contiguous() for n, v in store.unified_tensors.items()}
    tasks = [dict(info, rescaler=rescaler, prototypes=sorted(means))
             for info, rescaler, means in zip(store.tasks, store.rescalers, store.prototypes)]
    config = dict(header, format=FORMAT, version=VERSION, fine_tune="full" if lora is None else "lora",
                  model=fingerprint, rule=store.rule, tasks=tasks, shapes={n: list(s) for n, s in store.shapes.items()})
    problem = _header_problem(config)  # what load_folder would refuse is not written
    if problem:
        raise ValueError(f"Cannot save this ConDU store to {folder}: {problem}, so load_folder would refuse the save. "
                         "Save after ConDU finished a task (its end records the task's class names, templates and "
                         "prototypes), not a store filled by hand.")
    with atomic_files(folder) as staging:
        save_file(triggers, str(staging / TRIGGERS_FILE), metadata={"format": "pt"})
        save_file(unified, str(staging / _unified_file(config)), metadata={"format": "pt"})
        if lora is not None:
            lora.save_pretrained(str(staging))
        config["file_sha256"] = file_hashes(staging, [TRIGGERS_FILE, _unified_file(config)])
        config["tasks_sha256"] = json_sha256(tasks)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def resolve_folder(folder_or_repo_id, subfolder: Optional[str] = None, revision: Optional[str] = None,
                   token: Optional[str] = None) -> Path:
    """The local folder of a ConDU save: `folder_or_repo_id` itself, or its ConDU files downloaded from the Hub."""
    if Path(folder_or_repo_id).is_dir():
        return Path(folder_or_repo_id) / (subfolder or "")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        local = snapshot_download(str(folder_or_repo_id), revision=revision, token=token,
                                  allow_patterns=[prefix + name for name in FILES])
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise OSError(f"{folder_or_repo_id} is neither a local folder nor a reachable Hub repo with a ConDU save "
                      f"({type(error).__name__}: {error}).") from error
    return Path(local) / prefix


def holds_condu(folder_or_repo_id, subfolder: Optional[str] = None, revision: Optional[str] = None,
                token: Optional[str] = None) -> bool:
    """Whether a folder or Hub repo holds a ConDU save (its condu_config.json)."""
    return (resolve_folder(folder_or_repo_id, subfolder, revision, token) / CONFIG_FILE).is_file()


def read_header(folder: Path) -> dict:
    """condu_config.json of a ConDU folder, checked to be a format this version reads."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no ConDU save ({CONFIG_FILE} is missing); write one with "
                                "ConDU.save(folder).")
    header = read_json_file(path)
    if not isinstance(header, dict):
        raise ValueError(f"{path} should hold a JSON object (the ConDU save's header), not a "
                         f"{type(header).__name__}. {FIX}")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path} is not a ConDU save this version reads (format {header.get('format')!r}, version "
                         f"{header.get('version')!r}; expected {FORMAT!r}, {VERSION}).")
    problem = _header_problem(header)
    if problem:
        raise ValueError(f"{path} is damaged or was edited: {problem}. {FIX}")
    return header


def _header_problem(header: dict) -> Optional[str]:
    """What is wrong with a condu_config.json of the right format, or None. Every field the store is built from is
    checked here, with the checks a value given in code gets (class names and templates: `check_label_space`)."""
    missing = [key for key in ("fine_tune", "model", "rule", "tasks", "shapes") if key not in header]
    if missing:
        return f"it lacks {missing}"
    if header["fine_tune"] not in ("lora", "full"):
        return f"fine_tune is {header['fine_tune']!r}, not 'lora' or 'full'"
    if not isinstance(header["model"], dict) or not isinstance(header["rule"], str):
        return "`model` must be an object and `rule` a string"
    if header["rule"] not in UNIFY_RULES:
        return f"rule is {header['rule']!r}, not one of {UNIFY_RULES}"
    shapes = header["shapes"]
    if not isinstance(shapes, dict) or not shapes or not all(is_shape(s) for s in shapes.values()):
        return "`shapes` must map tensor names to lists of sizes"
    tasks = header["tasks"]
    if not isinstance(tasks, list) or not tasks:
        return "`tasks` must be a non-empty list"
    for t, task in enumerate(tasks):
        if not isinstance(task, dict) or not is_finite_number(task.get("rescaler")):
            return f"tasks[{t}] must be an object with a finite `rescaler`, got {short_repr(task)}"
        if sorted(task) != sorted(TASK_KEYS):
            return f"tasks[{t}] has the keys {sorted(task)}, not {sorted(TASK_KEYS)}"
        if task["rescaler"] < 0:
            return f"tasks[{t}].rescaler is {task['rescaler']!r}; a rescaler is a ratio of magnitudes, never negative"
        kinds = task["prototypes"]
        if not isinstance(kinds, list) or "image_mean" not in kinds or len(set(kinds)) != len(kinds) \
                or not set(kinds) <= set(PROTOTYPE_MEANS):
            return (f"tasks[{t}].prototypes must list 'image_mean' (votes use it) and may list 'text_mean', got "
                    f"{short_repr(kinds)}")
        try:
            check_task_record(task["name"], task["classnames"], task["templates"], f"tasks[{t}]", f"tasks[{t}].name")
        except ValueError as error:
            return str(error).rstrip(".")
    return None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the ConDU save is incomplete; save or download it again.")
    check_safetensors_file(path)
    return load_file(str(path))


def load_folder(folder, fingerprint: Optional[dict] = None) -> tuple[DeltaStore, dict]:
    """The store saved in `folder` and its header; a save made for another base model is refused."""
    folder = Path(folder)
    header = read_header(folder)
    if fingerprint is not None and header["model"] != fingerprint:
        raise ValueError(f"The ConDU save in {folder} was made for another model ({header['model']}), not this one "
                         f"({fingerprint}); load it on the base model it was trained from.")
    adapter = read_json_file(folder / ADAPTER_CONFIG) if (folder / ADAPTER_CONFIG).is_file() else {}
    if header.get("fine_tune") == "lora" and isinstance(adapter, dict) and adapter.get("peft_type") not in (
            None, "LORA"):
        raise ValueError(f"{folder} holds a {adapter['peft_type']} adapter saved over a ConDU save: its "
                         f"{CONFIG_FILE}, {TRIGGERS_FILE} are left from the earlier save. Delete them to load the "
                         "adapter, or save the ConDU to a folder of its own.")
    triggers = _tensors(folder / TRIGGERS_FILE)
    unified = _tensors(folder / _unified_file(header))
    check_file_hashes(folder, header.get("file_sha256"), str(folder / CONFIG_FILE), FIX)
    if header.get("tasks_sha256") not in (None, json_sha256(header["tasks"])):
        raise ValueError(f"{folder / CONFIG_FILE} was edited in `tasks`: their class names, templates and rescalers "
                         f"belong to the saved triggers (tasks_sha256 records them). {FIX}")
    shapes = {n: torch.Size(s) for n, s in header["shapes"].items()}
    tasks = header["tasks"]

    def tensor(source: dict, key: str, shape: Optional[torch.Size] = None, dtype=None) -> torch.Tensor:
        file = TRIGGERS_FILE if source is triggers else _unified_file(header)
        if key not in source:
            raise ValueError(f"The ConDU save in {folder} is incomplete: it lacks tensor {key!r} ({file}); save it "
                             "again.")
        value = source[key]
        if shape is not None and value.shape != shape:
            raise ValueError(f"The ConDU save in {folder} is inconsistent: {key!r} has shape "
                             f"{tuple(value.shape)} in {file}, {CONFIG_FILE} says {tuple(shape)}.")
        if dtype is not None and value.dtype != dtype:
            raise ValueError(f"The ConDU save in {folder} holds {key} of dtype {value.dtype} in {file}; a sign mask "
                             f"is stored as uint8 bytes, 8 elements each. {FIX}")
        if dtype is None and (not value.dtype.is_floating_point or not torch.isfinite(value).all()):
            raise ValueError(f"The ConDU save in {folder} holds {key} of dtype {value.dtype} with non-finite or "
                             f"non-float values. {FIX}")
        return value

    saved = sorted({key.split(".")[1] for key in triggers if key.startswith(("mask.", "prototype."))},
                   key=lambda task: (len(task), task))  # ids as read, in numeric order
    if saved != [str(t) for t in range(len(tasks))]:
        raise ValueError(f"The ConDU save in {folder} is inconsistent: {CONFIG_FILE} lists {len(tasks)} task(s) but "
                         f"{TRIGGERS_FILE} holds triggers of tasks [{', '.join(saved)}]. {FIX}")
    has_origin = header["fine_tune"] == "lora" or any(key.startswith("origin.") for key in triggers)  # always for LoRA
    store = DeltaStore(header["rule"], shapes,
                       {n: tensor(triggers, f"origin.{n}", s) for n, s in shapes.items()} if has_origin else None)
    store.unified_tensors = {n: tensor(unified, n, s) for n, s in shapes.items()}
    store.packed_masks = [{n: tensor(triggers, f"mask.{t}.{n}", torch.Size([(s.numel() + 7) // 8]), torch.uint8)
                           for n, s in shapes.items()} for t in range(len(tasks))]
    store.rescalers = [float(task["rescaler"]) for task in tasks]
    store.tasks = [{k: task[k] for k in ("name", "classnames", "templates")} for task in tasks]
    store.prototypes = [{kind: tensor(triggers, f"prototype.{t}.{kind}") for kind in task["prototypes"]}
                        for t, task in enumerate(tasks)]
    listed = {f"origin.{n}" for n in store.origin} | {f"mask.{t}.{n}" for t in range(len(tasks)) for n in shapes}
    listed |= {f"prototype.{t}.{kind}" for t, task in enumerate(tasks) for kind in task["prototypes"]}
    for file, extra in ((TRIGGERS_FILE, set(triggers) - listed), (_unified_file(header), set(unified) - set(shapes))):
        if extra:
            raise ValueError(f"The ConDU save in {folder} is inconsistent: {file} holds tensors {sorted(extra)[:5]} "
                             f"that {CONFIG_FILE} does not list. {FIX}")
    width = header["model"].get("projection_dim")
    for t, (task, means) in enumerate(zip(tasks, store.prototypes)):
        for kind, value in means.items():
            classes = len(task["classnames"])
            if value.dim() != 2 or value.shape[0] != classes or (width is not None and value.shape[1] != width):
                raise ValueError(f"The ConDU save in {folder} is inconsistent: prototype.{t}.{kind} has shape "
                                 f"{tuple(value.shape)}, not ({classes}, {width}) (one row per class of task {t}, the "
                                 f"model's width). {FIX}")
    return store, header


def _unified_file(header: dict) -> str:  # the file of the unified tensors
    return ADAPTER_WEIGHTS if header["fine_tune"] == "lora" else DELTA_FILE
