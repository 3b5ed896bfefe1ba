"""Which pretrained weights an adapter belongs to: a hash of the base model's own tensors.

Two CLIPs of the same shape with other weights (another checkpoint, another revision, a fine-tuned copy) accept the
same adapter without a shape error and give wrong answers; the hash, saved in `adapter_config.json` when the adapter
is created and compared when it is loaded, tells them apart. The same hash ties a continual run's checkpoints to
its base model.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def _base_parameters(model):
    """(name without peft's prefixes, parameter) of every tensor of the base model, adapters' own left out."""
    adapter_parts = {name: set(module.adapter_layer_names) | set(module.other_param_names)
                     for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if any(parts[i] in adapter_parts.get(".".join(parts[:i]), ()) for i in range(len(parts))):
            continue
        if parameter.device.type == "meta":
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
