"""The model card of a continual run (`model_card`, what it holds): `ContinualTrainer.save_model` writes it beside the
saved model; `hf_moe_cl.publishing.push_to_hub` uploads it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Optional, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel
from transformers import PreTrainedModel, TrainingArguments

from ..tuners.moe_lora import find_moe
from ..tuners.moe_lora.card import checked_hub_id, hub_id, peft_loading_code, task_line
from .methods import ContinualMethod, method_for_model
from .result import MATRIX_KINDS, MATRIX_TITLES, METRIC_LABELS, ContinualResult, markdown_text, matrix_label
from .result import matrix_summary, metrics_markdown
from .run_folder import jsonable


def as_method(method_or_model) -> ContinualMethod:
    return method_or_model if isinstance(method_or_model, ContinualMethod) else method_for_model(method_or_model)


def library_of(method: ContinualMethod) -> str:
    """What loads the folder `method.save` writes: peft (an adapter), transformers (a full model) or hf-moe-cl."""
    if isinstance(method.model, PeftModel):
        return "peft"
    if isinstance(method.model, PreTrainedModel) and type(method).save is ContinualMethod.save:
        return "transformers"
    return "hf-moe-cl"


def base_model_of(method: ContinualMethod) -> Optional[str]:
    """The name or path of the pretrained CLIP the method started from, if the model records it."""
    model = method.model
    if isinstance(model, PeftModel):
        return next(iter(model.peft_config.values())).base_model_name_or_path
    return getattr(model, "name_or_path", None) or None


def recorded_tasks(method: ContinualMethod) -> list[dict]:
    """The task records the model keeps, in order: a MoE-LoRA adapter's `task_info`, a ConDU store's tasks."""
    moe = find_moe(method.model)
    return [info for info in (moe.task_info if moe is not None else method.learned_tasks().values()) if info]


def task_records(method: ContinualMethod, result: Optional[ContinualResult] = None,
                 tasks: Optional[Sequence] = None) -> list[tuple[str, Optional[list[str]]]]:
    """(name, class names) of the learned tasks in order: the model's records (every task of a continued model, not
    only the last run's), else `tasks` (`ContinualTask`s), else the result's task names (class names unknown)."""
    recorded = recorded_tasks(method)
    if recorded:
        return [(info["name"], list(info.get("classnames") or [])) for info in recorded]
    if tasks is not None:
        return [(task.name, list(task.classnames)) for task in tasks]
    return [(name, None) for name in (result.task_names if result is not None else [])]


def eval_results(result: ContinualResult, dataset_ids: dict[str, str]) -> list[EvalResult]:
    """model-index entries: per matrix kind (the metric config) and per task (the dataset type: its Hub dataset id,
    else the task's name), the accuracy on that task after the last task."""
    return [EvalResult(task_type="image-classification", task_name="Continual image classification",
                       dataset_type=dataset_ids.get(name, name), dataset_name=name, metric_type="accuracy",
                       metric_value=round(value, 2), metric_config=kind,
                       metric_name=f"Accuracy after the last task ({kind} matrix: {MATRIX_TITLES[kind]})")
            for kind in MATRIX_KINDS if kind in result.matrices
            for name, value in zip(result.task_names, result.matrices[kind][-1]) if value is not None]


def base_license(base: Optional[str]) -> Optional[str]:
    """The license in the base model's card (its folder's README.md, or its Hub repo's), None when it says none or
    cannot be read."""
    source = Path(base) / "README.md" if base and Path(base).is_dir() else hub_id(base)
    if source is None:
        return None
    try:
        card = ModelCard.load(source)
    except (OSError, ValueError, HfHubHTTPError):  # no card, no such repo, offline
        return None
    return card.data.get("license")


# The training arguments a card lists (those a continual run of this library reads).
CARD_TRAINING_ARGUMENTS = ("max_steps", "num_train_epochs", "per_device_train_batch_size",
                           "gradient_accumulation_steps", "learning_rate", "task_learning_rates", "lr_scheduler_type",
                           "warmup_steps", "weight_decay", "label_smoothing_factor", "max_grad_norm", "optim", "seed",
                           "bf16", "fp16", "train_augmentation", "train_template")


def training_hyperparameters(method: Optional[ContinualMethod] = None,
                             args: Optional[TrainingArguments] = None) -> dict[str, Any]:
    """Flat `{name: value}` of a run's settings: the training arguments the library reads (with the number of
    processes) and the method's name and options (`method.fingerprint()` without the adapter config)."""
    values: dict[str, Any] = {}
    if args is not None:
        values.update({name: getattr(args, name) for name in CARD_TRAINING_ARGUMENTS if hasattr(args, name)})
        if args.max_steps != -1:
            values.pop("num_train_epochs", None)
        values["num_processes"] = args.world_size
    if method is not None:  # {"method": name, "arguments": {...}, "ddas": {...}}: option names are unique
        for key, value in method.fingerprint().items():
            if key == "adapter":  # {adapter name: its config}: the settings that size and route the experts
                values.update({name: setting for config in value.values() for name, setting in config.items()
                               if name in CARD_ADAPTER_SETTINGS})
            else:
                values.update(jsonable(value) if isinstance(value, dict) else {key: value})
    return {name: jsonable(value) for name, value in values.items()}  # options' enums as their values


CARD_ADAPTER_SETTINGS = ("num_experts", "top_k", "r", "expert_growth_threshold", "hide_frozen_experts", "noisy_gating",
                         "noisy_gating_eval")

LIBRARIES = ("hf-moe-cl", "transformers", "peft", "torch", "datasets", "huggingface_hub", "accelerate")


def library_versions() -> dict[str, str]:
    from .. import __version__

    versions = {"hf-moe-cl": __version__}
    for name in LIBRARIES[1:]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


CITATIONS = {
    "MoE-Adapters": """@inproceedings{yu2024boosting,
  title={Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters},
  author={Yu, Jiazuo and Zhuge, Yunzhi and Zhang, Lu and Hu, Ping and Wang, Dong and Lu, Huchuan and He, You},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={23219--23230},
  year={2024}
}""",
    "expert merging": """@article{park2024learning,
  title={Learning More Generalized Experts by Merging Experts in Mixture-of-Experts},
  author={Park, Sejik},
  journal={arXiv preprint arXiv:2405.11530},
  year={2024}
}""",
    "ConDU": """@article{gao2025enhanced,
  title={Enhanced Continual Learning of Vision-Language Models with Model Fusion},
  author={Gao, Haoyuan and Zhang, Zicong and Wei, Yuqi and Zhao, Linglan and Li, Guilin and Li, Yexin and Kong, Linghe
          and Huang, Weiran},
  journal={arXiv preprint arXiv:2503.10705},
  year={2025}
}""",
    "MTIL / ZSCL": """@inproceedings{zheng2023preventing,
  title={Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models},
  author={Zheng, Zangwei and Ma, Mingyuan and Wang, Kai and Qin, Ziheng and Yue, Xiangyu and You, Yang},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}""",
}


def _usage(method: ContinualMethod, library: str, location: str, base: Optional[str], local: bool) -> str:
    """Python that loads the model from `location`: a Hub repo id, or (`local`) the folder it was saved in."""
    base = base or "<the base CLIP>"
    if method.selects_routes:
        return (f'from PIL import Image\nfrom hf_moe_cl import TaskAgnosticClassifier\n\n'
                f"classifier = TaskAgnosticClassifier.from_pretrained({location!r})  # on the base CLIP it names\n"
                'predictions = classifier([Image.open("photo.jpg")], candidate_labels=["cat", "dog"])\n'
                "# one {'label', 'score', 'task'} per image: 'task' is the learned task the image was routed to, or "
                "None (zero-shot CLIP among candidate_labels)")
    if library == "peft":
        return peft_loading_code(base, location)
    if library == "transformers":
        return f"from transformers import CLIPModel\n\nmodel = CLIPModel.from_pretrained({location!r})"
    folder = repr(location) if local else f"snapshot_download({location!r})"
    return (("" if local else "from huggingface_hub import snapshot_download\n")
            + f"from transformers import CLIPModel\nfrom hf_moe_cl.continual.methods import get_method\n\n"
            f"method = get_method({method.name!r}).from_base(CLIPModel.from_pretrained({base!r}))\n"
            f"method.load({folder})")


def model_card(method_or_model, repo_id: Optional[str] = None, result: Optional[ContinualResult] = None,
               tasks: Optional[Sequence] = None, base_model: Optional[str] = None,
               training_args: Optional[TrainingArguments] = None,
               dataset_ids: Optional[dict[str, str]] = None, local_dir: Optional[str | Path] = None) -> ModelCard:
    """The card of a continual model: metadata (base model and its license, library, tags, datasets, model-index
    from `result`), how to load and use it from `repo_id`, the tasks with their classes, every matrix's metrics and
    forgetting, the training hyperparameters (`training_args` and the method's options), library versions and
    citations. `dataset_ids` maps task names to the Hub datasets they were read from (the card's `datasets` and the
    model-index's dataset types); `base_model` names the Hub base model when training used a local copy. Without
    `repo_id`, the card is that of the folder `local_dir` (its name, and loading code that reads it)."""
    method = as_method(method_or_model)
    library, base = library_of(method), base_model or base_model_of(method)
    records = task_records(method, result, tasks)
    if (repo_id is None) == (local_dir is None):
        raise ValueError("A model card is for a Hub repo (repo_id=...) or a local folder (local_dir=...): give one.")
    location = checked_hub_id(repo_id) if repo_id is not None else str(local_dir)
    dataset_ids = {task: checked_hub_id(dataset, f"The dataset id of {task!r}")
                   for task, dataset in (dataset_ids or {}).items()}
    learned = [info["name"] for info in recorded_tasks(method)]
    known = learned or [task for task, _ in records]
    for argument, names in (("result", result.task_names if result is not None and learned else []),
                            ("tasks", [task.name for task in tasks or []] if learned else []),
                            ("dataset_ids", dataset_ids)):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"`{argument}` names task(s) {unknown} that are not this model's (it learned {known}): "
                             "the card would describe another run. Pass those of this model's run.")
    given = [(task.name, list(task.classnames)) for task in tasks or []]  # `records` are the model's when learned
    if learned and given and given != records[-len(given):]:
        raise ValueError(f"`tasks` {[name for name, _ in given]} are not the last task(s) this model learned, in "
                         f"order and with their class names ({[name for name, _ in records[-len(given):]]}): the card "
                         "would describe another run. Pass the run's tasks as it trained them, or none (the model "
                         "records them).")
    name = repo_id.split("/")[-1] if repo_id is not None else Path(local_dir).resolve().name
    license_ = base_license(base)
    # no pipeline_tag: the Hub's zero-shot-image-classification widget and pipeline would load the base CLIP alone
    data = ModelCardData(
        base_model=hub_id(base), library_name=library, model_name=name, license=license_ or "unknown",
        datasets=sorted(set(dataset_ids.values())) or None,
        tags=["hf-moe-cl", "continual-learning", "clip", method.name] + (["task-agnostic"] if method.selects_routes
                                                                         else []),
        eval_results=(eval_results(result, dataset_ids) or None) if result is not None else None,
    )
    lines = [f"# {markdown_text(name)}", "",
             f"CLIP continually trained on {len(records)} tasks in order with hf-moe-cl, method "
             f"`{method.name}`, from {markdown_text(base or 'an unrecorded base model')}."]
    if (moe := find_moe(method.model)) is not None:
        config = moe.moe_config
        lines[-1] += (f" {config.num_experts} experts of rank {config.r}, top-{config.top_k} routing, "
                      f"{config.num_tasks} task routers; "
                      + ("a DDAS selector, stored in the adapter's weights, picks the router of each image."
                         if moe.selector is not None else "no DDAS selector: pass the task id."))
    if result is not None and result.matrices.get(result.headline):
        kind = result.headline
        metrics, _ = matrix_summary(list(result.task_names), result.matrices[kind])
        if metrics:
            lines += ["", f"Headline, from the `{kind}` matrix ({MATRIX_TITLES[kind]}): "
                      + ", ".join(f"{METRIC_LABELS[m]} {v:.1f}" for m, v in metrics.items()) + "."]
    if hub_id(base) is None:
        lines += ["", "The base model was a local copy: loading this repository needs it at the same path, or pass "
                  "the base model's Hub id when publishing (`base_model=`, `--hub_base_model`)."]
    lines += ["", f"License: {license_ or 'unknown (the base model card names none; check the base model terms)'}."]
    lines += ["", "## Usage", "", "```python", _usage(method, library, location, base, repo_id is None), "```"]
    if method.selects_routes:
        lines += ["", '`import hf_moe_cl` also registers `pipeline("task-agnostic-image-classification", '
                  f"model={location!r})`, which answers the same way."]
    lines += ["", "## Tasks", ""]
    for index, (task, classnames) in enumerate(records):
        source = f" [`{dataset_ids[task]}`](https://huggingface.co/datasets/{dataset_ids[task]})" \
            if task in dataset_ids else ""
        lines.append(task_line(index, task, classnames, source))
    if result is not None:
        names = list(result.task_names)
        rows = {f"{kind}: {MATRIX_TITLES[kind]}": matrix_summary(names, result.matrices[kind])
                for kind in MATRIX_KINDS if kind in result.matrices}
        lines += ["", "## Results", "", "Accuracy (%) on each task's evaluation split, one row per matrix (the "
                  "model-index lists each task's accuracy after the last task, per matrix); Transfer / Average / Last "
                  "as ZSCL and MoE-Adapters define them, BWT = backward transfer (negative: forgetting). The headline "
                  f"is the {matrix_label(result.headline)}.", "",
                  metrics_markdown(rows, names, "matrix")]
    options = method if isinstance(method_or_model, ContinualMethod) else None  # a bare model: its options unknown
    hyperparameters = training_hyperparameters(options, training_args)
    if hyperparameters:
        lines += ["", "## Training hyperparameters", "", "| hyperparameter | value |", "| --- | --- |"]
        lines += [f"| {markdown_text(k)} | {markdown_text(v)} |" for k, v in hyperparameters.items()]
    lines += ["", "## Framework versions", ""] + [f"- {k} {v}" for k, v in library_versions().items()]
    lines += ["", "## Citation", ""]
    for paper, bibtex in CITATIONS.items():
        lines += [f"{paper}:", "", "```bibtex", bibtex, "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
