"""The `mini-long` preset: the shared assets' mini-MTIL datasets cut by classes into 30 tasks."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from hf_moe_cl.assets import assets_dir
from hf_moe_cl.experiments.recipes import preset_recipe
from hf_moe_cl.continual import ContinualTrainingArguments
from hf_moe_cl.experiments.data_check import check_data
from hf_moe_cl.experiments.presets import (MINI_TASKS, MTILPreset, class_groups, get_preset, mini_long_names,
                                           mini_long_tasks, mini_mtil_tasks, preset_tasks)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def long_tasks():
    return preset_tasks("mini-long")


def test_the_preset_resolves_to_thirty_tasks_in_rounds():
    preset = get_preset("mini-long")
    assert isinstance(preset, MTILPreset) and preset.from_assets and not preset.ddas
    assert len(preset.tasks) == 30 and preset.class_groups == 5 and preset.eval_images == 100
    assert list(preset.tasks[:7]) == [f"{name}-1" for name in MINI_TASKS] + ["caltech101-2"]
    assert preset.tasks[-1] == "mnist-5" and len(set(preset.tasks)) == 30
    recipe = preset_recipe("mini-long")[ContinualTrainingArguments]
    assert (recipe["max_steps"], recipe["warmup_steps"]) == (100, 10)


def test_class_groups_cut_consecutive_labels_and_refuse_too_few_classes():
    assert [len(g) for g in class_groups(101, 5)] == [20, 20, 20, 20, 21]
    assert [list(g) for g in class_groups(10, 5)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="3 classes cannot be cut into 5 groups"):
        class_groups(3, 5)
    with pytest.raises(ValueError, match="`groups` must be an integer >= 1, got 0"):
        class_groups(10, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0), "`rounds` must be an integer >= 1, got 0"),
    (dict(rounds=-1), "`rounds` must be an integer >= 1, got -1"),
    (dict(names=[]), r"mini-long has no task\(s\) \['\(none\)'\]"),
    (dict(names=["dtd-1", "dtd-1"]), r"mini-long got the task\(s\) \['dtd-1'\] twice"),
    (dict(names=["dtd-1"], eval_images=0), "`eval_images` must be None or an integer >= 1, got 0"),
    (dict(names=["dtd-1"], eval_images=-1), "`eval_images` must be None or an integer >= 1, got -1"),
])
def test_mini_long_tasks_refuse_no_rounds_no_names_repeated_names_and_no_test_images(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mini_long_tasks(assets_dir(), **kwargs)


def test_split_is_disjoint_relabelled_and_keeps_each_datasets_templates(long_tasks):
    whole = {task.name: task for task in mini_mtil_tasks(assets_dir())}
    assert [task.name for task in long_tasks] == mini_long_names()
    for dataset, source in whole.items():
        parts = [task for task in long_tasks if task.name.rsplit("-", 1)[0] == dataset]
        assert len(parts) == 5
        names = [name for task in parts for name in task.classnames]
        assert names == source.classnames  # disjoint, every class once, in label order
        train_counts = Counter(source.train_dataset["label"])
        offset = 0
        for task in parts:
            assert task.templates == source.templates
            task.validate()
            for split in (task.train_dataset, task.eval_dataset):
                assert split.features["label"].names == task.classnames
                assert set(split["label"]) <= set(range(len(task.classnames)))
            # every training image of the group's classes, under its new label
            assert Counter(task.train_dataset["label"]) == {label - offset: count for label, count in
                                                           train_counts.items()
                                                           if offset <= label < offset + len(task.classnames)}
            assert len(task.eval_dataset) <= 100
            offset += len(task.classnames)
    assert sum(len(task.eval_dataset) for task in long_tasks) == 2759


def test_relabelled_images_are_the_originals_of_their_class():
    source = mini_mtil_tasks(assets_dir(), ["cifar10"])[0]
    task = mini_long_tasks(assets_dir(), ["cifar10-3"])[0]
    assert task.classnames == ["deer", "dog"]
    originals = [i for i, label in enumerate(source.train_dataset["label"]) if label in (4, 5)]
    first = source.train_dataset[originals[0]]
    assert task.train_dataset[0]["label"] == first["label"] - 4
    assert task.train_dataset[0]["image"].tobytes() == first["image"].tobytes()


def test_a_subset_of_tasks_in_any_order_and_unknown_names(long_tasks):
    picked = preset_tasks("mini-long", tasks=["mnist-2", "caltech101-5"])
    assert [t.name for t in picked] == ["mnist-2", "caltech101-5"]
    assert picked[1].classnames == long_tasks[24].classnames and len(picked[1].classnames) == 21
    with pytest.raises(ValueError, match=r"no task\(s\) \['mnist-6'\]"):
        preset_tasks("mini-long", tasks=["mnist-6"])
    with pytest.raises(ValueError, match=r"mini-long has no task\(s\) \['mnist'\]"):
        mini_long_tasks(assets_dir(), ["mnist"])


def test_data_check_and_example_script_know_the_preset():
    check = check_data("mini-long", tasks=["dtd-2", "caltech101-1"])
    assert [row["dataset"] for row in check.rows] == ["dtd-2", "caltech101-1"]
    assert [row["classes"] for row in check.rows] == ["2", "20"]
    recipe = subprocess.run([sys.executable, os.path.join(REPO, "examples", "mtil.py"), "--preset", "mini-long",
                             "--output_dir", "unused", "--print_recipe"], capture_output=True, text=True, timeout=300)
    assert recipe.returncode == 0, recipe.stderr[-3000:]
    assert '"preset": "mini-long"' in recipe.stdout and '"max_steps": 100' in recipe.stdout


def test_data_check_reads_each_dataset_once_and_reports_as_one_task_at_a_time(monkeypatch):
    from hf_moe_cl.continual import tasks as tasks_module

    names = ["dtd-2", "mnist-1", "dtd-1", "mnist-3", "dtd-5"]
    alone = [check_data("mini-long", tasks=[name]) for name in names]
    read = []
    load = tasks_module.load_from_disk
    monkeypatch.setattr(tasks_module, "load_from_disk", lambda path: read.append(os.path.basename(path)) or load(path))
    check = check_data("mini-long", tasks=names)
    assert read == ["dtd", "mnist"]  # one read per dataset, not one per class group
    assert check.rows == [one.rows[0] for one in alone] and check.ok
    assert [row["dataset"] for row in check.rows] == names and {row["classes"] for row in check.rows} == {"2"}


# ----- benchmarks/long_sequence.py's command line ---------------------------------------------------------------------
def long_sequence(*argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "long_sequence.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def test_long_sequence_names_a_bad_report_at_and_a_truncated_variant_record(tmp_path):
    bad = long_sequence("--report_at", "1,abc", "--output_dir", str(tmp_path))
    assert bad.returncode == 2 and ("--report_at must be task counts separated by commas (e.g. 6,12,18), got "
                                    "'1,abc'") in bad.stderr
    (tmp_path / "top_k.json").write_text('{"settings": ')
    bad = long_sequence("--report_only", "--variants", "top_k", "--output_dir", str(tmp_path))
    assert bad.returncode == 2 and f"{tmp_path / 'top_k.json'} is not valid JSON (13 bytes" in bad.stderr
    assert "Once it is deleted, top_k is measured again." in bad.stderr


def test_a_growth_variant_is_saved_with_the_runs_settings_and_read_back(tmp_path):
    """A variant's record holds the run's settings (JSON), not the variant's options (a MoELoraConfig for growth:
    the record could not be written after the whole run); a second call reads it back instead of measuring again."""
    import json

    argv = ("--num_tasks", "2", "--steps_per_task", "2", "--report_at", "1,2", "--eval_images", "10",
            "--ddas_task_steps", "3", "--ddas_reference_steps", "3", "--probe_batch", "8",
            "--variants", "coverage-1.0+growth", "--output_dir", str(tmp_path))
    run = long_sequence(*argv)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "coverage-1.0+growth.json").read_text())
    assert record["settings"]["growth_threshold"] == 0.3 and record["settings"]["num_tasks"] == 2
    again = long_sequence(*argv)
    assert again.returncode == 0 and "coverage-1.0+growth: measured before, read from" in again.stdout, again.stderr
    # another growth threshold: the growth record no longer matches, individual fine-tuning (which it does not
    # shape) still does, so a growth-0.5 folder can take the individual run measured beside growth 0.3
    other = long_sequence(*argv[:-1], str(tmp_path), "--growth_threshold", "0.5", "--report_only")
    assert other.returncode == 2 and "coverage-1.0+growth.json was measured with other settings" in other.stderr
    argv_individual = [*argv[:-3], "individual", "--output_dir", str(tmp_path / "individual_run")]
    assert long_sequence(*argv_individual).returncode == 0
    (tmp_path / "g05").mkdir()
    (tmp_path / "g05" / "individual.json").write_bytes((tmp_path / "individual_run" / "individual.json").read_bytes())
    reused = long_sequence(*argv_individual[:-1], str(tmp_path / "g05"), "--growth_threshold", "0.5", "--report_only")
    assert reused.returncode == 0 and "individual: measured before" in reused.stdout, reused.stderr[-2000:]
    assert json.loads((tmp_path / "g05" / "results.json").read_text())["table"]["individual"]


# ----- benchmarks/long_sequence_seeds.py: mean and range over seeds ---------------------------------------------------
def write_long_run(folder, seed, rows, num_tasks=30):
    import json

    folder.mkdir(parents=True)
    arguments = {"seed": seed, "num_tasks": num_tasks, "output_dir": str(folder), "variants": "x"}
    (folder / "results.json").write_text(json.dumps({"arguments": arguments, "table": rows}))
    return str(folder)


def seeds_summary(*argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "long_sequence_seeds.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=120)


def test_seeds_give_mean_and_range_and_count_only_the_seeds_with_their_own_individual_run(tmp_path):
    growth0 = {"last": 70.0, "bwt": 0.0, "last_over_individual": 94.0, "newest_over_individual": 80.0,
               "recent_over_individual": 92.0}
    growth1 = {"last": 74.0, "bwt": -0.5}  # this seed has no individual run: no ratios
    first = write_long_run(tmp_path / "s0", 0, {"growth": {"30": growth0, "6": {"last": 1.0}}})
    second = write_long_run(tmp_path / "s1", 1, {"growth": {"30": growth1}})
    run = seeds_summary(first, second)
    assert run.returncode == 0, run.stderr
    assert "| growth | 72.0 (70.0 to 74.0) [2] | 94.0 [1] | -0.25 (-0.50 to 0.00) [2] | 80.0 [1] | 92.0 [1] |" \
        in run.stdout
    assert "seeds 0, 1" in run.stdout
    other = write_long_run(tmp_path / "s2", 2, {"growth": {"30": growth1}}, num_tasks=12)
    bad = seeds_summary(first, other)
    assert bad.returncode == 1 and "measured with different settings (other than the seed)" in bad.stderr
    again = seeds_summary(first, first)
    assert again.returncode == 1 and "Two folders hold the same seed ([0, 0])" in again.stderr
    missing = seeds_summary(str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "results.json does not exist" in missing.stderr


def test_moe_alone_learns_each_task_from_the_base_clip(tmp_path):
    """`moe-alone` trains each task as its own one-task run: its first task is the continual run's first task (same
    seed, same fresh adapter) and every later row keeps the earlier tasks' accuracies (BWT 0). The continual run's
    table gives the share of a new task's selections on experts earlier tasks froze."""
    import json

    argv = ("--num_tasks", "2", "--steps_per_task", "2", "--report_at", "1,2", "--eval_images", "10",
            "--ddas_task_steps", "3", "--ddas_reference_steps", "3", "--probe_batch", "8",
            "--variants", "top_k,moe-alone", "--output_dir", str(tmp_path))
    run = long_sequence(*argv)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = json.loads((tmp_path / "moe-alone.json").read_text())["matrices"]["oracle"]
    continual = json.loads((tmp_path / "top_k.json").read_text())["matrices"]["oracle"]
    assert alone[0] == [continual[0][0], None] and alone[1][0] == alone[0][0]
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    row = table["moe-alone"]["2"]
    assert row["bwt"] == 0.0 and row["last"] == (alone[1][0] + alone[1][1]) / 2 and row["on_earlier_frozen"] is None
    # the continual run's routing: task 1 finds nothing frozen; task 2's selections on what task 1 froze are its
    # selections on experts it did not freeze less those still trainable, per tower
    record = json.loads((tmp_path / "top_k.json").read_text())
    second = record["diagnostics"]["routing_report"][1][record["tasks"][1]]
    shares = [second[tower]["not_own"] - second[tower]["trainable"] for tower in ("vision", "text")]
    assert table["top_k"]["1"]["on_earlier_frozen"] == 0.0 and min(shares) >= 0 and max(shares) > 0
    assert abs(table["top_k"]["2"]["on_earlier_frozen"] - 100.0 * sum(shares) / 4) < 1e-9
