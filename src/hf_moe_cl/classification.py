"""The classification core: CLIP as a classifier over class-name prompts, as any learned task's model or per image.

Evaluation (with and without a task id), the task-agnostic inference entry point and ConDU's voting all classify
through `RoutedClassifier`. A *route* names the model an image goes through: a learned task (0, 1, ...) or -1,
the method's model for no learned task (the untouched CLIP for MoE-Adapters and ConDU). Every continual method is a
`RouteModels`: it makes its model act as a route's model; those with `mixed_routes` run a batch whose images take
different routes in one pass, the others are run route by route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

ZERO_SHOT = -1
FUSIONS = ("logits", "probabilities")
# The untouched model's embeddings of a batch: for every row, or a function of row indices computing them.
Untouched = Union[None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    max_length = getattr(tokenizer, "model_max_length", None)
    truncate = isinstance(max_length, int) and max_length < 10_000
    return dict(tokenizer(prompts, padding=True, truncation=truncate, return_tensors="pt"))


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, dim) unit-norm float32 image embeddings of a CLIP model (plain or peft)."""
    return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)


PROMPTS_PER_CALL = 1024  # text encoder batch: whole templates of a label space, up to this many prompts


@torch.no_grad()
def text_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
                    normalise: bool = True) -> torch.Tensor:
    """(classes, dim) text embeddings: the mean over the prompt templates of unit features, normalised again
    unless `normalise` is False. Several templates share one text-encoder call (`PROMPTS_PER_CALL` prompts)."""
    per_call = max(1, PROMPTS_PER_CALL // max(1, len(classnames)))
    total = None
    for first in range(0, len(templates), per_call):
        chosen = templates[first:first + per_call]
        tokens = tokenize_prompts(tokenizer, [template.format(name) for template in chosen for name in classnames])
        tokens = {k: v.to(device) for k, v in tokens.items()}
        features = F.normalize(model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        summed = features.view(len(chosen), len(classnames), -1).sum(0)
        total = summed if total is None else total + summed
    return F.normalize(total, dim=-1) if normalise else total / len(templates)


@dataclass(frozen=True)
class LabelSpace:
    """The classes an image is classified among, and the prompt templates that describe them."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def of(cls, classnames: Sequence[str], templates: Sequence[str]) -> "LabelSpace":
        return cls(tuple(classnames), tuple(templates))


class RouteModels(Protocol):
    """What the classification core needs of a continual method."""

    model: nn.Module
    mixed_routes: bool

    def acting_as(self, route: Union[int, torch.Tensor]) -> ContextManager:
        """The model acts as `route`'s model (an int, or one route per image when `mixed_routes`)."""


@dataclass
class ImageRoutes:
    """Per image, the routes whose predictions are combined (batch, m), their weights and how they are fused;
    `selected`: the route the method identified for each image (default `ids[:, 0]`), for selection statistics."""

    ids: torch.Tensor
    weights: Optional[torch.Tensor] = None
    fusion: str = "logits"
    selected: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.ids.dim() == 1:
            self.ids = self.ids.unsqueeze(1)
        if self.fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {self.fusion!r}; use one of {FUSIONS}.")
        if self.selected is None:
            self.selected = self.ids[:, 0]

    @classmethod
    def single(cls, route: int, batch: int, device) -> "ImageRoutes":
        return cls(torch.full((batch,), route, dtype=torch.long, device=device))


class RoutedClassifier:
    """Classifies pixel batches through the models of routes; text embeddings are cached per (route, label space),
    so the models must not change while this object is used: build a new one after training."""

    def __init__(self, models: RouteModels, tokenizer, device, untouched_text: Optional[dict] = None):
        self.models, self.tokenizer, self.device = models, tokenizer, device
        self._text: dict[tuple[int, LabelSpace], torch.Tensor] = {}
        self._untouched_text = self._text if untouched_text is None else untouched_text

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.models.model.logit_scale.exp().float()

    def text(self, space: LabelSpace, route: int) -> torch.Tensor:
        """Text embeddings of a label space through a route's model; route -1's are kept in `untouched_text` when
        given (a cache that outlives this object, for a model for no learned task that never changes)."""
        cache = self._untouched_text if route == ZERO_SHOT else self._text
        key = (route, space)
        if key not in cache:
            with self.models.acting_as(route):
                cache[key] = text_embeddings(self.models.model, self.tokenizer, space.classnames, space.templates,
                                             self.device)
        return cache[key]

    def forget_text(self) -> None:
        """Encode the prompts again at their next use (a noisy router draws new noise)."""
        self._text.clear()

    def image(self, pixels: torch.Tensor, routes: torch.Tensor, untouched: Untouched = None) -> torch.Tensor:
        """Embeddings of `pixels[i]` through route `routes[i]`. Rows routed to -1 take the untouched model's
        embeddings from `untouched` when given: a tensor for every row, or a function of the row indices that
        finishes an untouched pass already begun (so zero-shot images never run twice)."""
        out = torch.empty(pixels.shape[0], self.models.model.config.projection_dim, device=pixels.device)
        pending = torch.ones_like(routes, dtype=torch.bool)
        if untouched is not None:
            zero_shot = routes == ZERO_SHOT
            rows = torch.nonzero(zero_shot).flatten()
            if rows.numel():
                out[rows] = (untouched(rows) if callable(untouched) else untouched[rows]).to(out.dtype)
            pending &= ~zero_shot
        distinct = routes[pending].unique().tolist()
        if self.models.mixed_routes and len(distinct) > 1:
            rows = torch.nonzero(pending).flatten()
            with self.models.acting_as(routes[rows]):
                out[rows] = image_embeddings(self.models.model, pixels[rows])
            return out
        for route in distinct:
            rows = torch.nonzero(pending & (routes == route)).flatten()
            with self.models.acting_as(route):
                out[rows] = image_embeddings(self.models.model, pixels[rows])
        return out

    def similarities(self, images: torch.Tensor, routes: ImageRoutes, space: LabelSpace) -> torch.Tensor:
        """(batch, m, classes) cosine similarities of image embeddings (batch, m, dim), each under its route's text
        features."""
        batch, width = routes.ids.shape
        flat = routes.ids.reshape(-1).to(images.device)
        images = images.reshape(batch * width, -1)
        out = torch.empty(batch * width, len(space.classnames), device=images.device)
        for route in flat.unique().tolist():
            rows = flat == route
            out[rows] = images[rows].float() @ self.text(space, route).T
        return out.view(batch, width, -1)

    def fuse(self, images: torch.Tensor, routes: ImageRoutes, space: LabelSpace) -> torch.Tensor:
        """(batch, classes) fused scores of image embeddings (batch, m, dim) under their routes: weighted logits,
        or weighted softmax probabilities."""
        logits = self.similarities(images, routes, space)
        weights = routes.weights
        if weights is None:
            weights = torch.full(routes.ids.shape, 1.0 / routes.ids.shape[1], device=logits.device)
        if routes.fusion == "probabilities":
            logits = torch.softmax(self.logit_scale * logits, dim=-1)
        return (logits * weights.unsqueeze(-1).to(logits.device, logits.dtype)).sum(1)

    def scores(self, pixels: torch.Tensor, routes: ImageRoutes, space: LabelSpace, untouched: Untouched = None
               ) -> torch.Tensor:
        """(batch, classes) fused scores of `pixels` under their routes (see `fuse`)."""
        batch, width = routes.ids.shape
        if width > 1:
            pixels = pixels.repeat_interleave(width, 0)
            if untouched is not None:
                untouched = (untouched(torch.arange(batch, device=pixels.device)) if callable(untouched)
                             else untouched).repeat_interleave(width, 0)
        return self.fuse(self.image(pixels, routes.ids.reshape(-1), untouched).view(batch, width, -1), routes, space)
