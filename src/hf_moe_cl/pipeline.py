"""`pipeline("task-agnostic-image-classification", ...)`: task-agnostic inference as a transformers pipeline.

`import hf_moe_cl` registers the task with transformers' `PIPELINE_REGISTRY`. The pipeline batches and moves
inputs to the model's device the transformers way; reading images (`read_image`) and the classification itself are
`TaskAgnosticClassifier`'s, so both give the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceType
from typing import Optional, Sequence, Union

import torch
from transformers import CLIPProcessor, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .condu import holds_condu
from .continual.methods import ConDU, ContinualMethod
from .inference import TaskAgnosticClassifier, check_adapter_source, load_adapter_model, read_image

TASK = "task-agnostic-image-classification"
# The attribute of a ConDU save's CLIP that holds its method (the pipeline's model must be the CLIP itself).
METHOD_ATTRIBUTE = "_hf_moe_cl_method"


class MoELoraCLIP:
    """What `pipeline(TASK, model="<folder or repo>")` loads: a MoE-LoRA adapter on the base CLIP its config names,
    or a ConDU save (its CLIP, carrying the ConDU method that classifies with it).

    transformers asks for `dtype="auto"` unless told otherwise; that loads float32 here (see `load_adapter_model`).
    """

    @classmethod
    def from_pretrained(cls, adapter_name_or_path: str, dtype: Union[str, torch.dtype, None] = "auto", token=None,
                        **pipeline_kwargs):
        dtype = torch.float32 if dtype in ("auto", None) else dtype
        hub = {k: pipeline_kwargs[k] for k in ("revision", "subfolder") if pipeline_kwargs.get(k) is not None}
        check_adapter_source(adapter_name_or_path, hub.get("subfolder"))
        if holds_condu(adapter_name_or_path, token=token, **hub):
            method = ConDU.from_pretrained(adapter_name_or_path, dtype=dtype, token=token, **hub)
            setattr(method.model, METHOD_ATTRIBUTE, method)
            return method.model
        return load_adapter_model(adapter_name_or_path, dtype=dtype, token=token, **hub)


class TaskAgnosticImageClassificationPipeline(Pipeline):
    """Classify images without a task id: each image is answered in the label space of the task DDAS routes it to,
    or, if it belongs to no learned task, among the `candidate_labels` of the call (zero-shot CLIP).

    ```python
    classifier = pipeline("task-agnostic-image-classification", model=peft_model, processor=clip_processor)
    classifier(images, candidate_labels=["cat", "dog"], batch_size=32)
    # [{'label': 'airplane', 'score': 0.91, 'task': 'cifar10'}, {'label': 'dog', 'score': 0.7, 'task': None}, ...]
    ```
    `hypothesis_template` (a template with `{}`, or several, averaged) describes the candidate labels.
    """

    # Optional, so that a loaded model may come with `processor=` alone; `__init__` says what is missing.
    _load_processor = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, model, *args, **kwargs):
        method = model if isinstance(model, ContinualMethod) else getattr(model, METHOD_ATTRIBUTE, model)
        super().__init__(method.model if isinstance(model, ContinualMethod) else model, *args, **kwargs)
        if self.tokenizer is None or self.image_processor is None:
            raise ValueError(f"The {TASK} pipeline needs CLIP's tokenizer and image processor: pass "
                             "processor=CLIPProcessor.from_pretrained(base) (or tokenizer= and image_processor=).")
        processor = CLIPProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
        self.classifier = TaskAgnosticClassifier(method, processor)

    def __call__(self, images, **kwargs):
        """As `Pipeline.__call__`; an empty list gives [] (its labels checked), as the classifier does. A tuple or a
        `datasets` column is a list of images (transformers' `Pipeline` would take it for one image)."""
        if isinstance(images, SequenceType) and not isinstance(images, (str, bytes, bytearray, list)):
            images = list(images)
        if isinstance(images, list) and len(images) == 0:
            options = {k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")}
            self.classifier.check_labels(**self._sanitize_parameters(**options)[1])
            return []
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(self, candidate_labels: Optional[Sequence[str]] = None,
                             hypothesis_template: Union[str, Sequence[str], None] = None, timeout=None, **unknown):
        if unknown:
            raise ValueError(f"The {TASK} pipeline has no option {sorted(unknown)}: it takes candidate_labels, "
                             "hypothesis_template, timeout, batch_size and num_workers, and answers one label per "
                             "image (the best of the label space its task or candidate_labels give).")
        preprocess, forward = {}, {}
        if timeout is not None:
            preprocess["timeout"] = timeout
        if candidate_labels is not None:
            forward["candidate_labels"] = candidate_labels  # checked by the classifier: a string is refused
        if hypothesis_template is not None:
            if not isinstance(hypothesis_template, (str, list, tuple)):
                raise ValueError(f"hypothesis_template must be a template with {{}} or a list of them, got "
                                 f"{type(hypothesis_template).__name__}.")
            forward["templates"] = ([hypothesis_template] if isinstance(hypothesis_template, str)
                                    else list(hypothesis_template))  # each checked by the classifier
        return preprocess, forward, {}

    def preprocess(self, image, timeout=None):
        pixels = self.image_processor(images=[read_image(image, timeout)], return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"]}

    def _forward(self, model_inputs, **labels):
        """`labels`: the call's `candidate_labels` and `templates`, as `TaskAgnosticClassifier.classify` takes them."""
        return {"predictions": self.classifier.classify(model_inputs["pixel_values"], **labels)}

    def postprocess(self, model_outputs):
        prediction = model_outputs["predictions"]  # a list of one when the pipeline ran a single input unbatched
        return prediction[0] if isinstance(prediction, list) else prediction


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=TaskAgnosticImageClassificationPipeline,
                                    pt_model=MoELoraCLIP, type="multimodal")
