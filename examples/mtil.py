#!/usr/bin/env python
"""Continual learning of CLIP on MTIL (or a variant) with one method, through `ContinualTrainer`.

    accelerate launch examples/mtil.py --preset mtil-order-1 --check_data           # the data first
    accelerate launch examples/mtil.py --preset mtil-order-1 --method moe-adapters --output_dir runs/order1
    python examples/mtil.py --preset mini --method moe-adapters --output_dir runs/mini --use_cpu
    python examples/mtil.py config.yaml [--max_steps 50 ...]   # arguments from YAML or JSON, overridable

A preset is an official experiment (tasks, steps, batch size, schedule, DDAS); every argument you give wins over the
preset's value. After the run, `output_dir` holds the report (one folder per matrix: protocol, per_image, oracle;
metrics.md with Transfer / Average / Last / BWT), all_results.json, the final adapter (ConDU: its save) at its root
and one checkpoint folder per task (`--resume` continues after the last finished one). `--help` lists this script's options; `--help_all` adds every `TrainingArguments` option.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
import yaml
from datasets import load_dataset, load_from_disk
from transformers import CLIPModel, CLIPProcessor, HfArgumentParser

import hf_moe_cl  # noqa: F401  (registers MoE-LoRA with peft)
from hf_moe_cl.assets import PROXY_CLIP, REFERENCE_IMAGES, AssetsNotFoundError, assets_dir
from hf_moe_cl.experiments.experiment import (AdapterArguments, CommandLineMoEAdaptersArguments, MethodArguments,
                                              idle_options, prepare_method)
from hf_moe_cl.experiments.metrics import class_incremental_metrics
from hf_moe_cl.experiments.recipes import TINY_IMAGENET, apply_recipe
from hf_moe_cl.experiments.reporting import write_result_report
from hf_moe_cl.files import write_json_atomic
from hf_moe_cl.options import short_repr
from hf_moe_cl.tuners.moe_lora.card import checked_hub_id
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.methods import (ConDUArguments, DDASArguments, LoRAArguments, MoEAdapters,
                                         MoEAdaptersArguments, get_method)
from hf_moe_cl.experiments.data_check import check_data
from hf_moe_cl.experiments.datasets import CIL_DATASETS, MTIL_DATASETS, hub_source
from hf_moe_cl.experiments.mini_hub import MINI_HUB_CLIP, MINI_HUB_DATASETS
from hf_moe_cl.experiments.presets import PRESETS, ClassIncrementalPreset, check_task_names, get_preset, preset_tasks
from hf_moe_cl.publishing import push_to_hub
from hf_moe_cl.tuners.moe_lora.card import hub_id

logger = logging.getLogger("hf_moe_cl")
HUB_CLIP = "openai/clip-vit-base-patch16"

# TrainingArguments this script has its own way for or never uses: refused when given, never ignored.
NO_BEST = "every task keeps its own checkpoint; there is no best one to reload"
REFUSED = {"resume_from_checkpoint": "use --resume, which continues after the last finished task",
           "load_best_model_at_end": NO_BEST, "metric_for_best_model": NO_BEST,
           **dict.fromkeys(("do_train", "do_eval", "do_predict"), "it trains and evaluates every task itself"),
           "eval_steps": "every task is evaluated after it trains (eval_strategy 'no'), never during training",
           "save_steps": "every task is saved after it trains (save_strategy 'no'; --save_task_checkpoints)"}


@dataclass
class ExperimentArguments:
    """Which experiment to run, on what data."""

    preset: str = field(default="mini", metadata={"help": f"One of {', '.join(PRESETS)}."})
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": f"Base CLIP; default {HUB_CLIP}, the assets' proxy-clip for `mini` and `mini-long`, "
                  f"{MINI_HUB_CLIP} for `mini-hub`."},
    )
    tasks: Optional[str] = field(default=None, metadata={"help": "Comma-separated subset/order of the preset's tasks."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "Read the datasets from torchvision folders under this path, not the Hub."}
    )
    dataset_ids: Optional[str] = field(
        default=None, metadata={"help": "Other Hub copies, e.g. 'cifar100=my/cifar100,dtd=my/dtd'."}
    )
    assets_dir: Optional[str] = field(default=None, metadata={"help": "Shared assets (default ../shared/assets)."})
    check_data: bool = field(
        default=False,
        metadata={"help": "Only check what the run downloads (datasets: splits, sizes, classes; CLIP, DDAS reference "
                  "and AlexNet weights), print tables, and exit (1 naming each missing item and its fix)."},
    )
    resume: bool = field(default=False, metadata={"help": "Continue after the last finished task in output_dir."})
    print_recipe: bool = field(
        default=False, metadata={"help": "Print every resolved argument (preset + yours) as one JSON object, and exit."}
    )
    ddas_reference: Optional[str] = field(
        default=None,
        metadata={"help": f"DDAS reference images: a saved dataset folder or a Hub dataset id with an image column "
                  f"(default: {TINY_IMAGENET}, the assets' reference/tinyimagenet-ref for `mini` and `mini-long`)."},
    )
    hub_dry_run_dir: Optional[str] = field(
        default=None, metadata={"help": "Write what --push_to_hub would upload into this (new) folder, upload nothing."}
    )
    hub_base_model: Optional[str] = field(
        default=None, metadata={"help": "Hub id of the base model when --model_name_or_path is a local copy of it: the "
                                "published card and adapter name it (default: the base model if it is a Hub id)."}
    )

    def __post_init__(self):
        get_preset(self.preset)
        self.tasks = None if self.tasks is None else ",".join(name.strip() for name in self.tasks.split(","))  # 'a, b'
        if self.hub_base_model is not None and hub_id(self.hub_base_model) is None:
            raise ValueError(f"--hub_base_model must be a Hub model id (e.g. {HUB_CLIP}), got {self.hub_base_model!r}.")


LIBRARY_GROUPS = (ExperimentArguments, MethodArguments, AdapterArguments, CommandLineMoEAdaptersArguments,
                  DDASArguments, LoRAArguments, ConDUArguments)
ADAPTER_FIELDS = ("num_experts", "top_k", "noisy_gating", "noisy_gating_eval", "expert_growth_threshold")


def explicit_fields(argv: list[str]) -> set[str]:
    """Names of the options given on the command line (`--name value`, `--name=value`, `--name`, `--no_name`)."""
    names = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    return names | {name[3:] for name in names if name.startswith("no_")}


def config_as_argv(path: str, parser: HfArgumentParser) -> list[str]:
    """A YAML or JSON file of arguments as command-line arguments, so options after it override it."""
    try:
        text = Path(path).read_text()
        values = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"Cannot read the config file {path}, which must hold a mapping of argument names to "
                         f"values (e.g. 'max_steps: 100'): {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"The config file {path} must hold a mapping of argument names to values (e.g. "
                         f"'max_steps: 100'), got {short_repr(values)}.")
    argv = []
    for name, value in values.items():
        if value is None or value == []:  # unset (as --print_recipe writes an option left unset)
            continue
        action = parser._option_string_actions.get(f"--{name}")  # argparse's table of options
        if isinstance(value, list) and action is not None and action.nargs is None:
            raise ValueError(f"The config file {path} gives `{name}` the list {short_repr(value)}, but --{name} takes "
                             "one value" + (": write the tasks as one comma-separated string, e.g. 'tasks: "
                                            "cifar10,mnist'." if name == "tasks" else "."))
        values_out = value if isinstance(value, list) else [json.dumps(value) if isinstance(value, dict) else value]
        argv += [f"--{name}", *[str(v).lower() if isinstance(v, bool) else str(v) for v in values_out]]
    return argv


def full_parser() -> HfArgumentParser:
    """Every option of the script. No abbreviations: `--max_step 1` would set max_steps, yet not count as given, so
    the preset would override it."""
    return HfArgumentParser(LIBRARY_GROUPS + (ContinualTrainingArguments,), allow_abbrev=False)


def parse_args(argv: list[str]):
    library = HfArgumentParser(LIBRARY_GROUPS, usage="%(prog)s [config.yaml|config.json] [--option value ...]",
                               allow_abbrev=False)
    if "-h" in argv or "--help" in argv:
        library.print_help()
        print("\nTraining arguments: the ContinualTrainingArguments (a transformers TrainingArguments), e.g. "
              "--output_dir, --max_steps (steps per task), --learning_rate, --per_device_train_batch_size, --seed, "
              "--bf16, --log_level, --push_to_hub, --hub_model_id; --help_all lists them all.")
        sys.exit(0)
    parser = full_parser()
    if "--help_all" in argv:
        parser.print_help()
        sys.exit(0)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        try:
            argv = config_as_argv(argv[0], parser) + argv[1:]
        except ValueError as error:
            parser.error(str(error))
    *groups, training, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (options are spelled out in full, never "
                     "abbreviated; --help lists them).")
    explicit = explicit_fields(argv)
    defaults = {f.name: f.default for f in dataclasses.fields(ContinualTrainingArguments)}
    for name in sorted(explicit & set(REFUSED)):
        if getattr(training, name) != defaults[name]:  # the default (as --print_recipe writes it) changes nothing
            parser.error(f"--{name} is not used by this script: {REFUSED[name]}.")
    method, ddas = groups[1].method, groups[4]
    if "ddas" in explicit and ddas.ddas and not issubclass(get_method(method), MoEAdapters):
        parser.error(f"--ddas true applies to --method moe-adapters; {method} does not use a DDAS selector (ConDU "
                     "picks tasks by its own voting). Drop --ddas.")
    return groups, training, explicit


def unused_options(experiment: ExperimentArguments, method_args: MethodArguments, ddas_args: DDASArguments,
                   training: ContinualTrainingArguments, adapter_args: AdapterArguments,
                   moe_args: MoEAdaptersArguments, condu_args: ConDUArguments) -> dict[str, str]:
    """The options this run does not use (by its preset, method, DDAS and publishing, the recipe applied, and the
    options others make idle) -> why."""
    preset, method = get_preset(experiment.preset), get_method(method_args.method)
    unused = idle_options(method, ddas_args, adapter_args, moe_args, condu_args)
    if isinstance(preset, ClassIncrementalPreset):
        unused["tasks"] = f"preset {preset.name} runs its fixed class-incremental steps of {preset.dataset}"
    if getattr(preset, "from_assets", False):
        unused.update(dict.fromkeys(("data_dir", "dataset_ids"), f"preset {preset.name} reads the shared assets"))
    else:
        unused["assets_dir"] = f"preset {preset.name} reads no shared assets"
        if getattr(preset, "mini_hub", False):
            unused["data_dir"] = f"preset {preset.name} reads the Hub copies of the mini datasets (--dataset_ids)"
        if experiment.data_dir is not None:
            unused["dataset_ids"] = "--data_dir reads every dataset from its folders, not from the Hub"
    other_method = f"an option of another method than --method {method.name}"
    for group in (MoEAdaptersArguments, LoRAArguments, ConDUArguments):
        if group is not method.arguments_class:
            unused.update(dict.fromkeys((f.name for f in dataclasses.fields(group)), other_method))
    if not issubclass(method, MoEAdapters):
        unused.update(dict.fromkeys(ADAPTER_FIELDS, other_method))
    if not (issubclass(method, MoEAdapters) and ddas_args.ddas):
        ddas_options = [f.name for f in (*dataclasses.fields(DDASArguments), *dataclasses.fields(AdapterArguments))
                        if f.name.startswith("ddas_")]
        unused.update(dict.fromkeys(["ddas_reference", *ddas_options],
                                    "a DDAS option, and this run has no DDAS selector: that needs --ddas true and "
                                    "--method moe-adapters"))
    if experiment.resume:
        unused["overwrite_output_dir"] = "--resume continues the run in output_dir, which a new run would replace"
    if not (training.push_to_hub or experiment.hub_dry_run_dir):
        unused.update(dict.fromkeys(("hub_model_id", "hub_base_model", "hub_token", "hub_private_repo"),
                                    "nothing is published: that needs --push_to_hub true or --hub_dry_run_dir"))
    return unused


def hub_repo_id(training: ContinualTrainingArguments) -> str:
    """The Hub repo --push_to_hub (or its dry run) publishes to: --hub_model_id, else output_dir's name."""
    return training.hub_model_id or Path(training.output_dir).name


def dataset_ids_map(experiment: ExperimentArguments) -> Optional[dict[str, str]]:
    """--dataset_ids as {dataset: Hub id}; an entry that is not `name=owner/dataset`, names a dataset twice or
    names one this run does not read is refused."""
    if experiment.dataset_ids is None:
        return None
    preset = get_preset(experiment.preset)
    if isinstance(preset, ClassIncrementalPreset):
        datasets_read = [preset.dataset]
    else:
        datasets_read = experiment.tasks.split(",") if experiment.tasks else list(preset.tasks)
    hub_ids = {}
    for entry in experiment.dataset_ids.split(","):
        name, _, repo_id = entry.partition("=")
        if not name.strip() or not repo_id.strip():
            raise ValueError(f"--dataset_ids entry {entry!r} is not 'dataset=owner/name': give comma-separated "
                             "pairs, e.g. 'cifar100=my/cifar100,dtd=my/dtd'.")
        if name in hub_ids:
            raise ValueError(f"--dataset_ids names {name!r} twice; give one Hub copy per dataset.")
        if name not in datasets_read:
            raise ValueError(f"--dataset_ids names {name!r}, which this run does not read; its datasets are "
                             f"{', '.join(datasets_read)}.")
        hub_ids[name] = checked_hub_id(repo_id, f"--dataset_ids entry {name!r}:")
    return hub_ids


def check_run(experiment: ExperimentArguments, method_args: MethodArguments, ddas_args: DDASArguments,
              training: ContinualTrainingArguments, explicit: set[str], adapter_args: AdapterArguments,
              moe_args: MoEAdaptersArguments, condu_args: ConDUArguments) -> None:
    """Refuse, before anything is loaded or trained, options given that this run does not use, a malformed
    --dataset_ids, and a publication that would fail at the end (a repo id the Hub refuses, a dry-run folder that
    holds files)."""
    unused = unused_options(experiment, method_args, ddas_args, training, adapter_args, moe_args, condu_args)
    given = sorted(explicit & set(unused))
    if given:
        raise ValueError("Options this run does not use: " + "; ".join(f"--{name}, {unused[name]}" for name in given)
                         + f". Drop {'it' if len(given) == 1 else 'them'}; nothing is ignored silently.")
    dataset_ids_map(experiment)
    if training.push_to_hub or experiment.hub_dry_run_dir:
        checked_hub_id(hub_repo_id(training), "--hub_model_id (else output_dir's name)")
    dry_run = Path(experiment.hub_dry_run_dir) if experiment.hub_dry_run_dir else None
    if dry_run is not None and dry_run.is_symlink():
        raise ValueError(f"--hub_dry_run_dir {dry_run} is a symbolic link; give the folder itself or a new path.")
    if dry_run is not None and dry_run.exists() and (not dry_run.is_dir() or any(dry_run.iterdir())):
        raise ValueError(f"--hub_dry_run_dir {dry_run} exists and is not an empty folder; choose a new folder or "
                         "remove it first.")
    output = Path(training.output_dir).resolve()
    if dry_run is not None and (dry_run.resolve() == output or output in dry_run.resolve().parents):
        raise ValueError(f"--hub_dry_run_dir {dry_run} is output_dir or lies inside it, where the run writes its "
                         "checkpoints and reports; choose a folder outside output_dir.")
    try:  # missing assets are named by the data check
        assets = None if "assets_dir" in unused else assets_dir(experiment.assets_dir)
    except AssetsNotFoundError:
        assets = None
    for option, folder in (("--data_dir", experiment.data_dir), ("--assets_dir", assets)):
        if folder is not None and (output == Path(folder).resolve() or Path(folder).resolve() in output.parents):
            raise ValueError(f"--output_dir {training.output_dir} lies inside {folder} ({option}), which the run reads "
                             "its data from; choose an output_dir outside it.")


def setup_logging(training: ContinualTrainingArguments, explicit: set[str] = frozenset()) -> None:
    """The library's log at info on the main process, transformers and datasets at warning (their info is
    configuration dumps); --log_level (--log_level_replica on the other processes) sets all three."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    level = training.get_process_log_level()  # the option given, else transformers' own level (warning)
    logger.setLevel(logging.INFO if training.should_log and "log_level" not in explicit else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    # peft reads a deprecated transformers attribute while wrapping the model: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def base_model(experiment: ExperimentArguments) -> str:
    if experiment.model_name_or_path is not None:
        return experiment.model_name_or_path
    preset = get_preset(experiment.preset)
    if getattr(preset, "from_assets", False):
        return str(assets_dir(experiment.assets_dir) / PROXY_CLIP)
    return getattr(preset, "model", None) or HUB_CLIP


def reference_source(experiment: ExperimentArguments) -> str:
    if experiment.ddas_reference is not None:
        return experiment.ddas_reference
    offline = getattr(get_preset(experiment.preset), "from_assets", False)
    return str(assets_dir(experiment.assets_dir) / REFERENCE_IMAGES) if offline else TINY_IMAGENET


def reference_images(experiment: ExperimentArguments):
    source = reference_source(experiment)
    return load_from_disk(source) if Path(source).is_dir() else load_dataset(source, split="train")


def hub_dataset_ids(preset, experiment: ExperimentArguments, tasks, hub_ids) -> dict[str, str]:
    """Task name -> the Hub dataset it was read from (none for the assets' mini tasks or --data_dir folders)."""
    if experiment.data_dir or getattr(preset, "from_assets", False):
        return {}
    specs = MINI_HUB_DATASETS if getattr(preset, "mini_hub", False) else {**MTIL_DATASETS, **CIL_DATASETS}
    dataset = getattr(preset, "dataset", None)  # a class-incremental preset's one dataset
    chosen = {task.name: specs[dataset or task.name] for task in tasks}
    return {name: (hub_source(spec, (hub_ids or {}).get(spec.name)) or spec.hub).repo_id for name, spec in chosen.items()}


def main(argv: Optional[list[str]] = None):
    groups, training, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(training, explicit)
    experiment, method_args, adapter_args, moe_args, ddas_args, lora_args, condu_args = groups
    preset = get_preset(experiment.preset)
    adapter_args, moe_args, ddas_args, condu_args, training = apply_recipe(
        preset, (adapter_args, moe_args, ddas_args, condu_args, training), explicit)
    if "output_dir" not in explicit:  # not transformers' ./trainer_output: a folder per preset and method
        training.output_dir = f"runs/{preset.name}-{method_args.method}"
        logger.info("No --output_dir given: the run writes to %s", training.output_dir)
    try:
        check_run(experiment, method_args, ddas_args, training, explicit, adapter_args, moe_args, condu_args)
    except ValueError as error:
        full_parser().error(str(error))
    names = experiment.tasks.split(",") if experiment.tasks is not None else None
    if names is not None and not isinstance(preset, ClassIncrementalPreset):
        check_task_names(preset, names)  # before the recipe is printed: it must run as printed
    if experiment.print_recipe:
        resolved = {**dataclasses.asdict(experiment), **dataclasses.asdict(method_args),
                    **adapter_args.resolved()}  # the adapter's settings as it will have them
        for group in (moe_args, ddas_args, lora_args, condu_args):
            resolved.update(dataclasses.asdict(group))
        unused = unused_options(experiment, method_args, ddas_args, training, adapter_args, moe_args,
                                condu_args)  # left out: it can be fed back
        print(json.dumps({k: v for k, v in {**resolved, **training.to_dict()}.items() if k not in unused}, indent=1,
                         default=str))
        if not experiment.check_data:
            return
    hub_ids = dataset_ids_map(experiment)
    ddas = ddas_args.ddas and method_args.method == "moe-adapters"
    alexnet = ddas and adapter_args.selector_config().feature_extractor == "alexnet"
    # everything the run reads, checked before any of it is loaded: a missing item fails in seconds, not after hours
    check = check_data(preset, data_dir=experiment.data_dir, hub_ids=hub_ids, tasks=names,
                       assets=experiment.assets_dir, raise_on_error=False, model=base_model(experiment),
                       ddas_reference=reference_source(experiment) if ddas else None,
                       alexnet_weights=ddas_args.ddas_alexnet_weights if alexnet else None)
    if experiment.check_data or not check.ok:  # the tables; exits 1 naming each missing item and its fix
        print(check.markdown())
        if not check.ok:
            sys.exit(1)
        return
    logger.info("Data check of preset %r passed: %d dataset(s), %d other item(s) (--check_data prints the tables)",
                preset.name, len(check.rows), len(check.downloads))

    model_path = base_model(experiment)
    base = CLIPModel.from_pretrained(model_path, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(model_path)
    tasks = preset_tasks(preset, data_dir=experiment.data_dir, hub_ids=hub_ids, tasks=names, seed=training.seed,
                         assets=experiment.assets_dir)
    logger.info("preset %s, method %s, %d tasks: %s", preset.name, method_args.method, len(tasks),
                ", ".join(t.name for t in tasks))
    reference = reference_images(experiment) if ddas else None
    method, training = prepare_method(method_args, base, tasks, training,
                                      options=(moe_args, ddas_args, lora_args, condu_args, *adapter_args.configs()),
                                      reference_images=reference)
    # published at the end by hf_moe_cl.publishing: the Trainer would create the repo when built (even in a dry run)
    push, training.push_to_hub = training.push_to_hub, False
    trainer = ContinualTrainer(method=method, args=training, processing_class=processor)
    result = trainer.train_tasks(tasks, resume=experiment.resume)
    trainer.save_model()  # the final adapter (ConDU: its save) at the root, beside the task folders
    if not trainer.is_world_process_zero():
        return
    output = Path(training.output_dir)
    if isinstance(preset, ClassIncrementalPreset):
        steps = [result.accuracy_matrix[i][i] for i in range(len(tasks))]
        metrics = class_incremental_metrics(steps)
        write_json_atomic(output / "class_incremental.json", {"matrix": "oracle", "step_accuracy": steps,
                                                              "metrics": metrics})
        results = {"headline_matrix": "class_incremental", **{f"class_incremental_{k}": v for k, v in metrics.items()}}
    else:
        metrics = write_result_report(output, result, method_args.method)
        print((output / "metrics.md").read_text())
        results = result.all_results()
    trainer.save_metrics("all", results, combined=False)  # all_results.json
    if push or experiment.hub_dry_run_dir:
        where = push_to_hub(method, hub_repo_id(training), result, tasks=tasks, token=training.hub_token,
                            private=bool(training.hub_private_repo), dry_run_dir=experiment.hub_dry_run_dir,
                            base_model=experiment.hub_base_model or hub_id(model_path), training_args=training,
                            dataset_ids=hub_dataset_ids(preset, experiment, tasks, hub_ids))
        logger.info("%s %s", "Dry run of the upload written to" if experiment.hub_dry_run_dir else "Published to",
                    where)
    print(json.dumps({"method": method_args.method, "headline_matrix": result.headline, "metrics": metrics}))


def cli(argv: Optional[list[str]] = None):
    """`main`, with a refused run's message printed once, without a traceback (accelerate launch adds its own)."""
    try:
        main(argv)
    except (ValueError, AssetsNotFoundError) as error:  # what is wrong and what to do, without a traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
