"""One continual-learning experiment: a method, a base CLIP, a task sequence -> accuracy matrices.

Every method goes through the same `ContinualTrainer` (tasks, loss, schedule, evaluation), so the comparison is
side by side; the method is looked up by name in the registry of `hf_moe_cl.continual.methods`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from transformers import set_seed

from ..continual import ContinualResult, ContinualTrainer, ContinualTrainingArguments
from ..continual.methods import METHODS, MoEAdapters, MoEAdaptersArguments, get_method
from ..continual.methods.moe_adapters_arguments import idle_options as moe_adapters_idle_options
from ..ddas.settings import SELECTOR_OPTION_NAMES, SelectorConfig
from ..options import check_option
from ..tuners.moe_lora import MoELoraConfig


@dataclass
class MethodArguments:
    """Which method to run, and what every method shares; each method's own options are its `arguments_class`."""

    method: str = field(default="moe-adapters", metadata={"help": f"One of {', '.join(METHODS)}."})
    rank: int = field(default=64, metadata={"help": "Rank of MoE experts, of the LoRA baseline and of ConDU's LoRA."})
    use_task_learning_rates: bool = field(default=True, metadata={"help": (
        "Use each task's official learning rate for the method (MoE-Adapters', ConDU's) where the preset has one; "
        "false: `learning_rate` for every task.")})

    def __post_init__(self):
        check_option("method", self.method, str)
        get_method(self.method)
        check_option("rank", self.rank, int, low=1)
        check_option("use_task_learning_rates", self.use_task_learning_rates, bool)


ADAPTER_OPTIONS = ("num_experts", "top_k", "noisy_gating", "noisy_gating_eval", "expert_growth_threshold",
                   "hide_frozen_experts")


def _option(owner: type, name: str):
    owner_help = next(f.metadata.get("help", "") for f in dataclasses.fields(owner) if f.name == name)
    return field(default=None, metadata={"help": f"{owner.__name__}.{name} (None: its default). {owner_help}"})


@dataclass
class AdapterArguments:
    """The command line's names for the settings of the adapter MoE-Adapters builds: its `MoELoraConfig` and its
    DDAS selector's `SelectorConfig` own them (their defaults, their checks); None leaves a setting to them."""

    num_experts: Optional[int] = _option(MoELoraConfig, "num_experts")
    top_k: Optional[int] = _option(MoELoraConfig, "top_k")
    noisy_gating: Optional[bool] = _option(MoELoraConfig, "noisy_gating")
    noisy_gating_eval: Optional[bool] = _option(MoELoraConfig, "noisy_gating_eval")
    expert_growth_threshold: Optional[float] = _option(MoELoraConfig, "expert_growth_threshold")
    hide_frozen_experts: Optional[bool] = _option(MoELoraConfig, "hide_frozen_experts")
    ddas_feature_extractor: Optional[str] = _option(SelectorConfig, "feature_extractor")
    ddas_feature_layer: Optional[int] = _option(SelectorConfig, "feature_layer")
    ddas_hidden_dim: Optional[int] = _option(SelectorConfig, "hidden_dim")
    ddas_include_untrained: Optional[bool] = _option(SelectorConfig, "include_untrained")

    def __post_init__(self):
        self.configs()  # their owners check the values given

    def _given(self, names) -> dict[str, Any]:
        return {names[name] if isinstance(names, dict) else name: getattr(self, name) for name in names
                if getattr(self, name) is not None}

    def adapter_config(self) -> MoELoraConfig:
        """The adapter's settings given here, the rest MoELoraConfig's defaults (its size is set by the run)."""
        return MoELoraConfig(**self._given(ADAPTER_OPTIONS))

    def selector_config(self) -> SelectorConfig:
        return SelectorConfig(**self._given(SELECTOR_OPTION_NAMES))

    def resolved(self) -> dict[str, Any]:
        """Every option as the adapter will have it (the owners' defaults where None)."""
        adapter, selector = self.configs()
        return {**{name: getattr(adapter, name) for name in ADAPTER_OPTIONS},
                **{option: getattr(selector, name) for option, name in SELECTOR_OPTION_NAMES.items()}}

    def configs(self) -> tuple[MoELoraConfig, SelectorConfig]:
        """What `from_base` takes among its options."""
        return self.adapter_config(), self.selector_config()


class CommandLineMoEAdaptersArguments(MoEAdaptersArguments):
    """`MoEAdaptersArguments` as a command line parses them: an idle option is not refused when they are made but by
    `idle_options` with the run's other unused options (given ones, even at their defaults, all named together)."""

    refuses_idle_options = False


def cli_spelling(name: str, value=None) -> str:
    """An option as the command line gives it: `--name`, or `--name value`."""
    return f"--{name}" if value is None else f"--{name} {str(value).lower() if isinstance(value, bool) else value}"


def prepare_method(method_args: MethodArguments, base, tasks, args: ContinualTrainingArguments,
                   options: Sequence = (), reference_images=None):
    """(method, training arguments) for a run of `tasks`: the method named by `method_args`, built on a private copy
    of `base` from a seeded start (its adapter's initialisation does not depend on what ran before), each method
    taking its own `options` (parsed argument dataclasses; defaults for the others); every task at `learning_rate`
    unless the method's official per-task rates are wanted."""
    if not method_args.use_task_learning_rates:
        if args.task_learning_rates is not None:
            raise ValueError("task_learning_rates and use_task_learning_rates=False disagree: the latter trains every "
                             "task at `learning_rate`. Drop one of them.")
        args = dataclasses.replace(args, task_learning_rates=[args.learning_rate] * len(tasks))
    set_seed(args.seed)
    method = get_method(method_args.method).from_base(base, options, num_tasks=len(tasks), rank=method_args.rank,
                                                      reference_images=reference_images)
    return method, args


def run_method(method_args: MethodArguments, base, processor, tasks, args: ContinualTrainingArguments,
               resume: bool = False, options: Sequence = (), reference_images=None) -> ContinualResult:
    """Run one method over `tasks`; checkpoints go under `args.output_dir`. `reference_images` are images of no
    task, for methods that learn to recognise unknown images (DDAS's reference set)."""
    method, args = prepare_method(method_args, base, tasks, args, options, reference_images)
    trainer = ContinualTrainer(method=method, args=args, processing_class=processor)
    return trainer.train_tasks(tasks, resume=resume)


def idle_options(method, ddas_args, adapter_args: AdapterArguments, moe_args, condu_args) -> dict[str, str]:
    """Options of `method` (a registered class) that its other options leave without effect -> why: given on the
    command line, they are refused (nothing is ignored silently). The groups are the parsed `DDASArguments`,
    `AdapterArguments`, `MoEAdaptersArguments` and `ConDUArguments`."""
    idle = {}
    if not method.trains:
        idle.update(dict.fromkeys(("rank", "use_task_learning_rates", "learning_rate", "max_steps", "warmup_steps",
                                   "weight_decay", "task_learning_rates"), f"--method {method.name} trains nothing"))
    condu_lora = method.name == "condu" and condu_args.condu_fine_tune == "lora"
    if method.name == "condu" and not condu_lora:
        idle.update(dict.fromkeys(("rank", "condu_lora_targets", "condu_lora_init_std"),
                                  "a ConDU LoRA option, and --condu_fine_tune full trains no LoRA"))
    elif not (issubclass(method, MoEAdapters) or method.name in ("lora", "condu")):
        idle.setdefault("rank", f"--method {method.name} has no low-rank part")
    if not issubclass(method, MoEAdapters):
        return idle
    idle.update(moe_adapters_idle_options(moe_args, cli_spelling))
    if not adapter_args.adapter_config().noisy_gating:
        idle["noisy_gating_eval"] = "--noisy_gating false adds no noise, in training or evaluation"
    if ddas_args.ddas_threshold is not None:
        idle["ddas_quantile"] = "--ddas_threshold gives the threshold the quantile would calibrate"
    if adapter_args.selector_config().feature_extractor != "alexnet":
        idle["ddas_alexnet_weights"] = "the DDAS features are CLIP's (--ddas_feature_extractor alexnet reads them)"
    return idle
