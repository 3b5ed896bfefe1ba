"""Which pretrained weights an adapter belongs to: a hash of the base model's own tensors.

Two CLIPs of the same shape with other weights (another checkpoint, another revision, a fine-tuned copy) accept the
same adapter without a shape error and give wrong answers; the hash, saved in `adapter_config.json` when the adapter
is created and compared when it is loaded, tells them apart. The same hash ties a continual run's checkpoints to
its base model.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

logger = logging.getLogger("hf_moe_cl")


def _base_parameters(model):
    """(name without peft's prefixes, parameter) of every tensor of the base model, adapters' own left out."""
    adapter_parts = {name: set(module.adapter_layer_names) | set(module.other_param_names)
                     for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if parameter.device.type == "meta" or any(parts[i] in adapter_parts.get(".".join(parts[:i]), ())
                                                  for i in range(len(parts))):
            continue
        yield name.removeprefix("base_model.model.").replace(".base_layer", ""), parameter


def _digest(parameters) -> str:
    digest = hashlib.sha256()
    for key, parameter in parameters:
        digest.update(f"{key}:{parameter.dtype}:{tuple(parameter.shape)};".encode())
        digest.update(parameter.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def base_weights_fingerprint(model) -> str:
    """A hash of the model's pretrained weights (names, dtypes, shapes, bytes), without a peft adapter's own
    tensors: two bases of the same shape but other weights differ here."""
    return _digest(_base_parameters(model))


def base_weights_record(model) -> Optional[dict]:
    """What `MoELoraConfig.base_weights` stores: the hash of the weights, their dtype (a base loaded in another dtype
    has other bytes, so only a base in the recorded dtype can be compared) and a hash of the tensor names and shapes
    alone (a base of another architecture is told apart from other weights of the same one). None for a model whose
    weights are all on the meta device."""
    parameters = list(_base_parameters(model))
    if not parameters:
        return None
    layout = hashlib.sha256("".join(f"{key}:{tuple(p.shape)};" for key, p in parameters).encode())
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for _, p in parameters)
    return {"sha256": _digest(parameters), "dtype": dtypes.most_common(1)[0][0], "layout": layout.hexdigest()[:16]}


def record_problem(record) -> Optional[str]:
    """What is wrong with a saved record (None: nothing)."""
    valid = (isinstance(record, dict) and set(record) == {"sha256", "dtype", "layout"}
             and isinstance(record["dtype"], str) and all(
                 isinstance(record[key], str) and len(record[key]) == 16
                 and all(c in "0123456789abcdef" for c in record[key]) for key in ("sha256", "layout")))
    return None if valid else ("must be None or {'sha256': 16 hex digits, 'dtype': str, 'layout': 16 hex digits}; got "
                               f"{str(record)[:120]}")


def check_base(recorded: dict, model, what: str, fix: str) -> None:
    """Refuse `model` as the base of `what` (an adapter, a ConDU save) made on other weights, or on a base of another
    layout (tensor names and shapes: projection_dim, image size, vocabulary...), naming `fix`. Only a base loaded in
    another dtype cannot be compared: a warning says so, and so does a record whose `layout` or `dtype` was edited."""
    current = base_weights_record(model)
    if current is None or recorded == current:  # a meta-device base has no weights to compare
        return
    if recorded["sha256"] == current["sha256"]:  # the same bytes, so the same names, shapes and dtype
        logger.warning("The base_weights record of %s does not fit its own weights hash (its `layout` or `dtype` was "
                       "edited); the weights are the same as this base's.", what)
        return
    if recorded["layout"] != current["layout"]:
        problem = (f"a base model of another layout (tensor names and shapes hash {recorded['layout']}, this model's "
                   f"{current['layout']}: e.g. another projection_dim, image size, vocabulary or depth)")
    elif recorded["dtype"] != current["dtype"]:
        logger.warning("%s was created on %s base weights and is loaded on %s ones: whether they are the same "
                       "pretrained weights cannot be checked (load the base in %s to check it).", what,
                       recorded["dtype"], current["dtype"], recorded["dtype"])
        return
    else:
        problem = (f"other pretrained weights than this model's (weights hash {recorded['sha256']}, this model's "
                   f"{current['sha256']}): a base of the same shape with other weights gives wrong answers")
    raise ValueError(f"{what[0].upper()}{what[1:]} was created on {problem}. {fix}")
