"""ConDU (Gao et al.): per-task deltas unified into one delta plus task triggers, decoupled on demand."""

from .deltas import (
    CONDU_CONFIG,
    CONDU_WEIGHTS,
    Delta,
    DeltaStore,
    applied_delta,
    decouple,
    model_fingerprint,
    pack_mask,
    unify,
    unpack_mask,
)

__all__ = ["CONDU_CONFIG", "CONDU_WEIGHTS", "Delta", "DeltaStore", "applied_delta", "decouple", "model_fingerprint",
           "pack_mask", "unify", "unpack_mask"]
