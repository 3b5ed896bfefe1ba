"""The evaluation engine: one pass per test set gives the same cells as evaluating each matrix on its own, each
image is preprocessed and encoded by the untouched model once per run, and the protocol's decisions do not depend
on the evaluation batch size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import colour_task, continual_args, moe_model, tiny_clip_processor, write_tiny_tokenizer
from torch.utils.data import DataLoader

from hf_moe_cl.classification import LabelSpace, ImageRoutes
from hf_moe_cl.continual import ContinualTrainer
from hf_moe_cl.continual.evaluation import CellRequest
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters


def separate_evaluation(trainer, task, kind, route=None, batch_size=32):
    """A matrix cell as evaluated before the engine: its own pass over the test set, one decision per batch for
    the protocol, the untouched embeddings DDAS computes reused for the images it sends to zero-shot."""
    method, classifier = trainer.method, trainer.classifier()
    space = LabelSpace.of(task.classnames, task.templates)
    correct = total = 0
    for batch in DataLoader(task.eval_dataset, batch_size=batch_size, collate_fn=trainer.evaluation_collator):
        pixels, labels = batch["pixel_values"], batch["labels"]
        if kind == "oracle":
            routes, untouched = ImageRoutes.single(route, pixels.shape[0], pixels.device), None
        else:
            routes, untouched = method.select_routes(classifier, pixels)
            if kind == "protocol":  # one decision for the batch, from its mean errors
                errors = method.moe.selector.reconstruction_errors(method.selector_features(pixels)[0])
                routes = ImageRoutes.single(int(method.moe.selector.select_units(errors, len(errors))[0]),
                                       pixels.shape[0], pixels.device)
        with torch.no_grad():
            correct += int((classifier.scores(pixels, routes, space, untouched).argmax(-1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / total


def test_engine_cells_equal_separate_evaluation_and_images_are_encoded_once(ddas_run):
    model, tasks, result, _ = ddas_run
    trainer = ddas_run_trainer(model, tasks)
    last = len(tasks) - 1
    for j, task in enumerate(tasks):
        assert result.matrices["oracle"][last][j] == separate_evaluation(trainer, task, "oracle", j)
        for kind in ("per_image", "protocol"):
            assert result.matrices[kind][last][j] == separate_evaluation(trainer, task, kind), (kind, j)
    encodings = result.diagnostics["image_encodings"]
    assert len(encodings) == len(tasks)
    images = sum(len(task.eval_dataset) for task in tasks)
    # the untouched model encodes every test image once in the whole run (zero-shot cells, DDAS features, images
    # sent to zero-shot); the routed model at most once per image and distinct route, and at least the oracle's
    assert sum(stage["untouched"] for stage in encodings) == images
    for stage, counts in enumerate(encodings):
        oracle = sum(len(task.eval_dataset) for task in tasks[: stage + 1])
        assert oracle <= counts["routed"] <= oracle + images


def ddas_run_trainer(model, tasks):
    """A trainer over the fitted model of `ddas_run`, for evaluating it again."""
    folder = Path(tempfile.mkdtemp())
    processor = tiny_clip_processor(write_tiny_tokenizer(folder))
    method = MoEAdapters(model, ddas=DDASArguments(ddas=True))
    trainer = ContinualTrainer(method=method, args=continual_args(folder / "run"), processing_class=processor)
    trainer.num_routes = method.route_count(tasks)
    return trainer


def test_protocol_decisions_do_not_depend_on_the_evaluation_batch(ddas_run):
    model, tasks, _, _ = ddas_run
    trainer = ddas_run_trainer(model, tasks)
    task = colour_task("mixed", n_eval=40, seed=4)  # more images than one decision unit of 16
    results = []
    for batch_size in (3, 16, 64):
        trainer.args.per_device_eval_batch_size, trainer.args.protocol_unit = batch_size, 16
        trainer._engine = None
        cells = trainer.engine.evaluate(task, CellRequest(oracle=0, per_image=True, protocol=True),
                                        trainer.classifier())
        results.append({kind: (cell.accuracy, cell.histogram) for kind, cell in cells.items()})
    assert results[0] == results[1] == results[2]


def test_cached_images_are_read_once_and_the_cache_is_bounded(ddas_run, monkeypatch):
    model, tasks, _, _ = ddas_run
    trainer = ddas_run_trainer(model, tasks)
    engine = trainer.engine
    reads = []
    loader = engine._loader
    monkeypatch.setattr(engine, "_loader", lambda task: reads.append(task.name) or loader(task))
    for _ in range(3):
        engine.evaluate(tasks[0], CellRequest(oracle=0), trainer.classifier())
    assert reads == [tasks[0].name]
    assert 0 < engine.used <= engine.budget
    trainer.args.eval_cache_gb = 0
    trainer._engine = None
    engine = trainer.engine
    reads.clear()
    monkeypatch.setattr(engine, "_loader", lambda task: reads.append(task.name) or loader(task))
    for _ in range(2):
        engine.evaluate(tasks[0], CellRequest(oracle=0), trainer.classifier())
    assert reads == [tasks[0].name] * 2 and engine.used == 0


def test_bad_evaluation_options_are_refused():
    for bad in ({"eval_cache_gb": -1}, {"eval_cache_gb": float("nan")}, {"protocol_unit": 0},
                {"protocol_unit": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            continual_args("/tmp/unused", **bad)


def test_route_counts_per_stage_without_selection(tmp_path, module_processor):
    """Without DDAS only the oracle runs: one routed encoding per image of every learned task, and the untouched
    model only for the cells of tasks not learned yet (measured once, before training)."""
    tasks = [colour_task("a", n_train=16, n_eval=8, seed=0), colour_task("b", n_train=16, n_eval=8, seed=1)]
    method = MoEAdapters(moe_model(), ddas=DDASArguments(ddas=False))
    result = ContinualTrainer(method=method, args=continual_args(tmp_path, max_steps=1),
                              processing_class=module_processor).train_tasks(tasks)
    assert result.diagnostics["image_encodings"] == [{"untouched": 8, "routed": 8}, {"untouched": 0, "routed": 16}]


def test_evaluate_all_tasks_false_leaves_every_matrix_to_the_task_just_trained(tmp_path, module_processor):
    """Only the task just trained is evaluated, in the task-agnostic matrices too: one pass over its 12 images per
    stage (the untouched model once for DDAS's features), its cells alone filled, the others None with no histogram;
    metrics need cells off the diagonal, so none is reported."""
    from conftest import noise_images

    tasks = [colour_task("first", n_train=24, n_eval=12, seed=0),
             colour_task("second", n_train=24, n_eval=12, seed=1, offset=3)]
    ddas = DDASArguments(ddas=True, ddas_task_steps=20, ddas_reference_steps=20, ddas_hidden_dim=8,
                         ddas_quantile=1.0)
    method = MoEAdapters(moe_model(), ddas=ddas, ddas_reference=noise_images(16, 0))
    args = continual_args(tmp_path, max_steps=1, task_agnostic_eval=True, evaluate_all_tasks=False)
    result = ContinualTrainer(method=method, args=args, processing_class=module_processor).train_tasks(tasks)
    assert list(result.matrices) == ["protocol", "per_image", "oracle"]
    for kind, matrix in result.matrices.items():
        assert matrix[0][1] is None and matrix[1][0] is None, kind
        assert all(0.0 <= matrix[i][i] <= 100.0 for i in range(2)), kind
    for kind, stages in result.diagnostics["route_histogram"].items():
        assert stages[0][1] is None and stages[1][0] is None, kind
        assert sum(stages[0][0]) == sum(stages[1][1]) == 12, kind
    assert [stage["untouched"] for stage in result.diagnostics["image_encodings"]] == [12, 12]
    assert result.metrics == {} and result.all_results() == {"headline_matrix": "protocol"}
    from hf_moe_cl.experiments.reporting import UNMEASURED_SELECTION, write_result_report

    write_result_report(tmp_path / "report", result, "moe-adapters")  # the report says what was not measured
    assert UNMEASURED_SELECTION in (tmp_path / "report" / "metrics.md").read_text()
    assert UNMEASURED_SELECTION in (tmp_path / "report" / "protocol" / "metrics.md").read_text()
    assert not (tmp_path / "report" / "protocol" / "route_selection.json").exists()
