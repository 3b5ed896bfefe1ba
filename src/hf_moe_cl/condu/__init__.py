"""ConDU (Gao et al.): per-task deltas unified into one delta plus task triggers, decoupled on demand.

`unify` (the delta algebra), `store` (what is kept between tasks), `lora` (deltas in LoRA-factor space),
`voting` (task selection by class prototypes), `folder` (the saved folder, local or on the Hub).
"""

from .folder import (CONFIG_FILE, DELTA_FILE, TRIGGERS_FILE, holds_condu, load_folder, model_fingerprint, read_header,
                     resolve_folder, save_folder)
from .store import DeltaStore, pack_mask, unpack_mask
from .unify import UNIFY_RULES, Delta, applied_delta, decouple, unify
from .voting import PROTOTYPE_KINDS, prototype_vectors, vote

__all__ = ["CONFIG_FILE", "DELTA_FILE", "PROTOTYPE_KINDS", "TRIGGERS_FILE", "UNIFY_RULES", "Delta", "DeltaStore",
           "applied_delta", "decouple", "holds_condu", "load_folder", "model_fingerprint", "pack_mask",
           "prototype_vectors", "read_header", "resolve_folder", "save_folder", "unify", "unpack_mask", "vote"]
