"""`check_data`: before a long run, verify every dataset of a preset from split metadata and label names alone
(parquet footers, annotation files, folder listings; no image is read), and report it as a table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from ..assets import assets_dir as resolve_assets
from ..continual.tasks import ContinualTask
from ..presets import ClassIncrementalPreset, HubSource, MTIL_DATASETS, get_preset, hub_source, mini_long_tasks
from .labels import LabelMappingError
from .sources import summarize
from .summary import SourceError

COLUMNS = ("dataset", "source", "split", "train", "test", "classes", "first classes", "labels")


@dataclass
class DataCheck:
    """One row per dataset (keys: COLUMNS) and the problems found; `markdown()` renders the table."""

    preset: str
    rows: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def markdown(self) -> str:
        lines = [f"Data check of preset {self.preset!r}", "", "| " + " | ".join(COLUMNS) + " |",
                 "|" + " --- |" * len(COLUMNS)]
        lines += ["| " + " | ".join(row.get(column, "") for column in COLUMNS) + " |" for row in self.rows]
        lines += [""] + [f"- {problem}" for problem in self.problems]
        return "\n".join(lines).rstrip() + "\n"

    __str__ = markdown


class DataCheckError(ValueError):
    """Some dataset of the preset cannot be used as the official experiment needs; `.check` holds the table."""

    def __init__(self, check: DataCheck):
        super().__init__(f"{len(check.problems)} data problem(s) in preset {check.preset!r}; each names its fix.\n\n"
                         + check.markdown())
        self.check = check


def _size(count: int, official: int) -> str:
    return f"{count:,}" if count == official else f"{count:,} (official {official:,})"


def _dataset_row(name: str, data_dir, hub, cache_dir) -> dict[str, str]:
    spec = MTIL_DATASETS[name]
    source = None if data_dir is not None else hub_source(name, hub)
    summary = summarize(spec, data_dir=data_dir, hub=source, cache_dir=cache_dir)
    if spec.split_rule is not None:
        fraction, seed = spec.split_rule
        whole = summary.sizes["all"]
        train, test = int(fraction * whole), whole - int(fraction * whole)
        split = f"{fraction:.0%} / {1 - fraction:.0%} of all {whole:,}, seed {seed}"
    else:
        train, test = summary.sizes["train"], summary.sizes["test"]
        split = f"{spec.train_split} / {spec.test_split}"
        if source is not None:
            split += f" (Hub: {'+'.join(source.splits['train'])} / {'+'.join(source.splits['test'])})"
    mapped = [index for index in summary.label_map.indices if index is not None]
    dropped = len(summary.label_map.indices) - len(mapped)
    labels = "by name" + (f", {summary.label_map.moved} moved" if summary.label_map.moved else "") + \
        (f", {dropped} dropped" if dropped else "")
    return {"dataset": name, "source": summary.source, "split": split, "train": _size(train, spec.official_sizes[0]),
            "test": _size(test, spec.official_sizes[1]), "classes": f"{len(set(mapped))}/{spec.num_classes}",
            "first classes": ", ".join(spec.classnames[:3]), "labels": labels}


def _assets_row(name: str, assets, preset) -> dict[str, str]:
    if preset.class_groups:  # mini-long: a class group of one of the assets' datasets
        folder = resolve_assets(assets) / "mini-mtil" / name.rsplit("-", 1)[0]
        task = mini_long_tasks(resolve_assets(assets), [name], preset.class_groups, preset.eval_images)[0]
        split, labels = f"train / test (at most {preset.eval_images} test images)", "renumbered from 0"
    else:
        folder = resolve_assets(assets) / "mini-mtil" / name
        task = ContinualTask.from_disk(folder)
        split, labels = "train / test", "as saved"
    return {"dataset": name, "source": str(folder), "split": split, "train": f"{len(task.train_dataset):,}",
            "test": f"{len(task.eval_dataset):,}", "classes": str(len(task.classnames)),
            "first classes": ", ".join(task.classnames[:3]), "labels": labels}


def check_data(preset, data_dir: Union[None, str, os.PathLike] = None,
               hub_ids: Optional[Mapping[str, Union[str, HubSource]]] = None, tasks: Optional[list[str]] = None,
               cache_dir: Optional[str] = None, assets: Union[None, str, os.PathLike] = None,
               raise_on_error: bool = True) -> DataCheck:
    """Check the data of every task of `preset` (or of `tasks`) as `presets.preset_tasks` would load it: its
    splits, their sizes against the official ones, the number of classes after mapping labels by name, and the
    first official class names. Raises `DataCheckError` (naming each dataset and its fix) if anything is wrong."""
    preset = get_preset(preset)
    hub_ids = dict(hub_ids or {})
    check = DataCheck(preset.name)
    if isinstance(preset, ClassIncrementalPreset):
        names = [preset.dataset]
    else:
        names = list(tasks or preset.tasks)
        unknown = sorted(set(names) - set(preset.tasks))
        if unknown:
            raise ValueError(f"Preset {preset.name!r} has no task(s) {unknown}; its tasks are "
                             f"{', '.join(preset.tasks)}.")
    for name in names:
        try:
            if getattr(preset, "from_assets", False):
                check.rows.append(_assets_row(name, assets, preset))
            else:
                check.rows.append(_dataset_row(name, data_dir, hub_ids.get(name), cache_dir))
        except (SourceError, LabelMappingError, FileNotFoundError) as error:
            check.rows.append({"dataset": name, "source": "FAILED", "labels": "see below"})
            check.problems.append(str(error))
    if isinstance(preset, ClassIncrementalPreset):
        steps = (f"; {preset.num_steps} steps: {preset.initial_increment} classes, then {preset.increment} per step, "
                 "official class order")
        check.rows[0]["split"] = check.rows[0].get("split", "") + steps
    if check.problems and raise_on_error:
        raise DataCheckError(check)
    return check
