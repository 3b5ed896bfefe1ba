"""Conversion of adapter folders written by hf-moe-cl 0.1, whose DDAS selector sat in files of its own."""

from __future__ import annotations

import json
import os

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from ...files import atomic_path, check_safetensors_file
from .config import LEGACY_SELECTOR_FILES
from .model import SELECTOR_ATTRIBUTE
from .selector import SelectorConfig


def upgrade_adapter_folder(folder: str) -> None:
    """Move a 0.1 selector (`ddas_config.json` + `ddas.safetensors`) into `adapter_config.json` (`selector`) and
    `adapter_model.safetensors` (under `base_model.moe_lora_selector.`); the folder then loads with peft alone.
    The new files are written beside the old ones and renamed into place, then the legacy files are removed."""
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    legacy_config, legacy_weights = (os.path.join(folder, name) for name in LEGACY_SELECTOR_FILES)
    if not os.path.isfile(legacy_config) or not os.path.isfile(legacy_weights):
        raise FileNotFoundError(f"{folder} has no {' + '.join(LEGACY_SELECTOR_FILES)} to convert.")
    for path in (weights_path, legacy_weights):
        check_safetensors_file(path)
    with open(config_path) as handle:
        adapter_config = json.load(handle)
    with open(legacy_config) as handle:
        selector = json.load(handle)
    if selector.pop("num_tasks") != adapter_config["num_tasks"]:
        raise ValueError(f"The selector in {folder} was saved for another number of tasks than the adapter; it "
                         "cannot be converted.")
    adapter_config["selector"] = SelectorConfig.from_dict(selector).to_dict()
    tensors = load_file(weights_path)
    tensors.update({f"base_model.{SELECTOR_ATTRIBUTE}.{key}": value for key, value in load_file(legacy_weights).items()})
    with atomic_path(weights_path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    with atomic_path(config_path) as temporary:
        temporary.write_text(json.dumps(adapter_config, indent=2))
    for path in (legacy_config, legacy_weights):
        os.remove(path)
