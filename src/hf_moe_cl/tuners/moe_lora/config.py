"""Configuration of the task-routed mixture of expert LoRAs (MoE-Adapters, Yu et al., CVPR 2024)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
import torch
from transformers.activations import ACT2FN

from ...ddas.settings import EDITED, SelectorConfig
from ...files import check_file_hashes, check_safetensors_file, file_hashes, json_sha256
from ...legacy import LEGACY_SELECTOR_FILES
from ...options import check_flags, check_option, check_task_record, refused_names, short_repr
from .base_weights import record_problem
from .card import tidy_peft_card
from .peft_type import MOE_LORA, MOE_LORA_PREFIX

logger = logging.getLogger("hf_moe_cl")
# The paper's placement: one expert bank per transformer block of both CLIP towers, in parallel to the MLP.
CLIP_BLOCK_TARGETS = r".*(vision_model|text_model)\.encoder\.layers\.\d+"


def check_growth_threshold(name: str, value) -> None:
    """A bank grows when fewer than this share in (0, 1) of `num_experts` are trainable (None: it never grows)."""
    check_option(name, value, float, low=0.0, high=1.0, low_open=True, high_open=True, optional=True)


def check_task_info_entry(task: int, name, classnames, templates) -> None:
    """An entry of `task_info`: what task `task`'s router was trained on (`options.check_task_record`)."""
    check_task_record(name, classnames, templates, f"Task {task} ({name!r}) in `task_info`",
                     f"Task {task}'s name in `task_info`")


NO_EQUIVALENT = "MoE-LoRA has none"
SAVE_AGAIN = f"{EDITED}: save the adapter again."
# peft LoRA's options a peft user reaches for, and what MoE-LoRA has instead
PEFT_LORA_NAMES = {
    "lora_alpha": "use `expert_scale`, the multiplier of every expert's output (LoRA's lora_alpha / r)",
    "lora_dropout": "use `expert_dropout`, the dropout after each expert's activation",
    "bias": "use `expert_bias` (True / False: biases of every expert's two projections)",
    "init_lora_weights": "use `init_weights`",
    "layers_to_transform": "use `target_modules` (a regex of the module names to adapt) or `exclude_modules`",
    "layers_pattern": "use `target_modules` (a regex of the module names to adapt) or `exclude_modules`",
    "rank_pattern": f"{NO_EQUIVALENT}: every expert has rank `r`",
    "alpha_pattern": f"{NO_EQUIVALENT}: every expert is scaled by `expert_scale`",
    **{name: NO_EQUIVALENT for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "target_parameters")},
}


@refused_names("peft LoRA", **PEFT_LORA_NAMES)
@dataclass
class MoELoraConfig(PeftConfig):
    """Configuration of a [`MoELoraModel`].

    The defaults reproduce MoE-Adapters: 22 experts of rank 64 with ReLU and scale 0.1 in every encoder block of
    both towers, top-2 noisy gating from the block's token-0 state, one router per task. Targeting `nn.Linear`
    modules by name instead (e.g. `["q_proj", "v_proj"]`) gives LoRA-style experts on those projections.
    """

    num_tasks: int = field(default=1, metadata={"help": "Number of task routers; grow later with `add_task()`."})
    num_experts: int = field(default=22, metadata={"help": "Experts per adapted module."})
    expert_growth_threshold: Optional[float] = field(default=None, metadata={
        "help": "Grow the bank: before a new task, every adapted module with fewer than this share of `num_experts` "
                "trainable (frozen by no task) gets the fewest new experts (at least top_k) that bring it back to that "
                "many (`grow_experts`). None: the paper's fixed bank."})
    hide_frozen_experts: bool = field(default=False, metadata={
        "help": "Each task's router selects only experts no earlier task froze (top_k of them at least: grow the "
                "bank). False (the paper): frozen experts too."})
    experts_per_module: dict[str, int] = field(default_factory=dict, metadata={
        "help": "Modules whose bank grew: module name -> its number of experts (written by `grow_experts`, read when "
                "the adapter is loaded)."})
    top_k: int = field(default=2, metadata={"help": "Experts each sample is routed to."})
    r: int = field(default=64, metadata={"help": "Rank (bottleneck width) of every expert."})
    expert_activation: Optional[str] = field(default="relu", metadata={
        "help": "Activation between down- and up-projection (a `transformers.activations` name). None gives plain "
                "LoRA experts."})
    expert_scale: float = field(default=0.1, metadata={"help": "Multiplier of every expert's output."})
    expert_dropout: float = field(default=0.1, metadata={"help": "Dropout after the activation, in training."})
    expert_bias: bool = field(default=True, metadata={
        "help": "Give the down- and up-projection a bias, as the paper's adapter does."})
    noisy_gating: bool = field(default=True, metadata={"help": "Add learned Gaussian noise to the router logits in "
                                                               "training."})
    noisy_gating_eval: bool = field(default=False, metadata={
        "help": "Keep the router noise on in evaluation too, as the official class-incremental code does "
                "(cil/clip/model.py lines 15, 288 and 422: `is_train` is fixed True when the model is built)."})
    noise_epsilon: float = field(default=1e-2, metadata={"help": "Floor of the router noise's standard deviation."})
    load_balancing_coef: float = field(default=0.0, metadata={
        "help": "Weight of the importance+load balancing loss returned by `aux_loss()`; the official code uses none."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Modules to adapt: transformer blocks (expert bank beside the MLP) or nn.Linear modules (LoRA-style). "
                "A regex string is matched in full; a list matches module-name suffixes. None adapts every encoder "
                "block of both CLIP towers."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "Modules not to adapt, same syntax as `target_modules`."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "Other modules to train and save in full, e.g. a classification head."})
    task_info: Optional[list[dict]] = field(default=None, metadata={
        "help": "Per trained task: name, class names and prompt templates (filled by ContinualTrainer); used by "
                "TaskAgnosticClassifier and the model card."})
    selector: Optional[dict] = field(default=None, metadata={
        "help": "Settings of the DDAS selector that picks a task router per image (see SelectorConfig); None: no "
                "selector. Its weights are saved in adapter_model.safetensors with the experts."})
    base_weights: Optional[dict] = field(default=None, metadata={
        "help": "The pretrained weights the adapter belongs to: hashes of their values and of their names and "
                "shapes, and their dtype (see `base_weights_record`). Filled when the adapter is created and compared "
                "when it is loaded, so a base of the same shape with other weights is refused; set it to None in a "
                "loaded config to load on another base on purpose."})
    file_sha256: Optional[dict] = field(default=None, metadata={
        "help": "sha256 of the weights file as saved (written by `save_pretrained`), checked when a local folder is "
                "loaded: a damaged or swapped file is refused."})
    settings_sha256: Optional[str] = field(default=None, metadata={
        "help": "sha256 of the settings the weights were trained with that no tensor records (`task_info`, "
                "`selector`, `expert_activation`, `hide_frozen_experts`), written by `save_pretrained` and checked "
                "when a local folder is loaded; set it to None to load such an edit on purpose."})
    init_weights: bool = field(default=True, metadata={
        "help": "Zero-initialise up-projections and routers so the adapted model starts equal to the base model. Only "
                "for tests of the routing mechanics should this be False."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOE_LORA
        for name in ("num_tasks", "num_experts", "top_k", "r"):
            check_option(name, getattr(self, name), int, low=1)
        check_growth_threshold("expert_growth_threshold", self.expert_growth_threshold)
        growth = self.expert_growth_threshold
        if self.hide_frozen_experts and growth is not None and round(growth * self.num_experts, 9) < self.top_k:
            raise ValueError(f"`expert_growth_threshold` ({growth}) keeps {growth} x num_experts ({self.num_experts}) "
                             f"experts trainable, fewer than top_k ({self.top_k}): with `hide_frozen_experts` a task "
                             "routes only through experts no earlier task froze, so a later task would be refused. "
                             f"Give a threshold of at least top_k / num_experts = {self.top_k / self.num_experts:.4g}, "
                             "or hide_frozen_experts=False.")
        check_flags(self, ("expert_bias", "noisy_gating", "noisy_gating_eval", "init_weights", "inference_mode",
                           "hide_frozen_experts"))
        for name in ("base_model_name_or_path", "revision", "settings_sha256"):
            check_option(name, getattr(self, name), str, optional=True)
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ValueError(f"`auto_mapping` must be None or a dict, got {short_repr(self.auto_mapping)}.")
        check_option("expert_scale", self.expert_scale, float, low=0, low_open=True)  # 0: the experts never learn
        check_option("expert_dropout", self.expert_dropout, float, low=0.0, high=1.0, high_open=True)
        check_option("noise_epsilon", self.noise_epsilon, float, low=0.0)
        check_option("load_balancing_coef", self.load_balancing_coef, float, low=0.0)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            names = value if isinstance(value, (list, set, tuple)) else [value]
            if value is not None and not all(isinstance(v, str) for v in names):
                raise ValueError(f"`{name}` must be None, a string or a list of strings (module names), got {value!r}.")
            if name == "target_modules" and value is not None and not value:
                raise ValueError(f"`target_modules` is empty ({value!r}), which adapts nothing: give module names, or "
                                 "None to adapt every encoder block of both CLIP towers.")
            if isinstance(value, list):
                setattr(self, name, set(value))
        # no string: peft would match module names against each of its characters
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, (list, set, tuple)) or not all(
                isinstance(v, str) for v in self.modules_to_save)):
            raise ValueError(f"`modules_to_save` must be None or a list of module names, got "
                             f"{short_repr(self.modules_to_save)}" + (f": write [{self.modules_to_save!r}]."
                                                                     if isinstance(self.modules_to_save, str) else "."))
        grown = {} if self.experts_per_module is None else self.experts_per_module
        if not isinstance(grown, dict) or not all(isinstance(name, str) for name in grown):
            raise ValueError(f"`experts_per_module` must be a dict of module name -> number of experts, got {grown!r}.")
        smaller = {name: count for name, count in grown.items()
                   if isinstance(count, bool) or not isinstance(count, int) or count < self.num_experts}
        if smaller:
            raise ValueError(f"`experts_per_module` must give each module at least `num_experts` "
                             f"({self.num_experts}) experts (a bank only grows), got {smaller}.")
        self.experts_per_module = dict(grown)
        if self.top_k > self.num_experts:
            raise ValueError(f"`top_k` ({self.top_k}) cannot exceed `num_experts` ({self.num_experts}): lower top_k or "
                             "add experts.")
        check_option("expert_activation", self.expert_activation, str, optional=True)
        if self.expert_activation is not None and self.expert_activation not in ACT2FN:
            raise ValueError(f"Unknown `expert_activation` {self.expert_activation!r}; use None (plain LoRA) or one of "
                             f"{sorted(ACT2FN)}.")
        info = self.task_info
        if info is not None:
            valid = isinstance(info, list) and len(info) <= self.num_tasks and all(
                entry is None or (isinstance(entry, dict) and isinstance(entry.get("name"), str) and all(
                    isinstance(entry.get(key), list) and all(isinstance(v, str) for v in entry[key])
                    for key in ("classnames", "templates"))) for entry in info)
            if not valid:
                raise ValueError(f"`task_info` must be a list of at most num_tasks={self.num_tasks} entries, each None "
                                 f"or {{'name': str, 'classnames': [str], 'templates': [str]}}; got {str(info)[:120]}. "
                                 f"{SAVE_AGAIN}")
            for task, entry in enumerate(info):
                if entry is not None:
                    check_task_info_entry(task, entry["name"], entry["classnames"], entry["templates"])
        if isinstance(self.selector, SelectorConfig):
            self.selector = self.selector.to_dict()
        if self.selector is not None:
            if not isinstance(self.selector, dict):
                raise ValueError(f"`selector` must be None or a dict of DDAS selector settings (the fields of "
                                 f"SelectorConfig), got {short_repr(self.selector)}.")
            self.selector = SelectorConfig.from_dict(dict(self.selector)).to_dict()
        problem = None if self.base_weights is None else record_problem(self.base_weights)
        if problem:
            raise ValueError(f"`base_weights` {problem}. {SAVE_AGAIN}")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's config file, with the sha256 of the weights peft wrote just before it; the README.md peft wrote
        beside it becomes a short card that says how to load."""
        weights = [n for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
                   if os.path.isfile(os.path.join(save_directory, n))]
        self.file_sha256 = file_hashes(save_directory, weights) or None
        self.settings_sha256 = self.settings_hash()
        super().save_pretrained(save_directory, **kwargs)
        tidy_peft_card(save_directory, self.base_model_name_or_path, self.task_info)

    def settings_hash(self) -> str:
        settings = {name: getattr(self, name) for name in ("task_info", "selector", "expert_activation")}
        if self.hide_frozen_experts:  # only when set, so that adapters saved before the option keep their hash
            settings["hide_frozen_experts"] = True
        return json_sha256(settings)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """peft's loader, plus checks of a local adapter folder before peft parses its files."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        local, where = os.path.isdir(folder), os.path.join(folder, CONFIG_NAME)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:  # TypeError: a value of a type no check foresaw
            if not local:
                raise
            raise ValueError(f"{where} holds an invalid value: {error}") from None
        if local:
            if config.selector is not None and config.selector["feature_dim"] is None:
                raise ValueError(f"{where} holds an invalid value: the DDAS selector settings lack `feature_dim` (the "
                                 "width of its features), which a saved selector always records: the file was damaged "
                                 "or edited. Save the adapter again.")
            weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
            if os.path.isfile(weights):
                tensor_names = check_safetensors_file(weights)
            elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
                tensor_names = _check_torch_weights(os.path.join(folder, WEIGHTS_NAME))
            else:
                raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}: the adapter's "
                                        "weights are missing. Save the adapter again (save_pretrained writes both) or "
                                        "copy the weights file beside the config.")
            legacy = [name for name in LEGACY_SELECTOR_FILES if os.path.isfile(os.path.join(folder, name))]
            if legacy and config.selector is None:
                raise ValueError(f"{folder} holds a DDAS selector in {legacy}, the layout of hf-moe-cl 0.1. Convert "
                                 f"the folder once with `hf_moe_cl.upgrade_adapter_folder({folder!r})`, which moves "
                                 "the selector into the adapter's config and weights.")
            check_file_hashes(folder, config.file_sha256, where, "Save or download the adapter again.")
            loaded = SAFETENSORS_WEIGHTS_NAME if os.path.isfile(weights) else WEIGHTS_NAME
            if config.file_sha256 is not None and loaded not in config.file_sha256:
                raise ValueError(f"{where} holds an invalid value: `file_sha256` ({short_repr(config.file_sha256)}) "
                                 f"records no sha256 of {loaded}, the weights file loaded, so it checks nothing: the "
                                 "file was damaged or edited. Save or download the adapter again, or set file_sha256 "
                                 "to null to load it unchecked.")
            _check_modules_to_save(config.modules_to_save, tensor_names, where, loaded)
            if config.settings_sha256 not in (None, config.settings_hash()):
                raise ValueError(f"{where} was edited in `task_info`, `selector`, `expert_activation` or "
                                 "`hide_frozen_experts`: the weights were trained with the saved values "
                                 "(settings_sha256 records them; only top_k, expert_scale and the noise settings may "
                                 "be edited). Save or download the adapter again, or set settings_sha256 to null to "
                                 "load the edit on purpose.")
            if config.base_weights is None:
                logger.warning("%s records no `base_weights` (saved before the record existed, or it was removed): "
                               "the base model it is loaded on cannot be checked.", where)
        return config


def _check_modules_to_save(modules_to_save, tensor_names: list[str], where: str, weights: str) -> None:
    """Every module `modules_to_save` names (matched as peft does, by the end of its name) has its trained copy among
    the weights file's tensors, which peft would otherwise fail to find (a bare KeyError) when it loads them."""
    copies = {name.rsplit(".", 1)[0] for name in tensor_names
              if not any(part.startswith(MOE_LORA_PREFIX) for part in name.split("."))}
    missing = [name for name in modules_to_save or () if not any(module.endswith(name) for module in copies)]
    if missing:
        held = ", ".join(sorted(copies)) or "none"
        raise ValueError(f"{where} was edited in `modules_to_save`: it names {missing}, but {weights} beside it holds "
                         f"no trained copy of such a module (the copies it holds: {held}). Set `modules_to_save` back "
                         "to the modules saved, or save or download the adapter again.")


def _check_torch_weights(path: str) -> list[str]:
    """An adapter_model.bin (peft's `safe_serialization=False`) must be a state dict of tensors that torch loads
    without running code (`weights_only`), as peft reads it; returns the tensors' names."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for what it cannot read
        raise ValueError(f"{path} is not a state dict torch can load safely ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]}): a pickle of other objects, damaged, or not a torch "
                         "file. Save the adapter again with save_pretrained (safetensors by default).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors. Save the adapter again "
                         "with save_pretrained (safetensors by default).")
    return list(state)
