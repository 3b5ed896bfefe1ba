"""Runs three tiny tasks with MoE-Adapters + DDAS and dumps the matrices and adapter weights; can kill itself
(SIGKILL) at a chosen point, to test that a resumed run equals an uninterrupted one.

    python tests/continual_worker.py OUT [--resume] [--kill train:TASK:STEP | save:TASK | progress:TASK]
"""

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_moe_cl.files  # noqa: E402
from conftest import colour_task, tiny_clip, tiny_clip_processor, write_tiny_tokenizer  # noqa: E402
from hf_moe_cl import ContinualTrainer, ContinualTrainingArguments, MoELoraConfig  # noqa: E402
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters  # noqa: E402

TASKS = ["first", "second", "third"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringTraining(TrainerCallback):
    def __init__(self, trainer, task, step):
        self.trainer, self.task, self.step = trainer, task, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.current_task.name == TASKS[self.task] and state.global_step == self.step:
            die()


def kill_on_rename(ending):
    """SIGKILL when an atomic write is about to rename its finished temporary file or folder to a path ending so."""
    real_replace = os.replace

    def replace(source, destination):
        if str(destination).endswith(ending):
            die()
        real_replace(source, destination)

    hf_moe_cl.files.os.replace = replace


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill", default=None)
    options = parser.parse_args()
    processor = tiny_clip_processor(write_tiny_tokenizer(Path(tempfile.mkdtemp())))
    rng = np.random.default_rng(0)
    reference = Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
                                             for _ in range(40)]})
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=3, num_experts=4, r=4))
    method = MoEAdapters(model, ddas=DDASArguments(ddas=True, ddas_task_steps=40, ddas_reference_steps=40,
                                                   ddas_hidden_dim=8), ddas_reference=reference)
    args = ContinualTrainingArguments(
        output_dir=os.path.join(options.out, "run"), max_steps=4, warmup_steps=1, learning_rate=5e-3, use_cpu=True,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, report_to="none", disable_tqdm=True,
        logging_strategy="no", seed=7,
    )
    trainer = ContinualTrainer(method=method, args=args, processing_class=processor)
    if options.kill:
        kind, task, *step = options.kill.split(":")
        folder = f"task-{int(task):02d}-{TASKS[int(task)]}"
        if kind == "train":
            trainer.add_callback(KillDuringTraining(trainer, int(task), int(step[0])))
        elif kind == "save":
            kill_on_rename(folder)
        elif kind == "progress":
            kill_on_rename(f"{folder}/continual_progress.json")
    tasks = [colour_task(name, seed=i, offset=i) for i, name in enumerate(TASKS)]
    result = trainer.train_tasks(tasks, resume=options.resume)
    with open(os.path.join(options.out, "summary.json"), "w") as handle:
        json.dump({"matrices": result.matrices, "diagnostics": result.diagnostics}, handle)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "moe_lora_" in k},
              os.path.join(options.out, "weights.safetensors"))


if __name__ == "__main__":
    main()
