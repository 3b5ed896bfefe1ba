"""Publishing a continual model: the method's folder (for MoE-Adapters the peft adapter with its DDAS selector) and its
model card (`hf_moe_cl.continual.card.model_card`), uploaded through huggingface_hub, or written to a local folder as
a dry run of exactly that upload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from transformers import TrainingArguments

from .continual.card import as_method, model_card
from .continual.methods import ContinualMethod
from .continual.result import ContinualResult
from .files import atomic_folder
from .options import check_option
from .legacy import moved_names
from .tuners.moe_lora.card import hub_id

__all__ = ["model_card", "push_to_hub"]
# the card's parts moved to hf_moe_cl.continual.card in 0.3 (ContinualTrainer.save_model writes the card too)
__getattr__ = moved_names(__name__, dict.fromkeys((
    "library_of", "base_model_of", "task_records", "eval_results", "base_license", "training_hyperparameters",
    "library_versions", "CITATIONS", "CARD_TRAINING_ARGUMENTS", "CARD_ADAPTER_SETTINGS", "LIBRARIES"),
    "hf_moe_cl.continual.card"))


def _write_folder(method: ContinualMethod, card: ModelCard, folder: Path, base_model: Optional[str]) -> None:
    """What is published: the method's saved folder (naming `base_model` as its base if given: an adapter's config,
    a ConDU save's header) and README.md (replacing the card peft writes)."""
    peft = isinstance(method.model, PeftModel)
    holder = next(iter(method.model.peft_config.values())) if peft else method.model
    field = "base_model_name_or_path" if peft else "name_or_path"
    recorded = getattr(holder, field, None)
    if base_model:
        setattr(holder, field, base_model)
    try:
        method.save(folder)
    finally:
        if base_model:
            setattr(holder, field, recorded)
    card.save(folder / "README.md")


def push_to_hub(method_or_model, repo_id: str, result: Optional[ContinualResult] = None, *,
                tasks: Optional[Sequence] = None, base_model: Optional[str] = None, private: bool = False,
                token: Optional[str] = None, dry_run_dir: Optional[str | Path] = None,
                training_args: Optional[TrainingArguments] = None, dataset_ids: Optional[dict[str, str]] = None,
                commit_message: str = "Upload continual CLIP (hf-moe-cl)") -> str:
    """Publish a continual method (or a bare model, e.g. a MoE-LoRA `PeftModel`) with its model card.

    The folder `method.save` writes and README.md are staged in a temporary folder and uploaded through
    `HfApi.create_repo` + `upload_folder`; returns the commit URL. With `dry_run_dir`, the same files are written
    there instead (a new or empty folder) and nothing is uploaded or created on the Hub; returns that folder.
    `result` adds the results; `tasks` (the `ContinualTask`s) name the classes when the model does not record them;
    `base_model` (the Hub id of the local copy training used) replaces the base model the model records, in the
    card and in the uploaded folder, so that loading the repo finds it; `training_args` and `dataset_ids` (task name
    -> Hub dataset id) go into the card (see `model_card`).
    """
    check_option("private", private, bool)
    check_option("commit_message", commit_message, str)
    if token is not None and not isinstance(token, (str, bool)):
        raise ValueError(f"token must be a Hugging Face token (a string), True (the saved login) or None, got "
                         f"{type(token).__name__}.")
    if base_model is not None and hub_id(base_model) is None:
        raise ValueError(f"base_model must be the Hub id of the base model (e.g. openai/clip-vit-base-patch16), not "
                         f"{base_model!r}: a published repo is loaded on it.")
    method = as_method(method_or_model)
    card_inputs = dict(result=result, tasks=tasks, base_model=base_model, training_args=training_args,
                       dataset_ids=dataset_ids)
    card = model_card(method_or_model, repo_id, **card_inputs)  # checks the ids before anything is written
    if dry_run_dir is not None:
        with atomic_folder(dry_run_dir, replace=False) as folder:
            _write_folder(method, card, folder, base_model)
        return str(dry_run_dir)
    api = HfApi(token=token)
    created = getattr(api.create_repo(repo_id, private=private, exist_ok=True), "repo_id", None)
    if isinstance(created, str) and created != repo_id:  # the Hub added the namespace (a stand-in HfApi may not)
        repo_id, card = created, model_card(method_or_model, created, **card_inputs)
    with tempfile.TemporaryDirectory() as folder:
        _write_folder(method, card, Path(folder), base_model)
        return str(api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message))
