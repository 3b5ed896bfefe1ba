"""Publishing a continual model: adapter, DDAS selector and a model card, through huggingface_hub's upload API."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi

from .tuners.moe_lora import find_moe


def model_card(model, metrics: Optional[dict[str, float]] = None) -> str:
    """A README.md that lists the tasks in order, their class names and the measured metrics."""
    moe = find_moe(model)
    config = moe.moe_config
    lines = ["---", "library_name: peft", "tags:", "- hf-moe-cl", "- continual-learning", "- clip", "---", "",
             "# Continual CLIP with MoE-LoRA adapters (hf-moe-cl)", "",
             f"Base model: `{config.base_model_name_or_path}`. {config.num_experts} experts of rank {config.r}, "
             f"top-{config.top_k} routing, {config.num_tasks} task routers. "
             + ("A DDAS selector, saved in the adapter's weights, picks the router per image."
                if moe.selector is not None else "No DDAS selector: pass the task id."), "",
             "```python", "import hf_moe_cl", "from peft import PeftModel",
             "model = PeftModel.from_pretrained(clip, REPO_ID)", "```", "", "## Tasks", ""]
    for index, info in enumerate(config.task_info or []):
        if info:
            lines.append(f"{index}. **{info['name']}** ({len(info['classnames'])} classes): "
                         + ", ".join(info["classnames"]))
    if metrics:
        lines += ["", "## Measured metrics", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.2f} |" for name, value in metrics.items()]
    return "\n".join(lines) + "\n"


def upload_folder(save, repo_id: str, card: str, private: bool = False, token: Optional[str] = None,
                  commit_message: str = "Upload continual CLIP") -> str:
    """`save(folder)` writes the files; they and the model card go up through huggingface_hub's upload API."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        (Path(folder) / "README.md").write_text(card)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
    return str(info)


def push_to_hub(model, repo_id: str, metrics: Optional[dict[str, float]] = None, **kwargs) -> str:
    """Upload a MoE-LoRA adapter with its DDAS selector and a model card; returns the commit URL."""
    return upload_folder(model.save_pretrained, repo_id, model_card(model, metrics), **kwargs)
