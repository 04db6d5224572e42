"""clipsurgery: find and remove demographic bias inside CLIP, and ship the patched encoder.

Public API::

    import surgery
    loaded = surgery.load("ViT-B-32:openai")        # or a file, hf-hub:org/name, builtin:tiny
    towers = surgery.get_towers(loaded.model)        # uniform view of both towers
    surgery.swap_attention(loaded.model)             # head-maskable attention, same state dict
    surgery.set_head_masks(loaded.model, "vision", masks)  # (L, H) or (B, L, H)
"""
from __future__ import annotations

__version__ = "0.1.0"

from surgery.errors import ArchitectureError, CheckpointError, HeadMaskError, SurgeryError, UnsupportedTowerError
from surgery.model.attention import (
    BACKENDS,
    HeadMaskedAttention,
    head_masked,
    masked_modules,
    restore_attention,
    set_backend,
    set_head_masks,
    swap_attention,
)
from surgery.model.loading import LoadedModel, load
from surgery.model.towers import TOWERS, TowerView, get_towers

__all__ = [
    "__version__", "load", "LoadedModel", "get_towers", "TowerView", "TOWERS",
    "HeadMaskedAttention", "swap_attention", "restore_attention", "set_head_masks", "masked_modules",
    "set_backend", "head_masked", "BACKENDS",
    "SurgeryError", "CheckpointError", "ArchitectureError", "UnsupportedTowerError", "HeadMaskError",
]
