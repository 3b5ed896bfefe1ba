"""Everything hf-moe-cl reads that an earlier release wrote, and the names it replaced: one module, so each can go
when its time is up.

- hf-moe-cl 0.1 saved the DDAS selector beside the adapter (`ddas_config.json` + `ddas.safetensors`):
  `upgrade_adapter_folder` moves it into the adapter's own files.
- hf-moe-cl <= 0.2 saved the selector as one module per autoencoder (`reference.encoder.weight`,
  `tasks.0.encoder.weight`, ...): `stack_legacy_autoencoders` stacks it as the selector holds it now.
- hf-moe-cl 0.2 stored a sentence as the peft type: `LEGACY_PEFT_TYPE_NAMES`.
- hf-moe-cl 0.3 moved and renamed modules and names (`MOVED_MODULES`, `moved_names`); options moved to other
  dataclasses are accepted for a while by `options.moved_options`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

from .ddas.selector import AUTOENCODER_TENSORS
from .ddas.settings import SELECTOR_KEY, SelectorConfig
from .files import atomic_path, check_safetensors_file, read_json_file, write_text_atomic

LEGACY_PEFT_TYPE_NAMES = ("MOE_LORA (needs `import hf_moe_cl` before loading)",)
LEGACY_SELECTOR_FILES = ("ddas_config.json", "ddas.safetensors")


def upgrade_adapter_folder(folder: str) -> None:
    """Move a 0.1 selector (`ddas_config.json` + `ddas.safetensors`) into `adapter_config.json` (`selector`) and
    `adapter_model.safetensors` (under `base_model.moe_lora_selector.`); the folder then loads with peft alone.
    The new files are written beside the old ones and renamed into place, then the legacy files are removed."""
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    legacy_config, legacy_weights = (os.path.join(folder, name) for name in LEGACY_SELECTOR_FILES)
    if not os.path.isfile(legacy_config) or not os.path.isfile(legacy_weights):
        raise FileNotFoundError(f"{folder} has no {' + '.join(LEGACY_SELECTOR_FILES)} to convert.")
    for path in (weights_path, legacy_weights):
        check_safetensors_file(path)
    adapter_config, selector = read_json_file(config_path), read_json_file(legacy_config)
    if selector.pop("num_tasks") != adapter_config["num_tasks"]:
        raise ValueError(f"The selector in {folder} was saved for another number of tasks than the adapter; it "
                         "cannot be converted.")
    adapter_config["selector"] = SelectorConfig.from_dict(selector).to_dict()
    tensors = load_file(weights_path)
    tensors.update({f"base_model.{SELECTOR_KEY}.{key}": value for key, value in load_file(legacy_weights).items()})
    with atomic_path(weights_path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_text_atomic(config_path, json.dumps(adapter_config, indent=2))
    for path in (legacy_config, legacy_weights):
        os.remove(path)


def legacy_selector_prefixes(state_dict: dict) -> list[str]:
    """The prefixes under which `state_dict` holds a selector in the layout of hf-moe-cl <= 0.2."""
    marker = "reference.encoder.weight"
    return [key[: -len(marker)] for key in state_dict if key.endswith(f"{SELECTOR_KEY}." + marker)
            or key.endswith(f"{SELECTOR_KEY}.default." + marker)]


def stack_legacy_autoencoders(state_dict: dict, prefix: str) -> dict:
    """A selector state saved by hf-moe-cl <= 0.2 (one module per autoencoder: `reference.encoder.weight`,
    `tasks.0.encoder.weight`, ...) in the stacked layout (`encoder_weight` of (1 + tasks, ...)); other keys are
    returned unchanged."""
    state = dict(state_dict)
    tasks = sorted({int(key[len(prefix) + len("tasks."):].split(".")[0]) for key in state
                    if key.startswith(prefix + "tasks.")})
    if tasks != list(range(len(tasks))):
        raise ValueError(f"The saved DDAS selector has task autoencoders {tasks}: they must be numbered from 0 "
                         "without gaps. The adapter file is damaged; save it again.")
    for name in AUTOENCODER_TENSORS:
        part_kind = name.replace("_", ".")
        slots = [f"{prefix}reference.{part_kind}"] + [f"{prefix}tasks.{t}.{part_kind}" for t in tasks]
        missing = [key for key in slots if key not in state]
        if missing:
            raise ValueError(f"The saved DDAS selector lacks {missing[:2]}: the adapter file is damaged; save it "
                             "again.")
        state[prefix + name] = torch.stack([state.pop(key) for key in slots])
    return state


def moved_names(module: str, destinations: dict[str, str]):
    """A module `__getattr__` that still finds names moved to another module (`name -> new module`), with a
    FutureWarning naming where to import them from."""

    def __getattr__(name: str):
        if name not in destinations:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {destinations[name]}.{name}; the old place goes in hf-moe-cl 0.4.",
                      FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(destinations[name]), name)

    return __getattr__


# Modules renamed in 0.3: old name -> new name. Importing an old name gives the new module, with a FutureWarning.
MOVED_MODULES = {
    "hf_moe_cl.presets": "hf_moe_cl.experiments.presets",
    "hf_moe_cl.tuners.moe_lora.selector": "hf_moe_cl.ddas.selector",
    "hf_moe_cl.tuners.moe_lora.features": "hf_moe_cl.ddas.features",
    "hf_moe_cl.tuners.moe_lora.upgrade": "hf_moe_cl.legacy",
    "hf_moe_cl.continual.methods.ddas": "hf_moe_cl.ddas.settings",
    "hf_moe_cl.continual.methods.ddas_training": "hf_moe_cl.ddas.autoencoder",
    "hf_moe_cl.continual.checkpoints": "hf_moe_cl.continual.run_folder",
    "hf_moe_cl.condu.checkpoint": "hf_moe_cl.condu.folder",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the modules of `MOVED_MODULES` under their old names."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED_MODULES[spec.name]}; the old name goes in hf-moe-cl 0.4.",
                      FutureWarning, stacklevel=2)
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        """The module is the new one, already executed."""


def find_moved_modules() -> None:
    """Let the old names of `MOVED_MODULES` be imported (idempotent)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
