import json
import re
from pathlib import Path

import numpy as np
import pytest

from hf_moe_cl.experiments.metrics import (
    average,
    backward_transfer,
    class_incremental_metrics,
    forgetting,
    last,
    mtil_metrics,
    task_drops,
    transfer,
)

MATRIX = [
    [10.0, 20.0, 30.0],
    [40.0, 50.0, 60.0],
    [70.0, 80.0, 90.0],
]


def test_mtil_metrics_match_a_hand_computed_matrix():
    # Transfer: column 2 -> A[0][1] = 20; column 3 -> (A[0][2] + A[1][2]) / 2 = 45; mean = 32.5
    assert transfer(MATRIX) == pytest.approx(32.5)
    # Average: column means 40, 50, 60 -> 50
    assert average(MATRIX) == pytest.approx(50.0)
    # Last: final row mean
    assert last(MATRIX) == pytest.approx(80.0)
    assert mtil_metrics(MATRIX) == {"transfer": 32.5, "average": 50.0, "last": 80.0}


def test_transfer_averages_columns_first_not_all_cells():
    matrix = [[0, 10, 100, 0], [0, 0, 50, 0], [0, 0, 0, 90], [0, 0, 0, 0]]
    # columns: [10], [100, 50], [0, 0, 90] -> 10, 75, 30 -> 38.333 (a cell mean would give 250 / 6 = 41.67)
    assert transfer(matrix) == pytest.approx((10 + 75 + 30) / 3)


def test_class_incremental_metrics():
    assert class_incremental_metrics([90.0, 80.0, 70.0]) == {"average": 80.0, "last": 70.0}
    with pytest.raises(ValueError):
        class_incremental_metrics([])


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        average([[1.0, 2.0]])
    with pytest.raises(ValueError, match="two tasks"):
        transfer([[1.0]])


def test_forgetting_matches_hand_computed_matrices():
    # diagonal 10, 50, 90; last row 70, 80, 90: tasks gained 60 and 30 points after they trained
    assert task_drops(MATRIX) == [-60.0, -30.0, 0.0]
    assert backward_transfer(MATRIX) == pytest.approx(45.0)  # mean(70 - 10, 80 - 50)
    forgetting_matrix = [[50.0, 1.0, 2.0, 3.0], [40.0, 60.0, 4.0, 5.0], [30.0, 55.0, 70.0, 6.0],
                         [20.0, 50.0, 70.0, 80.0]]
    assert task_drops(forgetting_matrix) == [30.0, 10.0, 0.0, 0.0]
    assert backward_transfer(forgetting_matrix) == pytest.approx(-40.0 / 3)  # mean(-30, -10, 0)
    assert forgetting(forgetting_matrix, ["a", "b", "c", "d"]) == {
        "bwt": pytest.approx(-40.0 / 3), "drop": {"a": 30.0, "b": 10.0, "c": 0.0, "d": 0.0}}


def test_forgetting_needs_the_diagonal_and_the_last_row():
    current_task_only = [[50.0, None], [None, 60.0]]
    with pytest.raises(ValueError, match=r"cells \[\(1, 0\)\] were not evaluated"):
        backward_transfer(current_task_only)
    with pytest.raises(ValueError, match="two tasks"):
        backward_transfer([[1.0]])
    with pytest.raises(ValueError, match="3 task names"):
        forgetting([row[:2] for row in MATRIX[:2]], ["a", "b", "c"])


def test_the_worked_example_of_docs_metrics_md_runs():
    text = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/metrics.md lost its worked example"
    for block in blocks:
        exec(compile(block, "docs/metrics.md", "exec"), {})


def test_the_evaluate_module_loads_offline_and_is_the_implementation_reports_use(monkeypatch):
    import evaluate

    import hf_moe_cl.metrics
    from hf_moe_cl.experiments import metrics as library
    from hf_moe_cl.metrics.mtil import mtil as module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    matrix = [[50.0, 10.0, 20.0], [45.0, 60.0, 25.0], [40.0, 55.0, 70.0]]
    scores = evaluate.load(hf_moe_cl.metrics.MTIL).compute(accuracies=matrix, task_names=["a", "b", "c"])
    assert scores == {"transfer": 16.25, "average": 41.666666666666664, "last": 55.0, "bwt": -7.5,
                      "drop": {"a": 10.0, "b": 5.0, "c": 0.0}}
    assert scores == {**library.mtil_metrics(matrix), **library.forgetting(matrix, ["a", "b", "c"])}
    for name in ("transfer", "average", "last", "task_drops", "backward_transfer", "forgetting", "mtil_metrics"):
        assert getattr(library, name) is getattr(module, name)  # no copy


@pytest.mark.parametrize("matrices, expected", [
    ({"oracle": [[42.0]]}, {"average": 42.0, "last": 42.0}),  # one task: no Transfer
    ({"oracle": [[80.0, None], [70.0, 85.0]]}, {"last": 77.5}),  # zero-shot cell not evaluated
    ({"oracle": [[80.0, None], [None, 85.0]]}, {}),  # evaluate_all_tasks=False
    ({"oracle": [[80.0, 20.0], [70.0, 85.0]], "protocol": [[70.0, None], [60.0, 75.0]]}, {"last": 67.5}),
])
def test_result_metrics_are_those_the_evaluated_cells_allow_as_all_results_says(matrices, expected):
    from hf_moe_cl.continual.result import ContinualResult

    result = ContinualResult(list("ab")[:len(matrices["oracle"])], matrices)
    assert result.metrics == expected
    headline = result.all_results()
    assert {name: headline[f"{result.headline}_{name}"] for name in expected} == expected
    assert not {f"{result.headline}_{name}" for name in {"transfer", "average", "last"} - set(expected)} & set(headline)


@pytest.mark.parametrize("accuracies, task_names, message", [
    ([[80, 20], [70, 85]], ["a", "a"], r"Task names \['a'\] repeat"),
    ([[80, 20], [70, 85]], ["a"], "1 task names for a matrix of 2 tasks"),
    ([[180, -20], [70, 85]], None, r"A\[0\]\[0\] is 180.0: accuracies are percentages in \[0, 100\]"),
    ([[80, -0.5], [70, 85]], None, r"A\[0\]\[1\] is -0.5"),
    ([[0.8, 0.2], [0.7, 100.5]], None, r"A\[1\]\[1\] is 100.5"),
    ([[float("nan"), 20], [70, 85]], None, r"A\[0\]\[0\] is nan: .* None, not NaN"),
])
def test_the_evaluate_metric_refuses_repeated_names_and_accuracies_outside_0_to_100(accuracies, task_names, message):
    import evaluate

    import hf_moe_cl.metrics

    with pytest.raises(ValueError, match=message):
        evaluate.load(hf_moe_cl.metrics.MTIL).compute(accuracies=accuracies, task_names=task_names)
    assert evaluate.load(hf_moe_cl.metrics.MTIL).compute(accuracies=[[0, 100], [None, 50]]) == {"transfer": 100.0}


@pytest.mark.parametrize("kind", ["protocol", "per_image", "oracle"])
def test_every_report_figure_title_fits_inside_the_figure(kind):
    from hf_moe_cl.experiments.figures import accuracy_heatmap, selection_heatmap

    names = ["caltech101", "fashion_mnist"]
    figures = [accuracy_heatmap([[90.0, 10.0], [85.0, 60.0]], names, "moe-adapters", kind,
                                {"transfer": 10.0, "average": 60.0, "last": 72.5})]
    if kind != "oracle":
        figures.append(selection_heatmap([[5, 90, 5], [10, 3, 87]], names, "moe-adapters", kind))
    for figure in figures:
        renderer = figure.canvas.get_renderer()
        figure.canvas.draw()
        title = figure._suptitle.get_window_extent(renderer)
        assert title.x0 >= 0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height, (kind, title)


@pytest.mark.parametrize("accuracy", [0.0, 100.0, 37.5])
def test_a_one_task_report_gives_average_and_last_as_all_results_does(tmp_path, accuracy):
    from hf_moe_cl.continual.result import ContinualResult
    from hf_moe_cl.experiments.reporting import write_result_report

    result = ContinualResult(["mnist"], {"oracle": [[accuracy]]})
    assert write_result_report(tmp_path, result, "moe-adapters") == {"oracle": {"average": accuracy,
                                                                                "last": accuracy}}
    assert result.all_results() == {"headline_matrix": "oracle", "oracle_average": accuracy, "oracle_last": accuracy}
    row = f"| oracle: task-aware (true task ids) | - | {accuracy:.1f} | {accuracy:.1f} | - |"
    assert row in (tmp_path / "metrics.md").read_text()
    written = json.loads((tmp_path / "oracle" / "accuracy_matrix.json").read_text())
    assert written["metrics"] == {"average": accuracy, "last": accuracy} and written["forgetting"] is None


def test_a_report_of_a_numpy_matrix_is_written_as_of_the_same_list(tmp_path):
    from hf_moe_cl.experiments.reporting import write_report

    rows = [[55.0, 12.0, 70.0], [50.0, 90.0, 71.0], [40.0, 80.0, 95.0]]
    names = ["mnist", "cifar10", "dtd"]
    for folder, matrix in (("list", rows), ("array", np.array(rows)), ("float32", np.array(rows, dtype=np.float32)),
                           ("array rows", [np.array(row) for row in rows])):
        metrics = write_report(tmp_path / folder, "m", names, matrix)
        assert metrics == {"transfer": 41.25, "average": pytest.approx(62.5555555), "last": pytest.approx(71.666666)}
        for name in ("accuracy_matrix.json", "accuracy_matrix.csv", "metrics.md"):
            assert (tmp_path / folder / name).read_text() == (tmp_path / "list" / name).read_text(), (folder, name)


@pytest.mark.parametrize("metric, cells", [(transfer, r"\[\(0, 1\)\]"), (average, r"\[\(0, 1\), \(1, 0\)\]"),
                                           (last, r"\[\(1, 0\)\]")])
def test_a_metric_of_cells_not_evaluated_names_them(metric, cells):
    with pytest.raises(ValueError, match=rf"cells {cells} were not evaluated \(train with evaluate_all_tasks=True\)"):
        metric([[50.0, None], [None, 60.0]])


def test_class_incremental_metrics_take_a_numpy_or_torch_vector():
    import torch

    for steps in (np.array([90.0, 80.0, 70.0]), torch.tensor([90.0, 80.0, 70.0])):
        assert class_incremental_metrics(steps) == {"average": 80.0, "last": 70.0}
    with pytest.raises(ValueError, match=r"Accuracy after step 0 is \[90.0, 80.0\]"):
        class_incremental_metrics(np.array([[90.0, 80.0]]))


def test_a_matrix_with_a_zero_shot_row_first_is_refused_naming_that_row():
    with_zero_shot = [[12.0, 30.0, 8.0]] + [[80.0, 20.0, 30.0], [70.0, 85.0, 35.0], [60.0, 75.0, 90.0]]
    with pytest.raises(ValueError, match=r"got 4 row\(s\) of \[3\] value\(s\): drop the first row, the zero-shot"):
        mtil_metrics(with_zero_shot)
    assert mtil_metrics(with_zero_shot[1:])["transfer"] == 26.25
    with pytest.raises(ValueError, match=r"square .*, got 2 row\(s\) of \[1, 2\] value\(s\)\.$"):
        average([[1.0, 2.0], [3.0]])
