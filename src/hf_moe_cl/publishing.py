"""Publishing a continual model: the method's folder (for MoE-Adapters the peft adapter with its DDAS selector) and a
model card (`huggingface_hub.ModelCard`: base model, library, tags, the tasks, model-index results), uploaded
through huggingface_hub, or written to a local folder as a dry run of exactly that upload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from peft import PeftModel
from transformers import PreTrainedModel

from .experiments.figures import METRIC_LABELS
from .experiments.reporting import matrix_label, matrix_summary, metrics_markdown
from .continual.methods import ContinualMethod, method_for_model
from .continual.result import MATRIX_KINDS, MATRIX_TITLES, ContinualResult
from .files import atomic_folder
from .tuners.moe_lora import find_moe
from .tuners.moe_lora.card import hub_id

def _as_method(method_or_model) -> ContinualMethod:
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


def task_records(method: ContinualMethod, result: Optional[ContinualResult] = None,
                 tasks: Optional[Sequence] = None) -> list[tuple[str, Optional[list[str]]]]:
    """(name, class names) of the learned tasks in order: from `tasks` (`ContinualTask`s), else the adapter's
    `task_info`, else the result's task names (class names unknown)."""
    if tasks is not None:
        return [(task.name, list(task.classnames)) for task in tasks]
    moe = find_moe(method.model)
    if moe is not None and any(moe.task_info or []):
        return [(info["name"], list(info.get("classnames") or [])) for info in moe.task_info if info]
    return [(name, None) for name in (result.task_names if result is not None else [])]


def eval_results(result: ContinualResult) -> list[EvalResult]:
    """Transfer / Average / Last / BWT of every matrix kind as model-index entries; the kind is the metric config."""
    names = list(result.task_names)
    entries = []
    for kind in [k for k in MATRIX_KINDS if k in result.matrices]:
        metrics, lost = matrix_summary(names, result.matrices[kind])
        values = {**metrics, **({"bwt": lost["bwt"]} if lost else {})}
        for metric, value in values.items():
            entries.append(EvalResult(
                task_type="image-classification", task_name="Continual image classification",
                dataset_type="continual-task-sequence", dataset_name=f"{len(names)} tasks in order: {', '.join(names)}",
                metric_type=metric, metric_value=round(value, 2), metric_config=kind,
                metric_name=f"{METRIC_LABELS[metric]} ({kind})",
            ))
    return entries


def _usage(method: ContinualMethod, library: str, repo_id: str, base: Optional[str]) -> str:
    base = base or "<the base CLIP>"
    if library == "peft" and method.selects_routes:
        return (f'import hf_moe_cl\nfrom transformers import pipeline\n\nclassifier = pipeline('
                f'"task-agnostic-image-classification", model="{repo_id}")\n'
                'classifier("photo.jpg", candidate_labels=["cat", "dog"])  # labels for images of no learned task')
    if library == "peft":
        return (f"import hf_moe_cl  # registers the MoE-LoRA method with peft\nfrom peft import PeftModel\n"
                f"from transformers import CLIPModel\n\nmodel = PeftModel.from_pretrained("
                f'CLIPModel.from_pretrained("{base}"), "{repo_id}")')
    if library == "transformers":
        return f'from transformers import CLIPModel\n\nmodel = CLIPModel.from_pretrained("{repo_id}")'
    return (f"from huggingface_hub import snapshot_download\nfrom transformers import CLIPModel\n"
            f"from hf_moe_cl.continual.methods import get_method\n\n"
            f'method = get_method("{method.name}").from_base(CLIPModel.from_pretrained("{base}"))\n'
            f'method.load(snapshot_download("{repo_id}"))')


def model_card(method_or_model, repo_id: str, result: Optional[ContinualResult] = None,
               tasks: Optional[Sequence] = None, base_model: Optional[str] = None) -> ModelCard:
    """The card of a continual model: metadata (base model, library, tags, model-index from `result`), how to load
    it from `repo_id`, the tasks with their classes, and every matrix's metrics and forgetting."""
    method = _as_method(method_or_model)
    library, base = library_of(method), base_model or base_model_of(method)
    records = task_records(method, result, tasks)
    name = repo_id.split("/")[-1]
    # no pipeline_tag: the Hub's zero-shot-image-classification widget and pipeline would load the base CLIP alone
    data = ModelCardData(
        base_model=hub_id(base), library_name=library, model_name=name,
        tags=["hf-moe-cl", "continual-learning", "clip", method.name] + (["task-agnostic"] if method.selects_routes
                                                                         else []),
        eval_results=eval_results(result) if result is not None else None,
    )
    lines = [f"# {name}", "",
             f"CLIP continually trained on {len(records)} tasks in order with hf-moe-cl, method "
             f"`{method.name}`, from `{base or 'an unrecorded base model'}`."]
    moe = find_moe(method.model)
    if moe is not None:
        config = moe.moe_config
        lines[-1] += (f" {config.num_experts} experts of rank {config.r}, top-{config.top_k} routing, "
                      f"{config.num_tasks} task routers; "
                      + ("a DDAS selector, stored in the adapter's weights, picks the router of each image."
                         if moe.selector is not None else "no DDAS selector: pass the task id."))
    lines += ["", "## Usage", "", "```python", _usage(method, library, repo_id, base), "```", "", "## Tasks", ""]
    for index, (task, classnames) in enumerate(records):
        lines.append(f"{index}. **{task}**" + ("" if classnames is None else
                                               f" ({len(classnames)} classes): " + ", ".join(classnames)))
    if result is not None:
        names = list(result.task_names)
        rows = {f"{kind}: {MATRIX_TITLES[kind]}": matrix_summary(names, result.matrices[kind])
                for kind in MATRIX_KINDS if kind in result.matrices}
        lines += ["", "## Results", "", "Accuracy (%) on each task's evaluation split; Transfer / Average / Last as "
                  "ZSCL and MoE-Adapters define them, BWT = backward transfer (negative: forgetting). Each row names "
                  f"its matrix; the headline is the {matrix_label(result.headline)}.", "",
                  metrics_markdown(rows, names, "matrix")]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _write_folder(method: ContinualMethod, card: ModelCard, folder: Path, base_model: Optional[str]) -> None:
    """What is published: the method's saved folder (an adapter config naming `base_model` if given) and README.md
    (replacing the card peft writes)."""
    config = next(iter(method.model.peft_config.values())) if isinstance(method.model, PeftModel) else None
    recorded = config.base_model_name_or_path if config is not None else None
    if config is not None and base_model:
        config.base_model_name_or_path = base_model
    try:
        method.save(folder)
    finally:
        if config is not None:
            config.base_model_name_or_path = recorded
    card.save(folder / "README.md")


def push_to_hub(method_or_model, repo_id: str, result: Optional[ContinualResult] = None, *,
                tasks: Optional[Sequence] = None, base_model: Optional[str] = None, private: bool = False,
                token: Optional[str] = None, dry_run_dir: Optional[str | Path] = None,
                commit_message: str = "Upload continual CLIP (hf-moe-cl)") -> str:
    """Publish a continual method (or a bare model, e.g. a MoE-LoRA `PeftModel`) with its model card.

    The folder `method.save` writes and README.md are staged in a temporary folder and uploaded through
    `HfApi.create_repo` + `upload_folder`; returns the commit URL. With `dry_run_dir`, the same files are written
    there instead (a new or empty folder) and nothing is uploaded; returns that folder. `result` adds the
    model-index results; `tasks` (the `ContinualTask`s) name the classes when the model does not record them;
    `base_model` (e.g. the Hub id of the local copy training used) replaces the base model the model records, in
    the card and in an uploaded adapter's config, so that loading the repo finds it.
    """
    method = _as_method(method_or_model)
    if dry_run_dir is not None:
        card = model_card(method, repo_id, result, tasks, base_model)
        with atomic_folder(dry_run_dir, replace=False) as folder:
            _write_folder(method, card, folder, base_model)
        return str(dry_run_dir)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = model_card(method, repo_id, result, tasks, base_model)
    with tempfile.TemporaryDirectory() as folder:
        _write_folder(method, card, Path(folder), base_model)
        return str(api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message))
