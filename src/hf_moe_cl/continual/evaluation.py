"""Accuracy of a continual method on a task: with the true task id, or with the routes the method picks itself."""

from __future__ import annotations

from typing import Optional

import torch

from ..classification import LabelSpace, RoutedClassifier, Routes


@torch.no_grad()
def evaluate_task(trainer, method, classifier: RoutedClassifier, task, kind: str = "oracle",
                  route: Optional[int] = None) -> tuple[float, Optional[list[int]]]:
    """Top-1 accuracy (%) on `task`'s eval split, and for `per_image`/`protocol` how many images went to each route.

    `oracle`: every image through `route`. `per_image`: the method picks each image's routes. `protocol`: it picks
    one route per evaluation batch (batches hold images of one dataset, as in the official evaluation). Images are
    classified among the task's class names, the text encoded through each image's route. The route counts are
    over [-1 (zero-shot), task 0, task 1, ...] of the route the method identified.
    """
    if kind == "oracle" and route is None:
        raise ValueError("Oracle evaluation needs the task's route.")
    space = LabelSpace.of(task.classnames, task.templates)
    device = trainer.args.device
    method.model.eval()
    correct = total = 0
    histogram: Optional[torch.Tensor] = None
    label = f"evaluating {task.name}" + ("" if kind == "oracle" else f" ({kind.replace('_', '-')})")
    for batch in trainer.progress(trainer.get_eval_dataloader(task.eval_dataset), label):
        pixels, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
        if kind == "oracle":
            routes, untouched = Routes.single(route, pixels.shape[0], device), None
        else:
            routes, untouched = method.select_routes(classifier, pixels, per_batch=kind == "protocol")
        predictions = classifier.scores(pixels, routes, space, untouched).argmax(-1)
        predictions, labels, selected = trainer.accelerator.gather_for_metrics(
            (predictions, labels, routes.selected.to(device))
        )
        correct += int((predictions == labels).sum())
        total += labels.numel()
        if kind != "oracle":
            counts = torch.bincount(selected + 1, minlength=trainer.num_routes + 1)
            histogram = counts if histogram is None else histogram + counts
    return 100.0 * correct / total, None if histogram is None else histogram.tolist()
