import json

import pytest
import torch
from datasets import Dataset
from PIL import Image

from hf_moe_cl.data.splits import few_shot_subset
from hf_moe_cl.experiments.datasets import MTIL_DATASETS, MTIL_ORDER_I, MTIL_ORDER_II
from hf_moe_cl.experiments.presets import class_incremental_tasks
from hf_moe_cl.experiments.figures import accuracy_heatmap, selection_heatmap
from hf_moe_cl.experiments.reporting import markdown_table, write_report, write_result_report
from hf_moe_cl.continual.result import ContinualResult
from hf_moe_cl.files import atomic_path, write_text_atomic


def test_report_files_hold_the_matrix_and_metrics(tmp_path):
    matrix = [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]]
    metrics = write_report(tmp_path, "moe", ["a", "b", "c"], matrix)
    assert metrics == {"transfer": 32.5, "average": 50.0, "last": 80.0}
    saved = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert saved["accuracy_matrix"] == matrix and saved["metrics"] == metrics
    assert saved["forgetting"] == {"bwt": 45.0, "drop": {"a": -60.0, "b": -30.0, "c": 0.0}}
    lines = (tmp_path / "accuracy_matrix.csv").read_text().splitlines()
    assert lines[0] == "after \\ on,a,b,c" and lines[2] == "b,40.00,50.00,60.00"
    text = (tmp_path / "metrics.md").read_text()
    assert "| moe | 32.5 | 50.0 | 80.0 |" in text
    assert "| method | Transfer | Average | Last | BWT |" in text and "| moe | 32.5 | 50.0 | 80.0 | 45.0 |" in text
    assert "| method | a | b | c |" in text and "| moe | -60.0 | -30.0 | 0.0 |" in text
    image = Image.open(tmp_path / "accuracy_matrix.png")
    assert image.size[0] > 3 * 56 and image.size[1] > 3 * 56
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_matrix.csv", "accuracy_matrix.json",
                                                          "accuracy_matrix.png", "metrics.md"]


NAMES = ["a", "b", "c"]
ORACLE = [[80.0, 20.0, 30.0], [70.0, 85.0, 35.0], [60.0, 75.0, 90.0]]
AGNOSTIC = [[70.0, 10.0, 20.0], [60.0, 80.0, 30.0], [50.0, 70.0, 85.0]]
# stage x task x [zero-shot, a, b, c]: after the last task, 8 of a's 10 test images went to a, 2 to zero-shot
HISTOGRAM = [[[2, 8, 0, 0], [10, 0, 0, 0], [9, 1, 0, 0]],
             [[2, 8, 0, 0], [1, 0, 9, 0], [6, 1, 3, 0]],
             [[2, 8, 0, 0], [0, 1, 9, 0], [0, 0, 0, 10]]]


def test_a_route_histogram_wider_than_the_tasks_is_reported_by_route_with_each_tasks_own(tmp_path):
    """A continued model (routes 0-1 learned before, the run's tasks on 2-3) or idle routers: the columns are named
    by route and each task's share is read at its own route; before, the tasks' names labelled the first columns."""
    from hf_moe_cl.experiments.reporting import selection_summary

    stages = [[[1, 0, 0, 9, 0], [10, 0, 0, 0, 0]], [[1, 2, 0, 7, 0], [0, 0, 1, 0, 9]]]
    result = ContinualResult(["c", "d"], {"per_image": [[70.0, 10.0], [60.0, 80.0]]},
                             {"route_histogram": {"per_image": stages}, "route_names": ["a", "b", "c", "d"],
                              "task_routes": [2, 3]})
    write_result_report(tmp_path, result, "moe-adapters")
    selection = json.loads((tmp_path / "per_image" / "route_selection.json").read_text())
    assert selection["routes"] == ["zero-shot", "a", "b", "c", "d"] and selection["correct"] == {"c": 70.0, "d": 90.0}
    assert "| images of | zero-shot | a | b | c | d | correct |" in (tmp_path / "metrics.md").read_text()
    with pytest.raises(ValueError, match=r"The route histogram has 4 routes besides zero-shot, but 2 route names"):
        selection_summary(stages, ["c", "d"])


def test_result_report_writes_every_kind_protocol_first(tmp_path):
    result = ContinualResult(NAMES, {"protocol": AGNOSTIC, "per_image": AGNOSTIC, "oracle": ORACLE},
                             {"route_histogram": {"protocol": HISTOGRAM, "per_image": HISTOGRAM}})
    returned = write_result_report(tmp_path, result, "moe-adapters")
    assert returned["oracle"] == {"transfer": 26.25, "average": pytest.approx(60.5556, abs=1e-4), "last": 75.0,
                                  "bwt": -15.0}
    assert returned["protocol"]["bwt"] == -15.0 and returned["protocol"]["last"] == pytest.approx(205 / 3)
    for kind in ("protocol", "per_image", "oracle"):
        saved = json.loads((tmp_path / kind / "accuracy_matrix.json").read_text())
        assert saved["kind"] == kind and saved["forgetting"]["drop"] == {"a": 20.0, "b": 10.0, "c": 0.0}
        assert Image.open(tmp_path / kind / "accuracy_matrix.png").size[0] > 400
    assert not (tmp_path / "oracle" / "route_selection.json").exists()
    selection = json.loads((tmp_path / "per_image" / "route_selection.json").read_text())
    assert selection["counts_after_last_task"] == HISTOGRAM[-1]
    assert selection["correct"] == {"a": 80.0, "b": 90.0, "c": 100.0}
    assert selection["unseen_sent_to_zero_shot"] == pytest.approx(100.0 * (10 + 9 + 6) / 30)
    assert Image.open(tmp_path / "per_image" / "route_selection.png").size[0] > 400
    text = (tmp_path / "metrics.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| protocol") or line.startswith("| per_image")
            or line.startswith("| oracle")]
    assert [row.split(":")[0] for row in rows] == ["| protocol", "| per_image", "| oracle"] * 2
    assert "| oracle: task-aware (true task ids) | 26.2 | 60.6 | 75.0 | -15.0 |" in text
    headline = "Headline numbers: the protocol matrix, task-agnostic, one route per test batch (the paper's protocol)."
    assert headline in text
    assert (tmp_path / "per_image" / "metrics.md").read_text().startswith(
        "# moe-adapters: per_image matrix, task-agnostic, route per image\n")
    assert "| a | 20.0 | 80.0 | 0.0 | 0.0 | 80.0 |" in text  # route selection: zero-shot, a, b, c, correct
    assert "![per_image route selection](per_image/route_selection.png)" in text


def test_an_incomplete_matrix_is_reported_without_metrics(tmp_path):
    current_task_only = [[50.0, None], [None, 60.0]]
    returned = write_result_report(tmp_path, ContinualResult(["a", "b"], {"oracle": current_task_only}), "cil")
    assert returned == {"oracle": {}}
    saved = json.loads((tmp_path / "oracle" / "accuracy_matrix.json").read_text())
    assert saved["metrics"] == {} and saved["forgetting"] is None
    text = (tmp_path / "metrics.md").read_text()
    assert "| oracle: task-aware (true task ids) | - | - | - | - |" in text
    assert "Headline numbers: the oracle matrix, task-aware (true task ids); this run has no protocol matrix." in text
    assert (tmp_path / "oracle" / "accuracy_matrix.png").stat().st_size > 0


def test_heatmaps_say_what_they_show_without_touching_pyplot():
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    metrics = {"transfer": 26.25, "average": 60.56, "last": 75.0, "bwt": -15.0}
    aware = accuracy_heatmap(ORACLE, NAMES, "moe-adapters", "oracle", metrics)
    agnostic = accuracy_heatmap(AGNOSTIC, NAMES, "moe-adapters", "per_image")
    axes, colour_bar = aware.axes
    assert "moe-adapters" in aware.get_suptitle() and "oracle matrix\ntask-aware" in aware.get_suptitle()
    assert "Transfer 26.2 · Average 60.6 · Last 75.0 · BWT -15.0" in aware.get_suptitle()
    assert "task-agnostic" in agnostic.get_suptitle()
    assert axes.get_xlabel() == "evaluated on" and axes.get_ylabel() == "after training"
    assert colour_bar.get_ylabel() == "accuracy (%)"
    assert [t.get_text() for t in axes.get_xticklabels()] == NAMES
    assert sorted(t.get_text() for t in axes.texts) == sorted(f"{v:.1f}" for row in ORACLE for v in row)
    hatched = [p for p in axes.patches if p.get_hatch()]
    assert sorted((round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in hatched) == [(1, 0), (2, 0), (2, 1)]
    selection = selection_heatmap(HISTOGRAM[-1], NAMES, "moe-adapters", "per_image")
    assert [t.get_text() for t in selection.axes[0].get_xticklabels()] == ["zero-shot"] + NAMES
    assert "90.0 % on average" in selection.get_suptitle()
    assert plt.get_fignums() == [] and matplotlib.get_backend() == backend


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "metrics.md"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.md"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.md"]


def test_markdown_table_rows():
    table = markdown_table({"x": {"transfer": 1.0, "average": 2.0, "last": 3.0}, "y": {"transfer": 4.0}})
    assert table.splitlines()[2] == "| x | 1.0 | 2.0 | 3.0 |" and table.splitlines()[3] == "| y | 4.0 | - | - |"


def test_mtil_orders_cover_the_eleven_datasets():
    assert len(MTIL_ORDER_I) == 11 and sorted(MTIL_ORDER_I) == sorted(MTIL_ORDER_II) == sorted(MTIL_DATASETS)
    assert MTIL_ORDER_I[0] == "aircraft" and MTIL_ORDER_II[0] == "stanford_cars"
    assert all("{}" in t for spec in MTIL_DATASETS.values() for t in spec.templates)
    assert MTIL_DATASETS["aircraft"].learning_rates["moe-adapters"] == 5e-3
    assert MTIL_DATASETS["mnist"].learning_rates["moe-adapters"] == 1e-4


def labelled(labels):
    return Dataset.from_dict({"image": [Image.new("RGB", (4, 4)) for _ in labels], "label": labels})


def test_few_shot_subset_takes_k_per_class():
    data = labelled([0] * 10 + [1] * 3 + [2] * 7)
    subset = few_shot_subset(data, shots=5, seed=0)
    labels = subset["label"]
    assert labels.count(0) == 5 and labels.count(1) == 3 and labels.count(2) == 5
    assert few_shot_subset(data, shots=5, seed=0)["label"] == labels


def test_class_incremental_steps_grow_the_label_space():
    train, test = labelled(list(range(6)) * 2), labelled(list(range(6)))
    names = [f"c{i}" for i in range(6)]
    steps = class_incremental_tasks(train, test, names, steps=3, seed=0)
    assert [len(s.classnames) for s in steps] == [2, 4, 6]
    assert [len(s.eval_dataset) for s in steps] == [2, 4, 6]
    assert all(len(s.train_dataset) == 4 for s in steps)
    for step in steps:
        step.validate()
        assert set(step.train_dataset["label"]) == set(range(len(step.classnames) - 2, len(step.classnames)))
    assert steps[2].classnames[:4] == steps[1].classnames
    with pytest.raises(ValueError, match="cannot be split"):
        class_incremental_tasks(train, test, names, steps=4)


def test_few_shot_subset_is_the_first_shots_of_each_class_in_one_seeded_shuffle():
    data = labelled([0] * 10 + [1] * 3 + [2] * 7)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(42)).tolist()
    expected = sorted([i for i in order if data[i]["label"] == 0][:5] + [i for i in order if data[i]["label"] == 1]
                      + [i for i in order if data[i]["label"] == 2][:5])
    assert few_shot_subset(data, shots=5, seed=42)["label"] == [data[i]["label"] for i in expected]
    with pytest.raises(ValueError, match="positive"):
        few_shot_subset(data, shots=0)


def test_task_names_stay_text_in_metrics_md(tmp_path):
    """Names with a newline and a heading, a `|` or `**` neither add headings nor break the tables."""
    import re

    names = ["a\n## heading", "b|c", "**bold**"]
    write_result_report(tmp_path, ContinualResult(names, {"oracle": ORACLE}, {"route_histogram": {
        "oracle": HISTOGRAM}}), "moe|adapters")
    for path in (tmp_path / "metrics.md", tmp_path / "oracle" / "metrics.md"):
        lines = path.read_text().splitlines()
        assert [line for line in lines if line.startswith("#")] in (
            [r"# moe\|adapters on 3 tasks: a \#\# heading, b\|c, \*\*bold\*\*",
             "## Figures and route selection", "### Route selection after the last task, oracle"],
            ["# moe\\|adapters: oracle matrix, task-aware (true task ids)", "## Route selection after the last task"])
        tables = "\n".join(line if line.startswith("|") else "" for line in lines).split("\n\n")
        cells = [{len(re.findall(r"(?<!\\)\|", row)) for row in table.strip().splitlines()} for table in tables]
        assert [len(counts) for counts in cells if counts] == [1, 1, 1]  # metrics, drop per task, route selection
    assert r"| \*\*bold\*\* | 0.0 | 0.0 | 0.0 | 100.0 | 100.0 |" in (tmp_path / "metrics.md").read_text()


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=-2), r"`steps` must be an integer >= 1, got -2"),
    (dict(steps=True), r"`steps` must be an integer >= 1, got True"),
    (dict(initial_increment=12, increment=2), r"`initial_increment` must be an integer in \[1, 10\], got 12"),
    (dict(initial_increment=0, increment=2), r"`initial_increment` must be an integer in \[1, 10\], got 0"),
    (dict(initial_increment=4, increment=0), r"`increment` must be an integer >= 1, got 0"),
    (dict(initial_increment=4, increment=-1), r"`increment` must be an integer >= 1, got -1"),
    (dict(initial_increment=4, increment=4), r"`increment`=4 does not divide the 6 classes left .* would have 2"),
    (dict(initial_increment=4), r"`initial_increment`=4 and `increment`=None: pass both"),
    (dict(steps=2, increment=3), r"`initial_increment`=None and `increment`=3: pass both"),
    (dict(steps=5, initial_increment=4, increment=2), r"`steps`=5 disagrees .* into 4 steps"),
    (dict(steps=2, seed=None), r"`seed` must be an integer, got None"),
    (dict(steps=2, seed="1993"), r"`seed` must be an integer, got '1993'"),
    (dict(steps=2, seed=True), r"`seed` must be an integer, got True"),
])
def test_class_incremental_tasks_refuse_steps_continuum_refuses(kwargs, match):
    data = labelled([c for c in range(10) for _ in range(2)])
    with pytest.raises(ValueError, match=match):
        class_incremental_tasks(data, data, [f"c{i}" for i in range(10)], **kwargs)


def test_class_incremental_tasks_take_consistent_steps_and_a_one_step_scenario():
    data = labelled(list(range(10)))
    names = [f"c{i}" for i in range(10)]
    steps = class_incremental_tasks(data, data, names, steps=4, initial_increment=4, increment=2)
    assert [len(s.train_classes) for s in steps] == [4, 2, 2, 2]
    # continuum: (10 - 10) / increment = 0 more steps, one step of every class
    assert [len(s.train_classes) for s in class_incremental_tasks(data, data, names, initial_increment=10,
                                                                  increment=3)] == [10]


def test_few_shot_subset_refuses_fractional_shots_and_a_seed_that_is_not_an_int():
    data = labelled([0] * 4 + [1] * 4)
    for shots in (2.5, True):
        with pytest.raises(ValueError, match=rf"`shots` must be a positive integer \(.*\), got {shots}"):
            few_shot_subset(data, shots, 0)
    with pytest.raises(ValueError, match="`seed` must be an integer, got None"):
        few_shot_subset(data, 2, None)


@pytest.mark.parametrize("few_shot", [2.5, True, -1])
def test_mtil_task_refuses_shots_that_are_not_a_count_before_reading_data(few_shot, tmp_path):
    from hf_moe_cl.experiments.datasets import mtil_task
    with pytest.raises(ValueError, match=rf"`few_shot` must be None or an integer >= 0, got {few_shot}"):
        mtil_task("mnist", data_dir=tmp_path / "absent", few_shot=few_shot)


def test_class_incremental_metrics_refuse_what_is_not_a_percentage():
    from hf_moe_cl.experiments.metrics import class_incremental_metrics
    for bad in ([150.0], [-5.0], [float("nan"), 10.0], [None, 50.0], [True]):
        with pytest.raises(ValueError, match=r"Accuracy after step 0 is .*percentages in \[0, 100\]"):
            class_incremental_metrics(bad)
    with pytest.raises(ValueError, match="`step_accuracies` must be a list"):
        class_incremental_metrics("90")
    assert class_incremental_metrics([0, 100.0]) == {"average": 50.0, "last": 100.0}


def test_a_preset_of_zero_shots_is_full_shot_in_its_recipe_too():
    from hf_moe_cl.continual.methods import DDASArguments
    from hf_moe_cl.experiments.presets import PRESETS, MTILPreset
    from hf_moe_cl.experiments.recipes import apply_recipe
    zero = MTILPreset("fewshot-zero", tuple(MTIL_ORDER_I), 500, shots=0, ddas_threshold=0.06)
    [ddas] = apply_recipe(zero, [DDASArguments()], set())
    assert (ddas.ddas_reference_shots, ddas.ddas_augment_once) == (None, False)
    [ddas] = apply_recipe(PRESETS["fewshot-mtil-order-1"], [DDASArguments()], set())
    assert (ddas.ddas_reference_shots, ddas.ddas_augment_once) == (5, True)


def test_a_report_over_an_earlier_ones_folder_leaves_none_of_its_stale_files(tmp_path):
    """A run replaced with overwrite_output_dir (a DDAS run, then one without DDAS, or with evaluate_all_tasks=False)
    left the earlier run's protocol/ and per_image/ reports and route-selection figures beside the new report."""
    earlier = ContinualResult(NAMES, {"protocol": AGNOSTIC, "per_image": AGNOSTIC, "oracle": ORACLE},
                              {"route_histogram": {"protocol": HISTOGRAM, "per_image": HISTOGRAM}})
    write_result_report(tmp_path, earlier, "moe-adapters")
    (tmp_path / "per_image" / "notes.txt").write_text("mine")  # a file no report writes stays
    write_result_report(tmp_path, ContinualResult(NAMES, {"oracle": ORACLE}), "lora")
    assert not (tmp_path / "protocol").exists()
    assert [path.name for path in (tmp_path / "per_image").iterdir()] == ["notes.txt"]
    assert json.loads((tmp_path / "oracle" / "accuracy_matrix.json").read_text())["method"] == "lora"
    unmeasured = [[counts if i == j else None for j, counts in enumerate(stage)] for i, stage in enumerate(HISTOGRAM)]
    write_report(tmp_path / "per_image", "m", NAMES, AGNOSTIC, "per_image", HISTOGRAM)
    write_report(tmp_path / "per_image", "m", NAMES, AGNOSTIC, "per_image", unmeasured)
    assert not list((tmp_path / "per_image").glob("route_selection.*"))
