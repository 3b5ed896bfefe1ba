import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import CLIPModel

from hf_moe_cl.experiments.experiment import MethodArguments, run_method
from hf_moe_cl.continual import ContinualTrainingArguments

from conftest import (colour_task, continual_args, tasks_named, tiny_clip, tiny_clip_config,
                      tiny_clip_processor, write_tiny_tokenizer)

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


def example(*argv, timeout=600):
    """The example's run; its output decoded with carriage returns kept (a progress bar's updates share a line)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "mtil.py"), *map(str, argv)],
                            capture_output=True, timeout=timeout)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def tiny_model_folder(tmp_path):
    """A tiny CLIP and its processor saved together, with 48 text positions so prompts of real class names fit (as
    in CLIP's 77 tokens)."""
    model_dir = tmp_path / "model"
    config = tiny_clip_config()
    config.text_config.max_position_embeddings = 48
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer_dir = write_tiny_tokenizer(tmp_path)
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 48}))
    tiny_clip_processor(tokenizer_dir).save_pretrained(model_dir)
    return model_dir


def test_example_script_runs_the_mini_preset_end_to_end(tmp_path):
    """A YAML config overridden on the command line; --max_steps honoured over the preset's 200; the report, the
    task checkpoints, the library's log and a dry run of --push_to_hub."""
    model_dir = tiny_model_folder(tmp_path)
    config = {"preset": "mini", "tasks": "mnist,dtd", "model_name_or_path": str(model_dir), "max_steps": 50,
              "method": "moe-adapters", "num_experts": 4, "rank": 4, "output_dir": str(tmp_path / "out"),
              "use_cpu": True, "per_device_eval_batch_size": 500, "warmup_steps": 1, "report_to": "none",
              "check_images": False}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = example(config_file, "--max_steps", 3, "--hub_dry_run_dir", tmp_path / "upload")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["method"] == "moe-adapters" and set(summary["metrics"]["oracle"]) >= {"transfer", "average", "last",
                                                                                       "bwt"}
    out = tmp_path / "out"
    for name in ("metrics.md", "oracle/accuracy_matrix.json", "oracle/accuracy_matrix.csv",
                 "oracle/accuracy_matrix.png"):
        assert (out / name).is_file(), name
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}  # final adapter
    assert (out / "adapter_model.safetensors").read_bytes() == (out / "task-01-dtd" /
                                                               "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "all_results.json").read_text()) == {
        "headline_matrix": "oracle", **{f"oracle_{k}": v for k, v in summary["metrics"]["oracle"].items()}}
    progress = json.loads((out / "task-01-dtd" / "continual_progress.json").read_text())
    assert progress["steps_done"] == 6  # 3 steps per task (the command line), not 50 (YAML) or 200 (the preset)
    assert "task 1/2: mnist" in result.stderr and "task 2/2: dtd" in result.stderr
    # fits on one screen: no configuration dumps; the preset's values once, in one line
    output = result.stdout + result.stderr
    assert output.count("\n") <= 40, output  # lines as a terminal shows them (progress updates overwrite theirs)
    assert "Model config" not in output and "***** Running training *****" not in output
    preset_lines = [line for line in output.splitlines() if "Preset mini sets" in line]
    assert len(preset_lines) == 1 and "per_device_train_batch_size=64" in preset_lines[0] and \
        "keeps your max_steps, per_device_eval_batch_size, warmup_steps." in preset_lines[0]
    uploaded = {p.name for p in (tmp_path / "upload").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= uploaded
    assert "mnist" in (tmp_path / "upload" / "README.md").read_text()


def test_example_script_help_refusals_and_data_check(tmp_path):
    short = example("--help")
    assert short.returncode == 0 and short.stdout.index("--preset") < short.stdout.index("--help_all")
    assert len(short.stdout.splitlines()) < 260 and "--per_device_train_batch_size PER_DEVICE" not in short.stdout
    full = example("--help_all")
    assert "--per_device_train_batch_size" in full.stdout and len(full.stdout.splitlines()) > 400
    refused = example("--output_dir", tmp_path, "--resume_from_checkpoint", "x")
    assert refused.returncode == 2 and "--resume_from_checkpoint is not used by this script: use --resume" in \
        refused.stderr
    checked = example("--preset", "mini", "--tasks", "mnist,dtd", "--check_data", "--output_dir", tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "mnist" in checked.stdout and "dtd" in checked.stdout and "|" in checked.stdout
    assert "proxy-clip | local folder |" in checked.stdout and "DDAS reference" not in checked.stdout


def test_example_log_level_sets_the_library_logger(tmp_path):
    import importlib.util
    import logging

    spec = importlib.util.spec_from_file_location("mtil_example", os.path.join(REPO, "examples", "mtil.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    library = logging.getLogger("hf_moe_cl")
    before = library.level
    try:
        groups, training, explicit = module.parse_args(["--output_dir", str(tmp_path), "--log_level", "error",
                                                        "--max-steps", "7"])
        module.setup_logging(training, explicit)
        assert library.level == logging.ERROR
        assert "max_steps" in explicit and training.max_steps == 7
    finally:
        library.setLevel(before)


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtil_example", os.path.join(REPO, "examples", "mtil.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_push_to_hub_with_a_dry_run_trains_and_never_contacts_the_hub(tmp_path, monkeypatch):
    """transformers' Trainer creates the repo when built with push_to_hub: the example keeps it out of the Trainer's
    arguments and publishes at the end, a dry run writing files only."""
    from huggingface_hub import HfApi, ModelCard

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run contacted the Hub")

    for name in ("create_repo", "upload_folder", "model_info"):
        monkeypatch.setattr(HfApi, name, refuse)
    model_dir = tiny_model_folder(tmp_path)
    load_example().main(["--tasks", "mnist,dtd", "--model_name_or_path", str(model_dir), "--max_steps", "1",
                         "--num_experts", "2", "--rank", "2", "--output_dir", str(tmp_path / "out"), "--use_cpu",
                         "--report_to", "none", "--check_images", "false", "--per_device_eval_batch_size", "500",
                         "--push_to_hub", "true", "--hub_model_id", "me/mini-run", "--hub_dry_run_dir",
                         str(tmp_path / "upload"), "--hub_base_model", "openai/clip-vit-base-patch16"])
    card = ModelCard.load(tmp_path / "upload" / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.license == "unknown"
    assert json.loads((tmp_path / "upload" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "openai/clip-vit-base-patch16"
    assert "| max_steps | 1 |" in card.text and "| num_experts | 2 |" in card.text
    assert (tmp_path / "out" / "all_results.json").is_file()
    with pytest.raises(ValueError, match="--hub_base_model must be a Hub model id"):
        load_example().parse_args(["--output_dir", str(tmp_path), "--hub_base_model", str(tmp_path)])


def test_explicit_task_learning_rates_are_not_overwritten_silently(tmp_path):
    from hf_moe_cl.experiments.experiment import MethodArguments, prepare_method

    args = continual_args(tmp_path, task_learning_rates=[1e-3, 2e-3])
    with pytest.raises(ValueError, match="task_learning_rates and use_task_learning_rates=False disagree"):
        prepare_method(MethodArguments(method="zero-shot", use_task_learning_rates=False), tiny_clip(),
                       tasks_named("a", "b"), args)
    _, kept = prepare_method(MethodArguments(method="zero-shot"), tiny_clip(), tasks_named("a", "b"), args)
    assert kept.task_learning_rates == [1e-3, 2e-3]
