import json

import pytest
from datasets import Dataset
from PIL import Image

from hf_moe_cl.presets import (
    MTIL_DATASETS,
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    class_incremental_tasks,
    few_shot_subset,
)
from hf_moe_cl.benchmark.reporting import markdown_table, write_report


def test_report_files_hold_the_matrix_and_metrics(tmp_path):
    matrix = [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]]
    metrics = write_report(tmp_path, "moe", ["a", "b", "c"], matrix)
    assert metrics == {"transfer": 32.5, "average": 50.0, "last": 80.0}
    saved = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert saved["accuracy_matrix"] == matrix and saved["metrics"] == metrics
    lines = (tmp_path / "accuracy_matrix.csv").read_text().splitlines()
    assert lines[0] == "after \\ on,a,b,c" and lines[2] == "b,40.00,50.00,60.00"
    assert "| moe | 32.5 | 50.0 | 80.0 |" in (tmp_path / "metrics.md").read_text()
    image = Image.open(tmp_path / "accuracy_matrix.png")
    assert image.size[0] > 3 * 56 and image.size[1] > 3 * 56


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
