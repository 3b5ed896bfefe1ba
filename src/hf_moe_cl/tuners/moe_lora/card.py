"""The README.md saved beside every MoE-LoRA adapter: peft's metadata, and how to load it instead of peft's template.

peft writes its generic template (with a local `base_model` path when the base was loaded from disk) before the
adapter config; `MoELoraConfig.save_pretrained` then replaces the template's text with this short card. A card the
user wrote (`publishing.model_card`) is replaced by the publishing code afterwards, as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .peft_type import IMPORT_HINT

PEFT_TEMPLATE_MARK = "<!-- Provide a quick summary of what the model is/does. -->"


def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` if it can be a Hub repo id (a card's `base_model` must be one), None for a local path."""
    try:
        return None if not name or Path(name).exists() or os.path.isabs(name) else checked_hub_id(name)
    except ValueError:
        return None


def checked_hub_id(repo_id, what: str = "repo_id") -> str:
    """`repo_id` if the Hub accepts it (huggingface_hub's own validator), else a ValueError naming it and the fix."""
    try:
        validate_repo_id(repo_id)
    except (HFValidationError, TypeError) as error:
        raise ValueError(f"{what} {repo_id!r} is not a Hub repo id ({error}); give 'name' or 'namespace/name' of "
                         "letters, digits, '-', '_' and '.'.") from None
    return repo_id


def peft_loading_code(base: Optional[str], location: str) -> str:
    """Python that loads a MoE-LoRA adapter from `location` with peft, on the base CLIP `base` when it is a Hub id."""
    base_model = f"CLIPModel.from_pretrained({base!r})" if hub_id(base) else "CLIPModel.from_pretrained(<base CLIP>)"
    return ("import hf_moe_cl  # registers MoE-LoRA with peft\nfrom peft import PeftModel\n"
            f"from transformers import CLIPModel\n\nmodel = PeftModel.from_pretrained({base_model}, {location!r})\n"
            "model.set_task(0)  # the task of the images; or task_ids=..., or hf_moe_cl.TaskAgnosticClassifier")


def markdown_text(value) -> str:
    """A name as literal Markdown on one line: control characters (newlines) become spaces, markup is escaped."""
    return re.sub(r"([\\`*\[\]<>#|~])", r"\\\1", re.sub(r"[\x00-\x1f\x7f]", " ", str(value)))


def task_line(index: int, name: str, classnames: Optional[list], source: str = "") -> str:
    """A card's line for a learned task: `0. **name**<source> (3 classes): a, b, c` (no classes when unknown)."""
    line = f"{index}. **{markdown_text(name)}**{source}"
    if classnames is None:
        return line
    return f"{line} ({len(classnames)} classes): " + ", ".join(map(markdown_text, classnames))


def tidy_peft_card(folder: str, base: Optional[str], task_info: Optional[list] = None) -> None:
    """Replace peft's template in `folder`/README.md by the adapter card (base model, how to load it, the tasks of
    `task_info`); drop a `base_model` (and its tag) that is a local path."""
    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else None
    if card is None or PEFT_TEMPLATE_MARK not in card.text:
        return
    versions = card.text[card.text.find("### Framework versions"):] if "### Framework versions" in card.text else ""
    if card.data.get("base_model") is not None and hub_id(card.data.get("base_model")) is None:
        card.data.base_model = None
    tags = [tag for tag in card.data.get("tags") or []
            if not tag.startswith("base_model:") or hub_id(tag.rsplit(":", 1)[-1])]
    card.data.tags = sorted(set(tags) | {"hf-moe-cl", "moe-lora"})
    tasks = [info for info in task_info or [] if info]
    base_line = markdown_text(hub_id(base) or "a local copy or none recorded (not a Hub id)")
    lines = ["# MoE-LoRA adapter (hf-moe-cl)", "", f"Base model: {base_line}.", "",
             IMPORT_HINT, "", "```python", peft_loading_code(base, "<this folder or repo>"), "```", ""]
    if tasks:  # the tasks its routers learned
        lines += ["## Tasks", "", "The task routers in order (task id: name, classes):", ""]
        lines += [task_line(index, info["name"], info.get("classnames") or []) for index, info in enumerate(tasks)]
        lines += ["", "Results are in the card `ContinualTrainer.save_model` and `hf_moe_cl.publishing.push_to_hub` "
                  "write, from the run's accuracy matrices.", ""]
    card.text = "\n".join(lines) + ("\n" + versions if versions else "")
    card.save(path)


def drop_peft_template(folder: str | os.PathLike) -> None:
    """Delete peft's generic README template from a saved adapter folder (another peft method's: it would name a local
    base model path); the published card is written by `publishing.model_card`."""
    path = Path(folder) / "README.md"
    if path.is_file() and PEFT_TEMPLATE_MARK in path.read_text(encoding="utf-8"):
        path.unlink()
