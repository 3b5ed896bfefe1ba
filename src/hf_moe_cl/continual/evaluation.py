"""Evaluation of a continual method: every cell a stage asks of a task from one pass over its test set.

A stage measures a task in up to three matrices: `oracle` (through a given route), `per_image` (the method picks
each image's routes) and `protocol` (it picks one route per `protocol_unit` images of the test set, the official
DDAS decision per test batch). `EvaluationEngine` serves them together:
- each test image is decoded and preprocessed once per run while the cache (`eval_cache_gb`) has room;
- the untouched model (route -1) encodes an image once per stage, once per run when that model never changes
  (`ContinualMethod.untouched_is_fixed`): its embeddings are the zero-shot predictions, DDAS's features and what
  images sent to zero-shot are classified with;
- the routed model encodes an image once per distinct route its cells ask for, the three matrices sharing a pass
  wherever their routes agree; text features are encoded once per route and label space (`official_cil_eval`:
  once per 64 test images, as the official class-incremental code).
`diagnostics["image_encodings"]` of a run counts both kinds of encodings per stage.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..classification import ZERO_SHOT, ImageRoutes, LabelSpace, RoutedClassifier, image_embeddings
from .result import MATRIX_KINDS

PAIR = 1 << 20  # (image, route) pairs are keyed image * PAIR + route
OFFICIAL_CIL_EVAL_BATCH = 64  # MoE-Adapters4CL cil/main.py line 55; every batch encodes the prompts (models.py 36-40)


@dataclass(frozen=True)
class CellRequest:
    """What a stage measures on one task: the oracle cell's route (None: no oracle cell) and whether the
    task-agnostic cells are wanted."""

    oracle: Optional[int] = None
    per_image: bool = False
    protocol: bool = False

    @property
    def kinds(self) -> list[str]:
        flags = {"oracle": self.oracle is not None, "per_image": self.per_image, "protocol": self.protocol}
        return [kind for kind, wanted in flags.items() if wanted]


@dataclass
class CellResult:
    """Top-1 accuracy (%) of one cell and, for task-agnostic cells, how many images went to each route (over
    [-1 (zero-shot), task 0, task 1, ...] of the route the method identified); both None for a cell not evaluated."""

    accuracy: Optional[float]
    histogram: Optional[list[int]] = None


class EvaluationEngine:
    """Fills matrix cells for a trainer's method; build one per run (its caches outlive stages, not runs)."""

    def __init__(self, trainer, method):
        self.trainer, self.method = trainer, method
        # official_cil_eval crops test images anew at every evaluation: nothing to keep
        self.budget = 0 if trainer.args.official_cil_eval else int(trainer.args.eval_cache_gb * 2**30)
        self.used = 0
        self._images: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._untouched: dict[tuple, torch.Tensor] = {}
        self.untouched_text: dict = {}  # text features through route -1, when that model never changes
        self.encodings = {"untouched": 0, "routed": 0}

    # ----- images --------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(task) -> tuple:
        dataset = task.eval_dataset
        return task.name, getattr(dataset, "_fingerprint", None) or id(dataset), len(dataset)

    def _loader(self, task) -> DataLoader:
        """The test set's share of this process: whole protocol units (`protocol_unit` consecutive images) dealt
        out in turn, so no image is evaluated twice and every decision unit stays on one process."""
        args, accelerator = self.trainer.args, self.trainer.accelerator
        dataset = task.eval_dataset
        world, rank = accelerator.num_processes, accelerator.process_index
        if world > 1:
            dataset = Subset(dataset, [i for i in range(len(dataset)) if (i // args.protocol_unit) % world == rank])
        return DataLoader(dataset, batch_size=args.per_device_eval_batch_size,
                          collate_fn=self.trainer.evaluation_collator, num_workers=args.dataloader_num_workers,
                          pin_memory=args.dataloader_pin_memory)

    def _batches(self, task) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pixels, labels) of this process's share of the test set on the CPU, from the cache or read now."""
        key = self._key(task)
        if key in self._images:
            yield from self._images[key]
            return
        kept: Optional[list] = [] if self.budget > 0 else None
        size = 0
        for batch in self.trainer.task_context().progress(self._loader(task), f"reading {task.name}"):
            pixels, labels = batch["pixel_values"], batch["labels"]
            if kept is not None:
                size += pixels.numel() * pixels.element_size() + labels.numel() * labels.element_size()
                if self.used + size <= self.budget:
                    kept.append((pixels, labels))
                else:
                    kept = None
            yield pixels, labels
        if kept is not None:
            self._images[key] = kept
            self.used += size

    def _blocks(self, task, rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, pixels, labels) in blocks of `rows` images (the last may be shorter)."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        held = start = 0
        for pixels, labels in self._batches(task):
            pending.append((pixels, labels))
            held += pixels.shape[0]
            while held >= rows:
                pixels_all, labels_all = torch.cat([p for p, _ in pending]), torch.cat([lab for _, lab in pending])
                yield start, pixels_all[:rows], labels_all[:rows]
                start += rows
                held -= rows
                pending = [(pixels_all[rows:], labels_all[rows:])] if held else []
        if held:
            yield start, torch.cat([p for p, _ in pending]), torch.cat([lab for _, lab in pending])

    # ----- encodings -----------------------------------------------------------------------------------------------
    def _precision(self):
        args = self.trainer.args
        if not (args.bf16_full_eval or args.fp16_full_eval):
            return nullcontext()
        return torch.autocast(args.device.type, dtype=torch.bfloat16 if args.bf16_full_eval else torch.float16)

    def _untouched_of(self, task, start: int, pixels: torch.Tensor) -> torch.Tensor:
        """The untouched model's embeddings of rows `start...` of this process's share of the task's test set."""
        cached = self._untouched.get(self._key(task))
        if cached is not None:
            return cached[start:start + pixels.shape[0]].to(pixels.device)
        size = self.trainer.args.per_device_eval_batch_size
        with self.method.acting_as(ZERO_SHOT), self._precision():
            embeddings = torch.cat([image_embeddings(self.method.model, pixels[i:i + size])
                                    for i in range(0, pixels.shape[0], size)])
        self.encodings["untouched"] += pixels.shape[0]
        return embeddings

    def _keep_untouched(self, task, parts: list[torch.Tensor]) -> None:
        key = self._key(task)
        if not parts or key in self._untouched or not self.method.untouched_is_fixed:
            return
        embeddings = torch.cat(parts).cpu()
        size = embeddings.numel() * embeddings.element_size()
        if self.used + size <= self.budget:
            self._untouched[key] = embeddings
            self.used += size

    def _routed(self, pixels: torch.Tensor, rows: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """Embeddings of `pixels[rows[i]]` through `routes[i]` (all >= 0), in evaluation batches: one mixed pass
        each for a method whose model routes images differently in one batch, else route by route."""
        out = torch.empty(rows.shape[0], self.method.model.config.projection_dim, device=pixels.device)
        size = self.trainer.args.per_device_eval_batch_size
        groups = [(None, torch.arange(rows.shape[0], device=rows.device))] if self.method.mixed_routes else [
            (route, torch.nonzero(routes == route).flatten()) for route in routes.unique().tolist()]
        for route, members in groups:
            for i in range(0, members.shape[0], size):
                part = members[i:i + size]
                chosen = routes[part] if route is None else route
                if route is None and bool((chosen == chosen[0]).all()):
                    chosen = int(chosen[0])  # one route: the whole-batch routing of a single task
                with self.method.acting_as(chosen), self._precision():
                    out[part] = image_embeddings(self.method.model, pixels[rows[part]])
        self.encodings["routed"] += rows.shape[0]
        return out

    # ----- cells ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task, request: CellRequest, classifier: RoutedClassifier) -> dict[str, CellResult]:
        """The cells of `request` on `task`, from one pass over its test set."""
        kinds = request.kinds
        if not kinds:
            return {}
        trainer, method, args = self.trainer, self.method, self.trainer.args
        device = args.device
        space = LabelSpace.of(task.classnames, task.templates)
        selecting = request.per_image or request.protocol
        unit = args.protocol_unit if request.protocol else None
        official = args.official_cil_eval
        block = OFFICIAL_CIL_EVAL_BATCH if official else max(args.per_device_eval_batch_size, unit or 1)
        if unit:
            block = -(-block // unit) * unit
        method.model.eval()
        correct = {kind: 0 for kind in kinds}
        total = 0
        histograms = {kind: torch.zeros(trainer.num_routes + 1, dtype=torch.long, device=device)
                      for kind in kinds if kind != "oracle"}
        needs_untouched = selecting or request.oracle == ZERO_SHOT
        untouched_parts = []
        for start, pixels, labels in self._blocks(task, block):
            if official:
                classifier.forget_text()
            pixels, labels = pixels.to(device), labels.to(device)
            batch = pixels.shape[0]
            untouched = self._untouched_of(task, start, pixels) if needs_untouched else None
            if untouched is not None:
                untouched_parts.append(untouched)
            routes: dict[str, ImageRoutes] = {}
            if request.oracle is not None:
                routes["oracle"] = ImageRoutes.single(request.oracle, batch, device)
            if selecting:
                with self._precision():
                    chosen = method.choose_routes(classifier, pixels, untouched, unit)
                if request.per_image:
                    routes["per_image"] = chosen[0]
                if request.protocol:
                    routes["protocol"] = ImageRoutes(chosen[1].to(device).repeat_interleave(unit)[:batch])
            embeddings = self._embed(pixels, routes, untouched)
            for kind, kind_routes in routes.items():
                scores = classifier.fuse(embeddings[kind], kind_routes, space)
                correct[kind] += int((scores.argmax(-1) == labels).sum())
                if kind in histograms:
                    histograms[kind] += torch.bincount(kind_routes.selected.to(device) + 1,
                                                       minlength=trainer.num_routes + 1)
            total += batch
        self._keep_untouched(task, untouched_parts)
        counts = trainer.accelerator.reduce(torch.tensor([total] + [correct[k] for k in kinds], device=device), "sum")
        total = int(counts[0])
        return {kind: CellResult(100.0 * int(counts[1 + i]) / total,
                                 trainer.accelerator.reduce(histograms[kind], "sum").tolist()
                                 if kind in histograms else None)
                for i, kind in enumerate(kinds)}

    def _embed(self, pixels: torch.Tensor, routes: dict[str, ImageRoutes], untouched: Optional[torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """Per kind, (batch, width, dim) image embeddings of every image under each of its routes: route -1 from
        the untouched embeddings, every other (image, route) pair encoded once for all kinds together."""
        images = torch.arange(pixels.shape[0], device=pixels.device).unsqueeze(1)
        ids = {kind: r.ids.to(pixels.device) for kind, r in routes.items()}
        keys = {kind: images * PAIR + kind_ids for kind, kind_ids in ids.items()}
        unique = torch.unique(torch.cat([keys[kind][kind_ids >= 0] for kind, kind_ids in ids.items()]))
        encoded = self._routed(pixels, unique // PAIR, unique % PAIR) if unique.numel() else None
        out = {}
        for kind, kind_ids in ids.items():
            result = torch.empty(*kind_ids.shape, self.method.model.config.projection_dim, device=pixels.device)
            zero_shot = kind_ids == ZERO_SHOT
            if bool(zero_shot.any()):
                result[zero_shot] = untouched.unsqueeze(1).expand(*kind_ids.shape, -1)[zero_shot].to(result.dtype)
            if not bool(zero_shot.all()):
                result[~zero_shot] = encoded[torch.searchsorted(unique, keys[kind][~zero_shot])]
            out[kind] = result
        return out

    # ----- a stage -------------------------------------------------------------------------------------------------
    def agnostic_kinds(self) -> list[str]:
        """The task-agnostic matrices the run fills (`task_agnostic_eval`; None: whichever the method can)."""
        wanted = self.trainer.args.task_agnostic_eval
        if not (self.method.selects_routes if wanted is None else wanted):
            return []
        if not self.method.selects_routes:
            raise ValueError(
                f"task_agnostic_eval needs a method that picks a model per image without a task id; "
                f"{type(self.method).__name__} cannot (MoE-Adapters needs a DDAS selector: DDASArguments(ddas=True)).")
        return [kind for kind in MATRIX_KINDS[:2] if kind == "per_image" or self.method.batch_selection]

    def pretrained_accuracies(self, tasks: list, classifier: RoutedClassifier) -> dict[int, float]:
        """Accuracy of the method's model for no learned task (-1) on every task that some cell evaluates with it,
        measured before any training: that model never changes."""
        method, last = self.method, len(tasks) - 1
        needed = {j for j in range(len(tasks)) if method.cell_route(j, j) == ZERO_SHOT}
        if self.trainer.args.evaluate_all_tasks:
            needed |= {j for i in range(last) for j in range(i + 1, len(tasks))
                       if method.cell_route(i, j) == ZERO_SHOT}
        return {j: self.evaluate(tasks[j], CellRequest(oracle=ZERO_SHOT), classifier)["oracle"].accuracy
                for j in sorted(needed)}

    def stage(self, index: int, tasks: list, classifier: RoutedClassifier, matrices: dict, histograms: dict,
              pretrained: dict[int, float]) -> dict[str, list]:
        """The cells of every matrix after task `index`, each task's from one pass over its test set: the oracle
        row's accuracies, and per task-agnostic kind its `CellResult`s. A task not evaluated at this stage
        (`evaluate_all_tasks=False`) has None cells in every matrix. A cell that cannot change is reused (a final
        task model's: its diagonal; the model for no learned task: the `pretrained` accuracy); an unseen task whose
        route is None (the method's own selection) takes its per-image cell."""
        method = self.method
        rows = {kind: [] for kind in matrices}
        for j, other in enumerate(tasks):
            oracle, reuse = None, None
            if not (self.trainer.args.evaluate_all_tasks or j == index):
                rows["oracle"].append(None)
                for kind in histograms:
                    rows[kind].append(CellResult(None))
                continue
            if j < index and method.task_models_are_final:
                reuse = (matrices["oracle"][j][j],)
            elif (route := method.cell_route(index, j)) == ZERO_SHOT:
                reuse = (pretrained[j],)
            else:
                oracle = route
            request = CellRequest(oracle=oracle, per_image="per_image" in histograms or oracle is None and
                                  reuse is None, protocol="protocol" in histograms)
            cells = self.evaluate(other, request, classifier)
            rows["oracle"].append(reuse[0] if reuse is not None else cells["oracle" if oracle is not None else
                                                                            "per_image"].accuracy)
            for kind in histograms:
                rows[kind].append(cells[kind])
        return rows
