"""A MoE-LoRA model under transformers' plain `Trainer`: its `task_ids` column survives the Trainer's column
removal (the wrapped model's forward names it), so each row trains its own task, even when a task was chosen
with `set_task`."""

import inspect

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from conftest import TEXT_VOCAB, moe_model


class ContrastiveTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, return_loss=True)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def rows_of_two_tasks(rows=16):
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "pixel_values": torch.randn(rows, 3, 16, 16, generator=generator).tolist(),
        "input_ids": torch.randint(0, TEXT_VOCAB - 2, (rows, 6), generator=generator).tolist(),
        "task_ids": [i % 2 for i in range(rows)],
    }).with_format("torch")


@pytest.mark.parametrize("chosen", [None, 1])
def test_the_task_ids_column_survives_the_trainers_column_removal(tmp_path, chosen):
    """With the Trainer's default `remove_unused_columns=True`: before 0.3 the column was dropped and, with a task
    chosen by set_task, every row trained that task (selection counts [0, 128])."""
    model = moe_model()
    if chosen is not None:
        model.set_task(chosen)
    assert "task_ids" in inspect.signature(model.get_base_model().forward).parameters
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", learning_rate=1e-2, disable_tqdm=True, save_strategy="no")
    ContrastiveTrainer(model=model, args=args, train_dataset=rows_of_two_tasks()).train()
    counts = model.base_model.selection_counts()
    assert all(int(c[0].sum()) > 0 and int(c[1].sum()) > 0 for c in counts.values())


def test_rows_without_a_task_and_no_task_chosen_are_refused(tmp_path):
    model = moe_model()
    data = rows_of_two_tasks().remove_columns("task_ids")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_strategy="no")
    with pytest.raises(ValueError, match="no route was chosen for this call"):
        ContrastiveTrainer(model=model, args=args, train_dataset=data).train()


def test_unload_gives_back_the_models_own_forward():
    model = moe_model()
    base = model.base_model.unload()
    assert "forward" not in base.__dict__ and "task_ids" not in inspect.signature(base.forward).parameters
