import json
import os
import subprocess
import sys

import pytest

from hf_moe_cl.benchmark.experiment import MethodArguments, run_method
from hf_moe_cl.continual import ContinualTrainingArguments

from conftest import colour_task, tiny_clip, tiny_clip_processor, write_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(tmp_path):
    return ContinualTrainingArguments(output_dir=str(tmp_path), max_steps=2, warmup_steps=1, learning_rate=1e-3,
                                      use_cpu=True, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                                      disable_tqdm=True, logging_strategy="no", report_to="none")


def test_zero_shot_and_individual_matrices_have_the_baseline_shape(tmp_path, clip_processor):
    tasks = [colour_task("a", seed=0), colour_task("b", seed=1, offset=2), colour_task("c", seed=2, offset=4)]
    base = tiny_clip()
    zero = run_method(MethodArguments(method="zero-shot"), base, clip_processor, tasks, args_for(tmp_path / "z"))
    assert all(row == zero.accuracy_matrix[0] for row in zero.accuracy_matrix)
    individual = run_method(MethodArguments(method="individual-finetune"), base, clip_processor, tasks,
                            args_for(tmp_path / "i"))
    m, z = individual.accuracy_matrix, zero.accuracy_matrix[0]
    for i in range(3):
        for j in range(3):
            assert m[i][j] == (m[j][j] if j <= i else z[j])
    assert (tmp_path / "i" / "task-01-b" / "model.safetensors").is_file()


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown method"):
        MethodArguments(method="ewc")


def test_example_script_runs_the_mini_preset_end_to_end(tmp_path):
    model_dir = tmp_path / "model"
    tiny_clip().save_pretrained(model_dir)
    tiny_clip_processor(write_tiny_tokenizer(tmp_path)).save_pretrained(model_dir)
    config = {"preset": "mini", "tasks": "mnist,dtd", "model_name_or_path": str(model_dir), "steps_per_task": 2,
              "method": "moe-adapters", "num_experts": 4, "rank": 4, "output_dir": str(tmp_path / "out"),
              "use_cpu": True, "per_device_eval_batch_size": 500, "warmup_steps": 1, "disable_tqdm": True,
              "report_to": "none"}
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "mtil.py"), str(config_file)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["method"] == "moe-adapters" and set(summary) == {"method", "transfer", "average", "last"}
    for name in ("accuracy_matrix.json", "accuracy_matrix.csv", "metrics.md", "accuracy_matrix.png"):
        assert (tmp_path / "out" / name).is_file()
    assert (tmp_path / "out" / "task-01-dtd" / "adapter_model.safetensors").is_file()
