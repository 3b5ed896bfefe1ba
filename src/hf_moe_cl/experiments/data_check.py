"""`check_data`: before a long run, verify everything it downloads: every dataset of a preset from split metadata and
label names alone (parquet footers, annotation files, folder listings; no image is read), and the CLIP weights, the
DDAS reference images and the AlexNet weights (local copy, cache, or reachable source). Reported as two tables.

Offline it fails in seconds: each host is asked once (one HEAD request, a short timeout, no retry), HF_HUB_OFFLINE is
honoured, the caches are looked at first, and nothing on an unreachable host is asked for."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union
from urllib.parse import urlsplit

import datasets
import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.file_download import repo_folder_name

from ..assets import MINI_MTIL, assets_dir as resolve_assets
from ..data.labels import LabelMappingError
from ..data.sources import summarize
from ..data.summary import SourceError
from ..tuners.moe_lora.card import hub_id
from .datasets import CIL_DATASETS, MTIL_DATASETS, DatasetSpec, HubSource, hub_source
from .mini_hub import MINI_HUB_DATASETS, MINI_TEST_IMAGES, MINI_TRAIN_IMAGES
from .presets import ClassIncrementalPreset, check_task_names, get_preset, mini_long_tasks, mini_mtil_tasks

COLUMNS = ("dataset", "source", "split", "train", "test", "classes", "first classes", "labels")
DOWNLOAD_COLUMNS = ("item", "source", "status")


@dataclass
class DataCheck:
    """One row per dataset (keys: COLUMNS) and the problems found; `markdown()` renders the table."""

    preset: str
    rows: list[dict[str, str]] = field(default_factory=list)
    downloads: list[dict[str, str]] = field(default_factory=list)  # keys: DOWNLOAD_COLUMNS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def markdown(self) -> str:
        lines = [f"Data check of preset {self.preset!r}"]
        for columns, rows in [(COLUMNS, self.rows)] + ([(DOWNLOAD_COLUMNS, self.downloads)] if self.downloads else []):
            lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(row.get(column, "") for column in columns) + " |" for row in rows]
        lines += [""] + [f"- {problem}" for problem in self.problems]
        return "\n".join(lines).rstrip() + "\n"

    __str__ = markdown


class DataCheckError(ValueError):
    """Something the run downloads is missing, or a dataset of the preset cannot be used as the official experiment
    needs; `.check` holds the tables."""

    def __init__(self, check: DataCheck):
        super().__init__(f"{len(check.problems)} problem(s) in preset {check.preset!r}; each names its fix.\n\n"
                         + check.markdown())
        self.check = check


@dataclass
class _Network:
    """Whether the hosts a run downloads from answer: one HEAD request per host per check, `timeout` seconds and no
    retry, so that an offline machine fails in seconds."""

    timeout: float = 5.0  # seconds one host has to answer
    _reasons: dict[str, Optional[str]] = field(default_factory=dict)

    def unreachable(self, url: str) -> Optional[str]:
        """None when the host of `url` answers (with any HTTP status), else why not."""
        parts = urlsplit(url)
        host = f"{parts.scheme}://{parts.netloc}"
        if host not in self._reasons:
            self._reasons[host] = None
            try:
                urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=self.timeout).close()
            except urllib.error.HTTPError:
                pass  # it answered
            except (OSError, ValueError) as error:
                self._reasons[host] = f"{host} is unreachable ({getattr(error, 'reason', error)})"
        return self._reasons[host]

    def hub(self) -> Optional[str]:
        """None when the Hugging Face Hub can be asked, else why not."""
        if hf_constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set"
        return self.unreachable(hf_constants.ENDPOINT)


def _hub_item(item: str, repo_id: str, repo_type: str, local_fix: str, network: _Network) -> tuple[str, Optional[str]]:
    """Status of a Hub model (config and weights) or dataset (its files, or datasets' prepared copy) a run downloads,
    and the problem with its fix (None when it can be had)."""
    if repo_type == "model":
        weights = [try_to_load_from_cache(repo_id, name) for name in ("model.safetensors", "pytorch_model.bin")]
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str) and any(
            isinstance(path, str) for path in weights)
    else:
        snapshots = Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset")
        cached = any(path.is_file() for path in (snapshots / "snapshots").rglob("*")) or (
            Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    if cached:
        return "in the Hugging Face cache", None
    command = f"`hf download {repo_id}" + (" --repo-type dataset`" if repo_type == "dataset" else "`")
    fix = (f"Fix: run {command} where there is network (same HF_HOME) and set HF_HUB_OFFLINE=1 here, or "
           f"{local_fix}.")
    reason = network.hub()
    if reason is not None:
        return "MISSING", f"{item} ({repo_id}): not in the Hugging Face cache and {reason}. {fix}"
    info = HfApi().model_info if repo_type == "model" else HfApi().dataset_info
    try:
        info(repo_id, timeout=network.timeout)
    except Exception as error:  # a wrong id, a private repo, a timeout: the same advice
        return "MISSING", f"{item} ({repo_id}): the Hub cannot give it ({type(error).__name__}). Check the id; {fix}"
    return "on the Hub (downloaded by the run)", None


def _model_item(model: str, network: _Network) -> tuple[str, Optional[str]]:
    folder = Path(model)
    if not folder.is_dir() and hub_id(model) is None:
        return "MISSING", (f"CLIP weights ({model}): no such folder, and not a Hub id. Fix: give --model_name_or_path "
                           "an existing folder written by `save_pretrained`, or a Hub id (namespace/name).")
    if not folder.is_dir():
        return _hub_item("CLIP weights", model, "model", "give --model_name_or_path a local folder", network)
    if (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
        return "local folder", None
    return "MISSING", (f"CLIP weights ({model}): the folder has no config.json and weights. Fix: give "
                       "--model_name_or_path a folder written by `save_pretrained`, or a Hub id.")


def _reference_item(reference: str, network: _Network) -> tuple[str, Optional[str]]:
    folder = Path(reference)
    if not folder.is_dir() and hub_id(reference) is None:
        return "MISSING", (f"DDAS reference images ({reference}): no such folder, and not a Hub id. Fix: give "
                           "--ddas_reference an existing folder written by `save_to_disk`, or a Hub dataset id.")
    if not folder.is_dir():
        return _hub_item("DDAS reference images", reference, "dataset",
                         "give --ddas_reference a folder written by `save_to_disk`", network)
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(path.name for path in folder.iterdir() if (path / "state.json").is_file()) or ["train"]
        return "MISSING", (f"DDAS reference images ({reference}): the folder holds splits ({', '.join(splits)}). "
                           f"Fix: give --ddas_reference the folder of one split, e.g. {folder / splits[0]}.")
    if (folder / "state.json").is_file():
        return "local saved dataset", None
    return "MISSING", (f"DDAS reference images ({reference}): the folder was not written by `save_to_disk`. Fix: "
                       "save the reference dataset with `save_to_disk`, or give a Hub dataset id.")


def _alexnet_item(weights: str, network: _Network) -> tuple[str, Optional[str]]:
    if not weights.startswith(("http://", "https://")):
        if Path(weights).is_file():
            return "local file", None
        return "MISSING", (f"AlexNet weights ({weights}): no such file. Fix: give --ddas_alexnet_weights "
                           "torchvision's AlexNet state dict (a file or its URL).")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(weights).path)
    if cached.is_file():
        return "in torch's hub cache", None
    reason = network.unreachable(weights)
    if reason is not None:
        return "MISSING", (f"AlexNet weights ({weights}): not in torch's hub cache and {reason}. Fix: download it "
                           f"to {cached} (e.g. `curl -L -o {cached} {weights}`), or give --ddas_alexnet_weights a "
                           "local file.")
    return f"downloadable (into {cached} at the first DDAS step)", None


def _size(count: int, official: Optional[int], cap: Optional[int]) -> str:
    if cap is not None and count > cap:
        return f"{cap:,} of {count:,}"
    return f"{count:,}" if official in (None, count) else f"{count:,} (official {official:,})"


def _dataset_row(spec, data_dir, hub, cache_dir, network: _Network, caps=(None, None)) -> dict[str, str]:
    source = None if data_dir is not None else hub_source(spec, hub)
    repo = (source or spec.hub).repo_id
    if data_dir is None and not Path(repo).is_dir() and not hf_constants.HF_HUB_OFFLINE:
        reason = network.hub()  # offline mode reads the cache; an unreachable Hub is not asked
        if reason is not None:
            raise SourceError(f"{spec.name}: the Hub copy {repo} cannot be read: {reason}. Fix: connect, set "
                              "HF_HUB_OFFLINE=1 if it is in the Hugging Face cache, or use the torchvision folders "
                              "(--data_dir).")
    summary = summarize(spec, data_dir=data_dir, hub=source, cache_dir=cache_dir)  # the copy read: summary.source
    if spec.split_rule is not None:
        fraction, seed = spec.split_rule
        whole = summary.sizes["all"]
        train, test = int(fraction * whole), whole - int(fraction * whole)
        split = f"{fraction:.0%} / {1 - fraction:.0%} of all {whole:,}, seed {seed}"
    else:
        train, test = summary.sizes["train"], summary.sizes["test"]
        roles = (source or spec.hub).splits
        hub_split = f"{'+'.join(roles['train'])} / {'+'.join(roles['test'])}"
        official = f"{spec.train_split} / {spec.test_split}" if isinstance(spec, DatasetSpec) else None
        split = official + (f" (Hub: {hub_split})" if data_dir is None else "") if official else hub_split
    mapped = [index for index in summary.label_map.indices if index is not None]
    dropped = len(summary.label_map.indices) - len(mapped)
    labels = "by name" + (f", {summary.label_map.moved} moved" if summary.label_map.moved else "") + \
        (f", {dropped} dropped" if dropped else "")
    official_sizes = spec.official_sizes if isinstance(spec, DatasetSpec) else (None, None)
    return {"dataset": spec.name, "source": summary.source, "split": split,
            "train": _size(train, official_sizes[0], caps[0]), "test": _size(test, official_sizes[1], caps[1]),
            "classes": f"{len(set(mapped))}/{len(spec.classnames)}", "first classes": ", ".join(spec.classnames[:3]),
            "labels": labels}


def _assets_row(name: str, assets: Path, preset, loaded: dict) -> dict[str, str]:
    if preset.class_groups:  # mini-long: a class group of one of the assets' datasets (`loaded`: read once each)
        folder = assets / MINI_MTIL / name.rsplit("-", 1)[0]
        task = mini_long_tasks(assets, [name], preset.class_groups, preset.eval_images, loaded)[0]
        split, labels = f"train / test (at most {preset.eval_images} test images)", "renumbered from 0"
    else:
        folder = assets / MINI_MTIL / name
        task = mini_mtil_tasks(assets, [name])[0]
        split, labels = "train / test", "as saved"
    return {"dataset": name, "source": str(folder), "split": split, "train": f"{len(task.train_dataset):,}",
            "test": f"{len(task.eval_dataset):,}", "classes": str(len(task.classnames)),
            "first classes": ", ".join(task.classnames[:3]), "labels": labels}


def check_data(preset, data_dir: Union[None, str, os.PathLike] = None,
               hub_ids: Optional[Mapping[str, Union[str, HubSource]]] = None, tasks: Optional[list[str]] = None,
               cache_dir: Optional[str] = None, assets: Union[None, str, os.PathLike] = None,
               raise_on_error: bool = True, model: Optional[str] = None, ddas_reference: Optional[str] = None,
               alexnet_weights: Optional[str] = None) -> DataCheck:
    """Check the data of every task of `preset` (or of `tasks`) as `presets.preset_tasks` would load it: its
    splits, their sizes against the official ones, the number of classes after mapping labels by name, and the
    first official class names; and that the run can have the other things it downloads: the CLIP weights `model`
    (a Hub id or a folder), the DDAS reference images `ddas_reference` (a Hub dataset id or a `save_to_disk` folder)
    and the AlexNet weights `alexnet_weights` (a URL or a file); None means the run does not need it. Raises
    `DataCheckError` (one line per missing item, naming its fix) if anything is wrong."""
    preset = get_preset(preset)
    hub_ids = dict(hub_ids or {})
    check = DataCheck(preset.name)
    network = _Network()
    assets = resolve_assets(assets) if getattr(preset, "from_assets", False) else None  # no folder: nothing to check
    cil = isinstance(preset, ClassIncrementalPreset)
    names = [preset.dataset] if cil else list(tasks or preset.tasks)
    if not cil:
        check_task_names(preset, names)
    specs, caps = CIL_DATASETS if cil else MTIL_DATASETS, (None, None)
    if not cil and preset.mini_hub:  # the mini tasks from their Hub copies, capped as the run caps them
        specs, caps, data_dir = MINI_HUB_DATASETS, (MINI_TRAIN_IMAGES, MINI_TEST_IMAGES), None
    loaded = {}  # the assets' datasets read so far, by name
    for name in names:
        try:
            check.rows.append(_assets_row(name, assets, preset, loaded) if assets is not None else
                              _dataset_row(specs[name], data_dir, hub_ids.get(name), cache_dir, network, caps))
        except (SourceError, LabelMappingError, FileNotFoundError) as error:
            check.rows.append({"dataset": name, "source": "FAILED", "labels": "see below"})
            check.problems.append(str(error))
    if cil:
        steps = (f"; {preset.num_steps} steps: {preset.initial_increment} classes, then {preset.increment} per step, "
                 "official class order")
        check.rows[0]["split"] = check.rows[0].get("split", "") + steps
    items = (("CLIP weights", model, _model_item), ("DDAS reference images", ddas_reference, _reference_item),
             ("AlexNet weights (DDAS)", alexnet_weights, _alexnet_item))
    for item, source, status_of in items:
        if source is not None:
            status, problem = status_of(str(source), network)
            check.downloads.append({"item": item, "source": str(source), "status": status})
            check.problems += [problem] if problem else []
    if check.problems and raise_on_error:
        raise DataCheckError(check)
    return check
