"""Task-agnostic image classification: images in, labels out, the method choosing each image's task model."""

from __future__ import annotations

import os
import urllib.request
from io import BytesIO
from typing import Any, Optional, Sequence

import torch
from PIL import Image, ImageOps
from transformers.image_utils import load_image

from .classification import ZERO_SHOT, LabelSpace, RoutedClassifier, ImageRoutes, Untouched
from .condu import holds_condu
from .continual.preprocessing import to_rgb
from .continual.tasks import check_prompt_tokens
from .continual.methods import ConDU, ContinualMethod, method_for_model
from .options import check_label_space


def check_adapter_source(adapter_name_or_path: str, subfolder: Optional[str] = None) -> None:
    """Refuse, before any Hub call, a local-looking path (of an adapter or a base model) that does not exist."""
    name = os.fspath(adapter_name_or_path)
    looks_local = os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or os.sep in name.replace("/", "")
    if looks_local and subfolder and os.path.isdir(name) and not os.path.isdir(os.path.join(name, subfolder)):
        raise FileNotFoundError(f"The folder {name} has no subfolder {subfolder!r}: give the subfolder the model was "
                                "saved to (relative to that folder).")
    if looks_local and not os.path.isdir(os.path.join(name, subfolder or "")):
        raise FileNotFoundError(f"{name} is neither a folder here nor a Hub repo id (namespace/name): give the folder "
                                "a model was saved to with save_pretrained, or a repo id.")


HUB_OPTIONS = ("subfolder", "revision", "token")  # what a ConDU save's loader takes besides the base model


def check_loader_options(options: dict, allowed, what: str) -> None:
    """Refuse a keyword argument of a `from_pretrained` that nothing would read (it was silently dropped)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        named_base = {"base_model", "base_model_name"} & set(unknown)
        hint = "; the base CLIP is `base_model_name_or_path`" if named_base else ""
        raise ValueError(f"Unknown keyword argument(s) {unknown} for loading {what}{hint}. It takes "
                         f"{', '.join(sorted(allowed))}.")


def _peft_options() -> set[str]:
    """The keyword arguments `PeftModel.from_pretrained` reads (its own, `load_adapter`'s and the Hub download's)."""
    import inspect

    from huggingface_hub import hf_hub_download
    from peft import PeftModel

    names = {name for function in (PeftModel.from_pretrained, PeftModel.load_adapter, hf_hub_download)
             for name, parameter in inspect.signature(function).parameters.items()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD}
    return names - {"self", "model", "model_id", "adapter_name", "repo_id", "filename"}


def load_adapter_model(adapter_name_or_path: str, base_model_name_or_path: Optional[str] = None,
                       dtype: torch.dtype = torch.float32, **adapter_kwargs):
    """`PeftModel` of a MoE-LoRA adapter on its base CLIP, named by `base_model_name_or_path` or else by the adapter
    config. CLIP checkpoints are often stored in float16 (the shared proxy-clip is); DDAS thresholds were
    calibrated on float32 features and CPUs run float16 slowly, hence float32 unless `dtype` says otherwise."""
    from peft import PeftConfig, PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import CLIPModel

    check_loader_options(adapter_kwargs, _peft_options(), "a MoE-LoRA adapter (PeftModel.from_pretrained)")
    check_adapter_source(adapter_name_or_path, adapter_kwargs.get("subfolder"))
    # Read by the config class of its type, as PeftModel.from_pretrained does (PeftConfig's own reader skips the
    # checks of MoELoraConfig.from_pretrained, which name the file).
    hub = {k: adapter_kwargs[k] for k in HUB_OPTIONS if k in adapter_kwargs}
    try:
        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(adapter_name_or_path, **hub)]
    except (KeyError, TypeError):
        raise ValueError(f"The adapter_config.json of {adapter_name_or_path} has no `peft_type` that peft knows: the "
                         "file was damaged or edited, or the adapter is of a peft method not installed here.") from None
    config = config_class.from_pretrained(adapter_name_or_path, **adapter_kwargs)
    base = base_model_name_or_path or config.base_model_name_or_path
    if not base:
        raise ValueError(f"The adapter config of {adapter_name_or_path} names no base model "
                         "(base_model_name_or_path is empty); pass base_model_name_or_path= (the CLIP it was "
                         "trained from).")
    check_adapter_source(base)
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(base, dtype=dtype), adapter_name_or_path,
                                      **adapter_kwargs)
    model.peft_config["default"].base_model_name_or_path = base  # the base it runs on, if given explicitly
    return model


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_image(image: Any, timeout: Optional[float] = None) -> Image.Image:
    """One image as the classifier and the pipeline take it (a PIL image, an array, a local path, an http(s) URL,
    base64, the bytes of an image file or a binary file object), as 8-bit RGB with the conversion training uses
    (`to_rgb`: 16-bit, float, transparent images)."""
    if isinstance(image, (bytes, bytearray)) or hasattr(image, "read"):
        try:
            image = Image.open(BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)
        except OSError as error:  # PIL's UnidentifiedImageError
            raise ValueError(f"The {type(image).__name__} given hold no image file PIL reads ({error}): give the "
                             "bytes of a PNG, JPEG, ... file.") from None
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    url = isinstance(image, str) and image.startswith(("http://", "https://"))
    if isinstance(image, str) and not url and not os.path.isfile(image) and image.lower().endswith(IMAGE_SUFFIXES):
        raise FileNotFoundError(f"The image file {image} does not exist: check the path (relative to "
                                f"{os.getcwd()}).")
    if url:
        try:
            with urllib.request.urlopen(image, timeout=timeout) as response:
                content = response.read()
        except OSError as error:  # URLError, HTTPError, timeouts
            raise ConnectionError(f"Cannot download the image {image} ({type(error).__name__}: {error}): the machine "
                                  "may be offline, or the URL is wrong. Pass a local path or a PIL image.") from None
        image = Image.open(BytesIO(content))
    elif isinstance(image, str):  # transformers' reader names what a source must be; it converts to RGB itself
        image = Image.open(image) if os.path.isfile(image) else load_image(image)
    return to_rgb(ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else image)


def subset_of(untouched: Untouched, rows: torch.Tensor) -> Untouched:
    """The untouched embeddings of `rows` of a batch, as a tensor or as the finishing function of those rows."""
    if untouched is None or not callable(untouched):
        return None if untouched is None else untouched[rows]
    return lambda subset: untouched(rows[subset])


class TaskAgnosticClassifier:
    """Classify images without a task id.

    Each image goes where the method sends it (DDAS for MoE-Adapters, semantic voting for ConDU): an image of a
    learned task is classified among that task's class names through its model (ConDU: the voted models
    together); an image the method does not recognise goes to the untouched CLIP and is classified among the
    `candidate_labels` the caller gives. The only loop is over the distinct routes chosen in a batch.
    """

    def __init__(self, model, processor):
        method = model if isinstance(model, ContinualMethod) else method_for_model(model)
        if not method.selects_routes:
            raise ValueError("TaskAgnosticClassifier needs a model that picks a task without a task id: a MoE-LoRA "
                             "model with a trained DDAS selector (ContinualTrainer with DDASArguments(ddas=True)) "
                             "or a trained ConDU (the ConDU itself, not its .model).")
        self.tasks = method.learned_tasks()
        if not self.tasks:
            raise ValueError("TaskAgnosticClassifier needs a model that learned a task: this one's selector (or "
                             "ConDU store) holds no trained task, so every image would go to the untouched CLIP. "
                             "Train tasks first (ContinualTrainer.train_tasks) or load a trained adapter; for the "
                             "untouched CLIP on purpose use the base CLIPModel.")
        self.method, self.processor = method, processor
        self.device = next(method.model.parameters()).device
        method.model.eval()
        self.core = RoutedClassifier(method, processor.tokenizer, self.device)

    @classmethod
    def from_pretrained(cls, adapter_name_or_path: str, base_model_name_or_path: Optional[str] = None,
                        dtype: torch.dtype = torch.float32, **adapter_kwargs) -> "TaskAgnosticClassifier":
        """A published folder or Hub repo, on the base CLIP its config names (or `base_model_name_or_path`), in
        `dtype`: a MoE-LoRA adapter that carries its DDAS selector, or a ConDU save (unified model + task
        triggers). `adapter_kwargs` (revision, subfolder, token...) go to peft or the ConDU loader."""
        from transformers import CLIPModel, CLIPProcessor

        hub = {k: adapter_kwargs[k] for k in HUB_OPTIONS if k in adapter_kwargs}
        check_adapter_source(adapter_name_or_path, hub.get("subfolder"))
        if holds_condu(adapter_name_or_path, **hub):
            check_loader_options(adapter_kwargs, HUB_OPTIONS, "a ConDU save")
            base = None
            if base_model_name_or_path is not None:
                check_adapter_source(base_model_name_or_path)
                base = CLIPModel.from_pretrained(base_model_name_or_path, dtype=dtype)
            method = ConDU.from_pretrained(adapter_name_or_path, base, dtype=dtype, **hub)
            return cls(method, CLIPProcessor.from_pretrained(method.model.name_or_path))
        model = load_adapter_model(adapter_name_or_path, base_model_name_or_path, dtype, **adapter_kwargs)
        return cls(model, CLIPProcessor.from_pretrained(model.peft_config["default"].base_model_name_or_path))

    def __call__(self, images: Sequence[Any], candidate_labels: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = ("a photo of a {}.",)) -> list[dict]:
        """One dict per image (see `read_image`): `label`, `score` (softmax over the label set used) and `task` (None:
        zero-shot)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or not hasattr(images, "__len__"):
            raise ValueError(f"`images` must be a list of images, got {type(images).__name__}: pass [image] for one, "
                             "list(images) for a generator.")
        if len(images) == 0:
            self.check_labels(candidate_labels, templates)
            return []
        pixels = self.processor.image_processor(images=[read_image(image) for image in images],
                                                return_tensors="pt")["pixel_values"]
        return self.classify(pixels, candidate_labels, templates)

    def check_labels(self, candidate_labels: Optional[Sequence[str]] = None,
                     templates: Sequence[str] = ("a photo of a {}.",)) -> None:
        """The zero-shot label set of a call, checked whatever the images (an empty batch too)."""
        if candidate_labels is not None:
            check_label_space(candidate_labels, templates, "The zero-shot label set", "candidate_labels")
            check_prompt_tokens(self.processor.tokenizer, list(candidate_labels), list(templates),
                                "The zero-shot label set")

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, candidate_labels: Optional[Sequence[str]] = None,
                 templates: Sequence[str] = ("a photo of a {}.",)) -> list[dict]:
        """As `__call__`, for a batch of CLIP pixel values."""
        self.check_labels(candidate_labels, templates)
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or not pixels.dtype.is_floating_point:
            got = f"{tuple(pixels.shape)} {pixels.dtype}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"`pixels` must be a floating-point tensor (batch, channels, height, width) of CLIP pixel "
                             f"values (the image processor's pixel_values), got {got}.")
        if pixels.shape[0] == 0:
            return []
        if not bool(torch.isfinite(pixels).all()):
            raise ValueError("`pixels` holds NaN or infinite values: every score would be NaN. Check the images and "
                             "their preprocessing.")
        pixels = pixels.to(self.device)
        routes, untouched = self.method.select_routes(self.core, pixels)
        unknown = int((routes.selected == ZERO_SHOT).sum())
        if unknown and not candidate_labels:
            raise ValueError(f"{unknown} image(s) are not from any task this model learned; pass "
                             "`candidate_labels` to classify them with zero-shot CLIP.")
        embeddings = None
        if routes.ids.shape[1] == 1 and self.method.mixed_routes:  # one routed pass for the images of every route
            embeddings = self.core.image(pixels, routes.ids[:, 0], untouched)
        results: list[Optional[dict]] = [None] * pixels.shape[0]
        for route in routes.selected.unique().tolist():
            rows = torch.nonzero(routes.selected == route).flatten()
            info = self.tasks[route] if route != ZERO_SHOT else dict(classnames=candidate_labels, templates=templates,
                                                                    name=None)
            space, task = LabelSpace.of(info["classnames"], info["templates"]), info["name"]
            if embeddings is not None:
                scores = embeddings[rows] @ self.core.text(space, route).T
            else:
                subset = ImageRoutes(routes.ids[rows], None if routes.weights is None else routes.weights[rows],
                                routes.fusion, routes.selected[rows])
                scores = self.core.scores(pixels[rows], subset, space, subset_of(untouched, rows))
            if routes.fusion == "logits":
                scores = torch.softmax(self.core.logit_scale * scores, dim=-1)
            best, labels = scores.max(-1)
            for position, label, score in zip(rows.tolist(), labels.tolist(), best.tolist()):
                results[position] = {"label": space.classnames[label], "score": score, "task": task}
        return results
