"""`examples/mtil.py`'s command line, checked before any work (no model or data loaded, nothing written): config
files, dataset ids, publishing options, abbreviated flags, options the run does not use and training arguments the
script never uses are refused with a usage error that names them; `--print_recipe` shows the adapter it builds."""

import json
import logging
import os
import re
import sys

import pytest

from conftest import SRC
from test_experiment import load_example


@pytest.fixture(scope="module")
def mtil():
    return load_example()


@pytest.fixture
def no_work(mtil, monkeypatch):
    """Loading a model or a task fails the test: a refusal must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(mtil.CLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(mtil, "preset_tasks", refuse)
    monkeypatch.setattr(mtil, "check_data", refuse)


def refused(mtil, capsys, argv) -> str:
    """The usage error `mtil.main(argv)` exits with (code 2)."""
    with pytest.raises(SystemExit) as exit_:
        mtil.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def recipe(mtil, capsys, argv) -> dict:
    mtil.main([*argv, "--print_recipe"])
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


# ----- what is checked before any work -------------------------------------------------------------------------------
def test_a_dry_run_folder_that_holds_files_is_refused_before_any_work(mtil, capsys, tmp_path, no_work):
    full = tmp_path / "upload"
    full.mkdir()
    (full / "old.txt").write_text("x")
    err = refused(mtil, capsys, ["--method", "zero-shot", "--tasks", "dtd", "--output_dir", str(tmp_path / "out"),
                                 "--hub_dry_run_dir", str(full)])
    assert f"--hub_dry_run_dir {full} exists and is not an empty folder; choose a new folder" in err
    assert not (tmp_path / "out").exists() and [p.name for p in full.iterdir()] == ["old.txt"]


def test_a_dry_run_folder_behind_a_symbolic_link_is_refused_before_any_work(mtil, capsys, tmp_path, no_work):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    err = refused(mtil, capsys, ["--method", "zero-shot", "--tasks", "dtd", "--output_dir", str(tmp_path / "out"),
                                 "--hub_dry_run_dir", str(tmp_path / "link")])
    assert f"--hub_dry_run_dir {tmp_path / 'link'} is a symbolic link; give the folder itself" in err


@pytest.mark.parametrize("inside", [".", "task-00-dtd", "oracle/upload"])
def test_a_dry_run_folder_in_the_output_dir_is_refused_before_any_work(mtil, capsys, tmp_path, no_work, inside):
    """The run writes its checkpoints and reports there: found after training, the upload would fail and be lost."""
    out = tmp_path / "out"
    err = refused(mtil, capsys, ["--method", "zero-shot", "--tasks", "dtd", "--output_dir", str(out),
                                 "--hub_dry_run_dir", str(out / inside)])
    assert "is output_dir or lies inside it, where the run writes its checkpoints and reports; choose a folder " \
           "outside output_dir." in err
    assert not out.exists()


def test_an_output_dir_inside_the_data_the_run_reads_is_refused_before_any_work(mtil, capsys, tmp_path, no_work):
    from hf_moe_cl.assets import assets_dir

    data = tmp_path / "data"
    for argv, read in ((["--preset", "mtil-order-1", "--data_dir", str(data)], lambda: data),
                       (["--preset", "mini"], assets_dir)):  # the assets last: without them the test skips there
        folder = read()
        out = folder / "dtd" / "run"
        err = refused(mtil, capsys, [*argv, "--method", "zero-shot", "--tasks", "dtd", "--output_dir", str(out)])
        assert f"--output_dir {out} lies inside {folder} (--" in err and "choose an output_dir outside it" in err
        assert not out.exists()


@pytest.mark.parametrize("output_dir, hub_model_id, repo_id", [
    ("out", "a/b/c", "a/b/c"), ("bad name", None, "bad name"), ("out", "me/run.", "me/run.")])
def test_a_repo_id_the_hub_refuses_is_named_before_any_work(mtil, capsys, tmp_path, no_work, output_dir,
                                                            hub_model_id, repo_id):
    argv = ["--method", "zero-shot", "--tasks", "dtd", "--output_dir", str(tmp_path / output_dir),
            "--push_to_hub", "true", *(["--hub_model_id", hub_model_id] if hub_model_id else [])]
    err = refused(mtil, capsys, argv)
    assert f"--hub_model_id (else output_dir's name) {repo_id!r} is not a Hub repo id (Repo id must" in err
    assert not (tmp_path / output_dir).exists()


@pytest.mark.parametrize("argv, message", [
    (["--dataset_ids", "foo"], "--dataset_ids entry 'foo' is not 'dataset=owner/name': give comma-separated pairs"),
    (["--dataset_ids", "dtd=my/dtd,"], "--dataset_ids entry '' is not 'dataset=owner/name'"),
    (["--dataset_ids", "dtd="], "--dataset_ids entry 'dtd=' is not 'dataset=owner/name'"),
    (["--dataset_ids", "dtd=a/b,dtd=c/d"], "--dataset_ids names 'dtd' twice"),
    (["--tasks", "dtd,mnist", "--dataset_ids", "cifar100=my/cifar100"],
     "--dataset_ids names 'cifar100', which this run does not read; its datasets are dtd, mnist."),
    (["--preset", "cifar100-cil-10", "--dataset_ids", "dtd=my/dtd"],
     "--dataset_ids names 'dtd', which this run does not read; its datasets are cifar100."),
])
def test_malformed_or_unused_dataset_ids_are_refused_before_any_work(mtil, capsys, tmp_path, no_work, argv, message):
    preset = [] if "--preset" in argv else ["--preset", "mtil-order-1"]
    err = refused(mtil, capsys, [*preset, *argv, "--method", "zero-shot", "--output_dir", str(tmp_path / "out")])
    assert message in err and not (tmp_path / "out").exists()


def test_dataset_ids_of_the_runs_datasets_are_kept(mtil, capsys, tmp_path):
    argv = ["--preset", "mtil-order-1", "--tasks", "dtd,mnist", "--output_dir", str(tmp_path)]
    assert recipe(mtil, capsys, [*argv, "--dataset_ids", "dtd=my/dtd"])["dataset_ids"] == "dtd=my/dtd"
    experiment = mtil.ExperimentArguments(preset="cifar100-cil-10", dataset_ids="cifar100=my/c")
    assert mtil.dataset_ids_map(experiment) == {"cifar100": "my/c"}


@pytest.mark.parametrize("name, text, message", [
    ("list.json", "[1, 2]", "must hold a mapping of argument names to values (e.g. 'max_steps: 100'), got [1, 2]"),
    ("bad.yaml", "max_steps: 5\n  bad: [\n", "which must hold a mapping of argument names to values (e.g. "
                                             "'max_steps: 100'): mapping values are not allowed here"),
    ("bad.json", "{\"max_steps\": ", "which must hold a mapping of argument names to values"),
    ("empty.yaml", "", "must hold a mapping of argument names to values (e.g. 'max_steps: 100'), got None"),
])
def test_a_config_file_that_is_not_a_mapping_is_named(mtil, capsys, tmp_path, no_work, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    err = refused(mtil, capsys, [str(config)])
    assert str(config) in err and message in err


def test_a_missing_config_file_is_named(mtil, capsys, tmp_path, no_work):
    err = refused(mtil, capsys, [str(tmp_path / "none.yaml")])
    assert f"Cannot read the config file {tmp_path / 'none.yaml'}" in err and "No such file" in err


def test_a_list_for_a_one_value_option_in_a_config_is_named_with_the_fix(mtil, capsys, tmp_path, no_work):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"preset": "mtil-order-1", "tasks": ["aircraft", "dtd"]}))
    err = refused(mtil, capsys, [str(config)])
    assert (f"The config file {config} gives `tasks` the list ['aircraft', 'dtd'], but --tasks takes one value: write "
            "the tasks as one comma-separated string, e.g. 'tasks: cifar10,mnist'.") in err


def test_the_printed_recipe_fed_back_as_a_config_gives_the_same_recipe(mtil, capsys, tmp_path, no_work):
    printed = recipe(mtil, capsys, ["--preset", "mini", "--output_dir", str(tmp_path / "run")])
    assert "condu_top_k" not in printed and "lora_targets" not in printed  # what this run does not use is left out
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(printed))
    again = recipe(mtil, capsys, [str(config)])
    assert again == {k: float(v) if isinstance(again[k], float) else v for k, v in printed.items()}


def test_check_data_with_print_recipe_prints_it_and_still_checks(mtil, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(mtil.CLIPModel, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        mtil.main(["--preset", "mini", "--output_dir", str(tmp_path), "--print_recipe", "--check_data",
                   "--model_name_or_path", str(tmp_path / "no-clip")])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and '"preset": "mini"' in out
    assert (f"CLIP weights ({tmp_path / 'no-clip'}): no such folder, and not a Hub id. Fix: give --model_name_or_path "
            "an existing folder written by `save_pretrained`, or a Hub id (namespace/name).") in out


def mtil_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtil_example", os.path.join(os.path.dirname(SRC), "examples",
                                                                                "mtil.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--max_step", "1"], "unrecognized arguments: --max_step 1"),
    (["--per_device_train_batch", "4"], "unrecognized arguments: --per_device_train_batch 4"),
    (["--learning_rat", "1e-3"], "unrecognized arguments"),
    (["--method", "condu", "--ddas", "true"], "--ddas true applies to --method moe-adapters; condu does not use"),
    (["--method", "lora", "--ddas", "true"], "--ddas true applies to --method moe-adapters"),
])
def test_example_refuses_abbreviated_flags_and_ddas_without_a_selector(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        mtil_example().parse_args(["--output_dir", str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ----- options the run does not use are refused, not ignored ---------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--preset", "cifar100-cil-10", "--tasks", "step00"],
     "--tasks, preset cifar100-cil-10 runs its fixed class-incremental steps of cifar100"),
    (["--preset", "mini", "--data_dir", "/data"], "--data_dir, preset mini reads the shared assets"),
    (["--preset", "mini-long", "--dataset_ids", "dtd=a/b"], "--dataset_ids, preset mini-long reads the shared assets"),
    (["--preset", "mtil-order-1", "--data_dir", "/data", "--dataset_ids", "dtd=a/b"],
     "--dataset_ids, --data_dir reads every dataset from its folders, not from the Hub"),
    (["--preset", "mtil-order-1", "--assets_dir", "/assets"],
     "--assets_dir, preset mtil-order-1 reads no shared assets"),
    (["--method", "lora", "--num_experts", "4"], "--num_experts, an option of another method than --method lora"),
    (["--method", "zero-shot", "--lora_targets", "q_proj"], "--lora_targets, an option of another method than "
                                                            "--method zero-shot"),
    (["--method", "moe-adapters", "--condu_top_k", "3"], "--condu_top_k, an option of another method"),
    (["--preset", "mtil-order-1", "--method", "condu", "--ddas_threshold", "0.1"],
     "--ddas_threshold, a DDAS option, and this run has no DDAS selector: that needs --ddas true and --method "
     "moe-adapters"),
    (["--preset", "mini", "--ddas_threshold", "0.1"], "--ddas_threshold, a DDAS option"),
    (["--preset", "mtil-order-1", "--ddas", "false", "--ddas_reference", "my/ref"], "--ddas_reference, a DDAS option"),
    (["--hub_model_id", "me/run"], "--hub_model_id, nothing is published: that needs --push_to_hub true or "
                                   "--hub_dry_run_dir"),
    (["--hub_base_model", "openai/clip-vit-base-patch16"], "--hub_base_model, nothing is published"),
    # options that the method's other options leave idle
    (["--method", "zero-shot", "--learning_rate", "0.1"], "--learning_rate, --method zero-shot trains nothing"),
    (["--method", "zero-shot", "--rank", "4"], "--rank, --method zero-shot trains nothing"),
    (["--method", "full-finetune", "--rank", "4"], "--rank, --method full-finetune has no low-rank part"),
    (["--method", "condu", "--condu_fine_tune", "full", "--condu_lora_targets", "fc1"],
     "--condu_lora_targets, a ConDU LoRA option, and --condu_fine_tune full trains no LoRA"),
    (["--freeze_coverage", "0.5"], "--freeze_coverage, an option of the other --freeze_policy than top_k"),
    (["--freeze_policy", "coverage", "--freeze_experts_per_task", "2"],
     "--freeze_experts_per_task, an option of the other --freeze_policy than coverage"),
    (["--shared_router", "true", "--freeze_images", "8"], "--freeze_images, --shared_router true freezes no expert"),
    (["--routing_report", "false", "--routing_report_images", "10"],
     "--routing_report_images, --routing_report false writes no routing report"),
    (["--noisy_gating", "false", "--noisy_gating_eval", "true"],
     "--noisy_gating_eval, --noisy_gating false adds no noise"),
    (["--preset", "mini", "--ddas", "true", "--ddas_threshold", "0.1", "--ddas_quantile", "0.9"],
     "--ddas_quantile, --ddas_threshold gives the threshold the quantile would calibrate"),
    (["--preset", "mini", "--ddas", "true", "--ddas_alexnet_weights", "/nope.pth"],
     "--ddas_alexnet_weights, the DDAS features are CLIP's"),
    (["--resume", "--overwrite_output_dir", "true"],
     "--overwrite_output_dir, --resume continues the run in output_dir, which a new run would replace"),
])
def test_options_the_run_does_not_use_are_refused_before_any_work(mtil, capsys, tmp_path, no_work, argv, message):
    for print_recipe in ([], ["--print_recipe"]):  # the recipe refuses what the run would
        err = refused(mtil, capsys, [*argv, *print_recipe, "--output_dir", str(tmp_path / "out")])
        assert f"Options this run does not use: {message}" in err and "Drop it; nothing is ignored silently." in err
    assert not (tmp_path / "out").exists()


def test_several_unused_options_are_named_together(mtil, capsys, tmp_path):
    err = refused(mtil, capsys, ["--method", "zero-shot", "--num_experts", "4", "--condu_top_k", "2",
                                 "--output_dir", str(tmp_path)])
    assert "--condu_top_k, an option of another method than --method zero-shot; --num_experts, an option" in err
    assert "Drop them;" in err


@pytest.mark.parametrize("argv", [
    ["--preset", "mtil-order-1", "--ddas_threshold", "0.1"],  # the preset's DDAS is on
    ["--preset", "mini", "--ddas", "true", "--ddas_threshold", "0.1", "--ddas_reference", "my/ref"],
    ["--method", "condu", "--condu_top_k", "3", "--preset", "mtil-order-1", "--dataset_ids", "dtd=my/dtd"],
    ["--method", "lora", "--lora_targets", "q_proj"],
    ["--push_to_hub", "true", "--hub_model_id", "me/run", "--hub_base_model", "openai/clip-vit-base-patch16"],
    ["--preset", "mtil-order-1", "--data_dir", "/data", "--tasks", "dtd"],
    ["--freeze_policy", "coverage", "--freeze_coverage", "0.5", "--freeze_images", "8"],
    ["--preset", "mini", "--ddas", "true", "--ddas_feature_extractor", "alexnet", "--ddas_alexnet_weights", "/w.pth"],
    ["--method", "condu", "--condu_fine_tune", "lora", "--rank", "4", "--condu_lora_targets", "fc1"],
])
def test_options_the_run_uses_are_accepted(mtil, capsys, tmp_path, argv):
    assert recipe(mtil, capsys, [*argv, "--output_dir", str(tmp_path)])["preset"]


def test_the_recipe_shows_the_adapter_the_script_builds(mtil, capsys, tmp_path):
    order1 = recipe(mtil, capsys, ["--preset", "mtil-order-1", "--output_dir", str(tmp_path)])
    assert (order1["num_experts"], order1["top_k"], order1["noisy_gating"], order1["noisy_gating_eval"]) == \
        (22, 2, True, False)
    cil = recipe(mtil, capsys, ["--preset", "cifar100-cil-10", "--output_dir", str(tmp_path)])
    assert (cil["num_experts"], cil["noisy_gating_eval"]) == (2, True)


@pytest.mark.parametrize("argv, reason", [
    (["--do_train"], "it trains and evaluates every task itself"),
    (["--do_eval", "true"], "it trains and evaluates every task itself"),
    (["--eval_steps", "5"], "every task is evaluated after it trains (eval_strategy 'no'), never during training"),
    (["--save_steps", "5"], "every task is saved after it trains (save_strategy 'no'; --save_task_checkpoints)"),
    (["--metric_for_best_model", "loss"], "every task keeps its own checkpoint; there is no best one to reload"),
])
def test_training_arguments_the_script_never_uses_are_refused_not_ignored(mtil, capsys, tmp_path, argv, reason):
    with pytest.raises(SystemExit) as exit_:
        mtil.parse_args(["--output_dir", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert f"--{argv[0][2:]} is not used by this script: {reason}." in capsys.readouterr().err


def test_no_option_is_reported_as_ignored(mtil, capsys, tmp_path, caplog):
    """eval_strategy 'no' is the value used (others are refused by ContinualTrainingArguments): no warning."""
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        mtil.parse_args(["--output_dir", str(tmp_path), "--eval_strategy", "no", "--save_strategy", "no"])
    assert not caplog.records
    with pytest.raises(ValueError, match="eval_strategy='steps'` cannot be used"):
        mtil.parse_args(["--output_dir", str(tmp_path), "--eval_strategy", "steps"])


# ----- what a run checks before it loads anything ----------------------------------------------------------------------
def test_a_run_with_a_missing_dataset_stops_at_the_data_check_before_loading_a_model(mtil, capsys, tmp_path,
                                                                                      monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data check")

    monkeypatch.setattr(mtil.CLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(mtil, "preset_tasks", refuse)
    from conftest import tiny_clip

    tiny_clip().save_pretrained(tmp_path / "clip")  # the model is there; dtd/ is not in the data folder
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as exit_:
        mtil.main(["--preset", "mtil-order-1", "--tasks", "dtd", "--method", "zero-shot", "--data_dir",
                   str(tmp_path / "data"), "--model_name_or_path", str(tmp_path / "clip"),
                   "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "| dtd | FAILED |" in out and str(tmp_path / "data") in out
    assert not (tmp_path / "out").exists()


def test_the_main_job_without_the_assets_says_what_is_missing_and_what_to_do(tmp_path):
    import subprocess

    env = {**os.environ, "HF_MOE_CL_ASSETS": str(tmp_path / "no-assets"), "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(SRC), "examples", "mtil.py"), "--preset",
                           "mini", "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-2:] == [
        f"error: The assets folder {tmp_path / 'no-assets'} (proxy CLIP, mini-MTIL tasks, reference images) does not "
        "exist.",
        "Fix: pass its path (--assets_dir) or set $HF_MOE_CL_ASSETS; without the assets, run the same six tasks from "
        "the Hub with --preset mini-hub (docs/quickstart.md)."]


def test_the_default_output_folder_is_under_runs_and_a_refused_run_is_one_line(mtil, capsys, tmp_path, monkeypatch):
    """Without --output_dir the run writes to runs/<preset>-<method>, not transformers' ./trainer_output; an error
    found after parsing is printed once, as one line, with exit status 1 (no traceback for accelerate to repeat)."""
    monkeypatch.chdir(tmp_path)
    assert recipe(mtil, capsys, ["--preset", "mini", "--method", "lora"])["output_dir"] == "runs/mini-lora"
    with pytest.raises(SystemExit) as exit_:
        mtil.cli(["--preset", "mini", "--method", "zero-shot", "--tasks", "nosuch"])
    assert exit_.value.code == ("error: Preset 'mini' has no task(s) ['nosuch']; its tasks are caltech101, cifar10, "
                                "clothing, dtd, fashion_mnist, mnist.")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("tasks, message", [
    ("mnist,nosuch", r"has no task\(s\) \['nosuch'\]"),
    ("mnist,mnist", r"got the task\(s\) \['mnist'\] twice \(give each once\)"),
    ("", r"has no task\(s\) \[''\]"),  # an empty list is not the whole preset
])
def test_a_task_list_the_preset_cannot_run_is_refused_before_the_recipe_is_printed(mtil, no_work, capsys, tasks,
                                                                                  message):
    with pytest.raises(SystemExit) as exit_:
        mtil.cli(["--preset", "mini", "--tasks", tasks, "--print_recipe", "--output_dir", "runs/x"])
    assert exit_.value.code.startswith("error: Preset 'mini' ") and "its tasks are caltech101, cifar10" in \
        exit_.value.code
    assert re.search(message, exit_.value.code)
    assert "{" not in capsys.readouterr().out  # no recipe printed


@pytest.mark.parametrize("tasks", ["dtd, mnist", " dtd ,mnist "])
def test_a_task_list_with_spaces_after_its_commas_runs_as_without(mtil, no_work, capsys, tasks, tmp_path):
    """'dtd, mnist' (as people write lists, and YAML's `tasks: dtd, mnist`) is the tasks dtd and mnist."""
    assert recipe(mtil, capsys, ["--preset", "mini", "--tasks", tasks, "--output_dir", str(tmp_path)])["tasks"] == \
        "dtd,mnist"
    config = tmp_path / "run.yaml"
    config.write_text(f"tasks: {tasks}\npreset: mini\n")
    assert recipe(mtil, capsys, [str(config), "--output_dir", str(tmp_path)])["tasks"] == "dtd,mnist"
